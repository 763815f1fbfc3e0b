"""engine.auth without services: whose address failed keys count against, which keys are
refused without a query."""

from __future__ import annotations

import ipaddress

import pytest

from engine.auth import client_address, well_formed

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("198.51.100.7", None, (), "198.51.100.7"),
        # without a trusted proxy the header is the client's to invent: ignored
        ("198.51.100.7", "203.0.113.9", (), "198.51.100.7"),
        ("198.51.100.7", "203.0.113.9", PROXIES, "198.51.100.7"),  # peer is not a proxy
        # behind trusted proxies: the nearest hop that is not one of them
        ("10.1.2.3", "203.0.113.9", PROXIES, "203.0.113.9"),
        ("10.1.2.3", "1.1.1.1, 203.0.113.9, 10.4.4.4", PROXIES, "203.0.113.9"),
        ("10.1.2.3", "10.5.5.5, 10.4.4.4", PROXIES, "10.5.5.5"),  # all trusted: the first
        ("10.1.2.3", "garbage, 203.0.113.9", PROXIES, "203.0.113.9"),
        ("10.1.2.3", "203.0.113.9, garbage", PROXIES, "10.1.2.3"),  # stop at what is vouched for
        ("10.1.2.3", "", PROXIES, "10.1.2.3"),
        # IPv6 counts per /64; IPv4-mapped addresses as IPv4
        ("2001:db8:1:2:aaaa::1", None, (), "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", None, (), "2001:db8:1:2::/64"),
        ("fd00::1", "2001:db8:7::5", PROXIES, "2001:db8:7::/64"),
        ("::ffff:198.51.100.7", None, (), "198.51.100.7"),
        (None, "203.0.113.9", PROXIES, "unknown"),
        ("not-an-ip", None, (), "unknown"),
    ],
)
def test_client_address(
    peer: str | None, forwarded: str | None, trusted: tuple, expected: str
) -> None:
    assert client_address(peer, forwarded, trusted) == expected


def test_keys_of_another_shape_are_refused_without_a_query() -> None:
    assert well_formed("bsk_" + "A" * 43)
    for key in ("nope", "Bearer bsk_x", "bsk_" + "A" * 200, "bsk_\u00e9t\u00e9", "bsk_a\x00b",
                b"bsk_\xff".decode("utf-8", "surrogateescape"), "bsk_a b\n"):  # fmt: skip
        assert not well_formed(key), key
