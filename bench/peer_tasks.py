"""Worker side of the peer baselines in ``bench/peers.py``: a Celery task and a Dramatiq
actor that each send ONE recipient per request to the mock provider, and the chunked Celery
task a team that knows Celery would write: one task per chunk of 100 recipients, one
request for the 100, their statuses written to PostgreSQL in one statement.

Both are built lazily so that a Dramatiq worker never imports Celery and the other way round
(their resident memory is part of the figures):

    celery -A bench.peer_tasks:celery_app worker ...
    dramatiq bench.peer_tasks:setup_dramatiq

Configured by the environment that ``bench/peers.py`` sets:

- ``PEER_PROVIDER_URL``: the mock provider, e.g. ``http://127.0.0.1:6100``
- ``PEER_BROKER_URL``: the Redis broker, e.g. ``redis://127.0.0.1:6379/13``
- ``PEER_HTTP_POOL``: keep-alive connections per worker process (= its concurrency)
- ``PEER_CELERY_CONFIG``: JSON object of Celery settings merged into the app's config
- ``PEER_DATABASE_URL``: the chunked peer's PostgreSQL database (its ``peer_recipients``)

Personalisation is plain ``str.format`` per recipient (cheaper than Jinja2); the HTTP client
is a urllib3 keep-alive pool per worker process (what ``requests`` uses underneath, without
its per-request overhead: ~0.6 ms less CPU per task measured here).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import urllib3

if TYPE_CHECKING:
    from celery import Celery
    from dramatiq import Actor

CELERY_TASK = "bench.peer_tasks.send_one"
CELERY_CHUNK_TASK = "bench.peer_tasks.send_chunk"
DRAMATIQ_ACTOR = "send_one"
QUEUE = "peer_send"

FROM_EMAIL = "bench@example.com"
FROM_NAME = "Bench"
SUBJECT = "Hello {name}"
TEXT = "Your code is {code}."
JSON_HEADERS = {"Content-Type": "application/json"}


class ProviderError(Exception):
    """The provider failed the request (to be retried by the queue's retry policy)."""


class ProviderRejected(Exception):
    """The provider answered, but did not accept the message."""


_pools_lock = threading.Lock()
_pools: dict[str, tuple[int, Any]] = {}


def _per_process(name: str, make: Callable[[], Any]) -> Any:
    """One ``make()`` per worker process (threads or greenlets share it, prefork children
    get their own)."""
    pid = os.getpid()
    held = _pools.get(name)
    if held is None or held[0] != pid:
        with _pools_lock:
            held = _pools.get(name)
            if held is None or held[0] != pid:
                held = _pools[name] = (pid, make())
    return held[1]


def _pool_size() -> int:
    return int(os.environ.get("PEER_HTTP_POOL", "10"))  # the process's concurrency


def _http() -> urllib3.HTTPConnectionPool:
    """The process's keep-alive urllib3 connection pool to the provider."""

    def make() -> urllib3.HTTPConnectionPool:
        url = urllib3.util.parse_url(os.environ["PEER_PROVIDER_URL"])
        return urllib3.HTTPConnectionPool(
            url.host, url.port, maxsize=_pool_size(), block=True, retries=False, timeout=10.0
        )

    return _per_process("http", make)


def render(ref: str, email: str, name: str, code: str) -> dict[str, Any]:
    """The provider message for one recipient, personalised with ``str.format``."""
    return {
        "ref": ref,
        "to": email,
        "to_name": name,
        "from": FROM_EMAIL,
        "from_name": FROM_NAME,
        "subject": SUBJECT.format(name=name, code=code),
        "html": None,
        "text": TEXT.format(name=name, code=code),
        "headers": {},
    }


def send_one(ref: str, email: str, name: str, code: str) -> str:
    """Render and send one recipient; the provider's message id, or an exception to retry."""
    body = json.dumps({"messages": [render(ref, email, name, code)]}).encode()
    response = _http().request("POST", "/v1/send", body=body, headers=JSON_HEADERS)
    if response.status != 200:
        raise ProviderError(f"{ref}: HTTP {response.status}")
    result = json.loads(response.data)["results"][0]
    if result.get("status") != "accepted":
        raise ProviderRejected(f"{ref}: {result}")
    return str(result["id"])


def _database() -> Any:
    """The process's psycopg connection pool (psycopg's sync connections wait on sockets,
    which gevent's monkey-patching makes cooperative)."""

    def make() -> Any:
        from psycopg_pool import ConnectionPool

        url = os.environ["PEER_DATABASE_URL"]
        return ConnectionPool(url, min_size=1, max_size=_pool_size(), open=True)

    return _per_process("database", make)


# The chunk's statuses in one statement, as the issue describes the peer.
_RECORD = """
UPDATE peer_recipients r SET status = v.status, provider_message_id = v.pmid
  FROM unnest(%s::int[], %s::text[], %s::text[]) AS v(id, status, pmid)
 WHERE r.id = v.id
"""


def send_chunk(rows: list[list[Any]]) -> None:
    """Render and send a chunk of recipients (``[id, email, name, code]`` each) in one
    request, then write their statuses in one ``UPDATE ... FROM unnest``."""
    messages = [render(str(r[0]), r[1], r[2], r[3]) for r in rows]
    body = json.dumps({"messages": messages}).encode()
    response = _http().request("POST", "/v1/send", body=body, headers=JSON_HEADERS)
    if response.status != 200:
        raise ProviderError(f"chunk at {rows[0][0]}: HTTP {response.status}")
    results = json.loads(response.data)["results"]
    statuses = ["sent" if a.get("status") == "accepted" else "failed" for a in results]
    ids = [r[0] for r in rows]
    pmids = [a.get("id") for a in results]
    with _database().connection() as conn:
        conn.execute(_RECORD, (ids, statuses, pmids))


def build_celery_app(broker_url: str, config: dict[str, Any]) -> Celery:
    """The Celery app with the one task, ``config`` merged over the broker URL."""
    from celery import Celery

    app = Celery("peer", broker=broker_url, set_as_current=False)
    app.conf.update(config)

    # Both tasks: no result backend, retried with backoff on provider and HTTP errors.
    retried = {
        "shared": False,
        "ignore_result": True,
        "autoretry_for": (ProviderError, urllib3.exceptions.HTTPError),
        "retry_backoff": True,
        "max_retries": 20,
    }

    @app.task(name=CELERY_TASK, **retried)
    def celery_send_one(ref: str, email: str, name: str, code: str) -> None:
        send_one(ref, email, name, code)

    @app.task(name=CELERY_CHUNK_TASK, **retried)
    def celery_send_chunk(rows: list[list[Any]]) -> None:
        send_chunk(rows)

    return app


def setup_dramatiq(broker_url: str | None = None) -> Actor[..., None]:
    """Install the Redis broker as Dramatiq's global broker and declare the actor
    (``dramatiq bench.peer_tasks:setup_dramatiq`` calls this in every worker process)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=broker_url or os.environ["PEER_BROKER_URL"])
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name=DRAMATIQ_ACTOR, queue_name=QUEUE, broker=broker)
    def dramatiq_send_one(ref: str, email: str, name: str, code: str) -> None:
        send_one(ref, email, name, code)

    return dramatiq_send_one


_celery_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """``celery_app``, built on first access from the environment (for ``celery -A``)."""
    global _celery_app
    if name != "celery_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _celery_app is None:
        config = json.loads(os.environ.get("PEER_CELERY_CONFIG", "{}"))
        _celery_app = build_celery_app(os.environ["PEER_BROKER_URL"], config)
    return _celery_app
