"""CSRF protection of every unsafe request (POST and the like), beside ``SameSite=Lax``.

A request must carry its session's token (``web.sessions``): htmx sends it as the
``X-CSRF-Token`` header (set once on ``<body hx-headers>``), a plain form as its
``csrf_token`` field. A multipart form (a batch's CSV upload) is streamed, not read whole
before its view runs, so for the routes in ``MULTIPART`` the token is its first part,
read and checked by the view (``multipart``) before anything else. A request whose
``Origin`` names another host, or that a browser marks ``Sec-Fetch-Site: cross-site``, is
refused whatever it carries. Refusals are 403 with a page that says what to do.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import BodyPartReader, MultipartReader, web

from web import context
from web.sessions import Session, same_token

SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
MULTIPART = frozenset({"/batches/new", "/batches/preview"})  # their views call ``multipart``
_REFUSED = (
    "This form was not sent by a dashboard page of this session (its security token is "
    "missing or out of date). Reload the page and try again."
)
_DEFERRED = web.RequestKey("csrf_deferred", bool)


def refused() -> web.HTTPForbidden:
    return web.HTTPForbidden(text=_REFUSED)


def _cross_site(request: web.Request) -> bool:
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    return urlsplit(origin).netloc.lower() != request.host.lower()


async def check(request: web.Request, session: Session) -> None:
    """Raise 403 unless an unsafe request carries the session's token."""
    if request.method in SAFE:
        return
    if _cross_site(request):
        raise refused()
    given = request.headers.get(HEADER)
    if given is None:
        if request.content_type == "application/x-www-form-urlencoded":
            form = await request.post()
            request[context.FORM] = form
            value = form.get(FIELD)
            given = value if isinstance(value, str) else None
        elif request.content_type == "multipart/form-data" and _multipart_route(request):
            request[_DEFERRED] = True
            return
    if not same_token(session.csrf, given):
        raise refused()


def _multipart_route(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in MULTIPART


async def multipart(request: web.Request) -> MultipartReader:
    """The reader of a multipart form of ``MULTIPART``, its CSRF token checked: the header,
    or else the form's first part."""
    reader = await request.multipart()
    if request.get(_DEFERRED):
        part = await reader.next()
        if not isinstance(part, BodyPartReader) or part.name != FIELD:
            raise refused()
        token = (await part.read(decode=True)).decode(errors="replace")
        if not same_token(request[context.SESSION].csrf, token):
            raise refused()
    return reader
