"""Which URLs a customer's webhook endpoint may have (SSRF), the retry schedule, and the
resolve-time check (no services: ``localhost`` resolves from /etc/hosts)."""

from __future__ import annotations

import pytest

from engine.outbound import PublicResolver, public_address
from engine.webhook_deliveries import Policy
from engine.webhook_endpoints import EVENT_TYPES, check_url, new_secret


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/batchsender",
        "https://hooks.example.com:8443/a?b=c",
        "https://93.184.216.34/hook",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
    ],
)
def test_public_https_urls_are_taken(url: str) -> None:
    assert check_url(url, allow_private=False) == url


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://hooks.example.com/", "https://"),
        ("ftp://hooks.example.com/", "https://"),
        ("javascript:alert(1)", "https://"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https://user@hooks.example.com/", "credentials"),
        ("https:///path", "host"),
        ("https://hooks.example.com/#x", "fragment"),
        ("https://hooks.example.com:99999/", "valid URL"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com/\n", "control"),
        ("https://127.0.0.1/", "loopback"),
        ("https://localhost/", "loopback"),
        ("https://api.localhost/", "loopback"),
        ("https://localhost./", "loopback"),
        ("https://10.1.2.3/", "private"),
        ("https://172.16.0.1/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://100.64.0.1/", "private"),  # carrier-grade NAT
        ("https://169.254.169.254/latest/meta-data", "link-local"),  # cloud metadata
        ("https://0.0.0.0/", "private"),
        ("https://[::1]/", "loopback"),
        ("https://[fe80::1]/", "link-local"),
        ("https://[fd00::1]/", "private"),
        ("https://[::ffff:10.0.0.1]/", "private"),  # IPv4 inside IPv6
        ("https://[2002:a00:1::]/", "private"),  # 6to4 of 10.0.0.1
        ("https://224.0.0.1/", "private"),  # multicast
        ("https://2130706433/", "canonical"),  # 127.0.0.1 as one number
        ("https://0x7f.1/", "canonical"),
        ("https://" + "a" * 2050 + ".com/", "2048"),
    ],
)
def test_other_urls_are_refused_saying_why(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_url(url, allow_private=False)


def test_the_development_setting_allows_http_and_private_targets() -> None:
    for url in ("http://127.0.0.1:8080/hook", "http://10.0.0.5/", "https://localhost/"):
        assert check_url(url, allow_private=True) == url
    for url in ("ftp://127.0.0.1/", "http://u:p@127.0.0.1/"):  # still refused
        with pytest.raises(ValueError):
            check_url(url, allow_private=True)


def test_public_addresses() -> None:
    assert public_address("8.8.8.8") and public_address("2001:4860:4860::8888")
    for address in ("127.0.0.1", "10.0.0.1", "::1", "fe80::1%eth0", "::ffff:192.168.0.1"):
        assert not public_address(address)


async def test_a_name_that_resolves_inside_is_refused_when_it_is_resolved() -> None:
    resolver = PublicResolver()
    try:
        with pytest.raises(OSError, match="not public"):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()


def test_the_retry_schedule_grows_to_its_cap_and_ends() -> None:
    policy = Policy(jitter=0.0)
    delays = [policy.delay(n) for n in range(1, policy.max_attempts)]
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0]
    assert delays == sorted(delays) and max(delays) == policy.max_delay
    assert 12 * 3600 < sum(delays) < policy.max_age  # retried for most of a day
    assert policy.gives_up(policy.max_attempts, 0) and policy.gives_up(1, policy.max_age)
    assert not policy.gives_up(policy.max_attempts - 1, policy.max_age - 1)
    jittered = Policy(jitter=0.2)
    assert all(8.0 <= jittered.delay(2) <= 12.0 for _ in range(100))


def test_secrets_are_in_the_standard_webhooks_format() -> None:
    import base64

    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert new_secret() != secret


def test_event_types_include_every_name_the_results_stream_uses() -> None:
    for name in ("sent", "delivered", "bounced", "complained", "opened", "clicked", "failed",
                 "cancelled", "soft_bounced", "deferred", "batch.completed"):  # fmt: skip
        assert name in EVENT_TYPES
    assert len(set(EVENT_TYPES)) == len(EVENT_TYPES)
