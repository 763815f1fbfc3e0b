"""Where the engine may connect on a tenant's word: public hosts only (SSRF).

A tenant names hosts the workers then connect to from inside the deployment: its event
webhook endpoints (``engine.webhook_endpoints``) and its provider accounts' base URLs
(``engine.accounts``). Such a host must not be a loopback, private, link-local or otherwise
non-public address: ``check_host`` refuses one written as an address (or ``localhost``)
when the URL is given, and ``PublicResolver`` refuses a name that resolves to one, each time
it is resolved for a connection, so a name that later resolves inside is refused then. The
settings ``WEBHOOK_ALLOW_PRIVATE_URLS`` and ``PROVIDER_ALLOW_PRIVATE_URLS`` (on outside prod)
lift the rule, for servers on a developer's machine (http://127.0.0.1:...) and for a
deployment whose provider is an internal relay.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

_NUMERIC_HOST = re.compile(r"[0-9.]+|0x[0-9a-f.x]*", re.IGNORECASE)
NOT_PUBLIC = "must not point to a loopback, private or link-local address"


def public_address(address: str) -> bool:
    """Whether an IP address is one a customer's server can have: globally routable,
    not multicast (an IPv4 address inside IPv6 is judged as itself)."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # without an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def check_host(host: str) -> None:
    """``ValueError`` when a URL's host is written as a non-public address, or is
    ``localhost``; a name passes (it is checked when it is resolved, ``PublicResolver``)."""
    host = host.rstrip(".")  # "localhost." is localhost
    try:
        public = public_address(host)
    except ValueError:  # a name
        if host == "localhost" or host.endswith(".localhost"):
            public = False
        elif _NUMERIC_HOST.fullmatch(host):
            raise ValueError(
                "has a host that is neither a canonical IP address nor a name"
            ) from None
        else:
            public = True
    if not public:
        raise ValueError(NOT_PUBLIC)


class PublicResolver(AbstractResolver):
    """aiohttp's resolver that refuses a host name with any address that is not public
    (``public_address``): checked on the addresses connected to, so a name that resolves
    inside after the URL was given is refused then."""

    def __init__(self) -> None:
        self._resolver = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        if not found or not all(public_address(item["host"]) for item in found):
            # With an errno, so that aiohttp's connection error carries the reason.
            raise OSError(errno.EACCES, f"{host} resolves to an address that is not public")
        return found

    async def close(self) -> None:
        await self._resolver.close()
