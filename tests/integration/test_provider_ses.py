"""SesProvider against the fake SES v2 server (devkit.fakes.ses) on 127.0.0.1: signing,
request shape, results in order, and every error class mapped."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from devkit.fakes.ses import (
    FAILURES,
    SEND_EMAIL,
    STATE,
    TEST_CREDENTIALS,
    TEST_REGION,
    FakeSes,
    build_app,
)
from providers.base import Account, Message, Quota, SendResult
from providers.ses import (
    REF_HEADER,
    REF_TAG,
    SesProvider,
    classify,
    encoded_words,
    error_code,
    ref_from_tag,
    ref_tag,
    request_body,
    scrub,
)
from tests import provider_support
from tests.provider_support import closing

SECRETS = (TEST_CREDENTIALS["access_key_id"], TEST_CREDENTIALS["secret_access_key"])


@asynccontextmanager
async def fake_ses(fake: FakeSes | None = None) -> AsyncIterator[tuple[str, FakeSes]]:
    """The fake on a free loopback port: its base URL and state."""
    app = build_app(fake)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATE]
    finally:
        await runner.cleanup()


def account(base_url: str, **credentials: str) -> Account:
    return Account(
        "ses", {**TEST_CREDENTIALS, **credentials}, base_url=base_url, region=TEST_REGION
    )


@asynccontextmanager
async def provider_for(
    fake: FakeSes | None = None, **options: Any
) -> AsyncIterator[tuple[SesProvider, FakeSes]]:
    credentials = options.pop("credentials", {})
    async with fake_ses(fake) as (base_url, state):
        async with closing(SesProvider(account(base_url, **credentials), **options)) as provider:
            yield provider, state


def make_messages(count: int, *, prefix: str = "b1") -> list[Message]:
    return [
        Message(
            ref=f"{prefix}:{i}",
            to_email=f"user{i}@example.com",
            to_name=f"User {i}",
            from_email="news@sender.test",
            from_name="Sender",
            subject=f"Hello {i}",
            html=f"<p>Hi {i}</p>",
            text=f"Hi {i}",
            headers={
                "List-Unsubscribe": f"<https://u.test/unsub/{i}>, <mailto:u+{i}@u.test>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                REF_HEADER: f"{prefix}:{i}",
            },
        )
        for i in range(count)
    ]


def assert_no_secrets(results: list[SendResult]) -> None:
    provider_support.assert_no_secrets(results, *SECRETS, pause_reason=True)


async def test_a_chunk_of_50_is_sent_in_order_with_its_headers() -> None:
    async with provider_for(FakeSes(latency=0.02)) as (provider, fake):
        assert provider.max_per_call == 50 and provider.name == "ses"
        messages = make_messages(50)
        results = await provider.send(messages)
    assert [r.ref for r in results] == [m.ref for m in messages]
    assert all(r.ok and not r.error for r in results)
    assert fake.requests == 50 and not fake.refused
    assert fake.max_in_flight == 10  # bounded concurrency
    received = fake.by_ref()
    for message, result in zip(messages, results, strict=True):
        item = received[message.ref]
        assert result.provider_message_id == item["MessageId"]
        request = item["request"]
        assert request["FromEmailAddress"] == "Sender <news@sender.test>"
        assert request["Destination"] == {
            "ToAddresses": [f"{message.to_name} <{message.to_email}>"]
        }
        simple = request["Content"]["Simple"]
        assert simple["Subject"] == {"Data": message.subject, "Charset": "UTF-8"}
        assert simple["Body"]["Html"]["Data"] == message.html
        assert simple["Body"]["Text"]["Data"] == message.text
        headers = {h["Name"]: h["Value"] for h in simple["Headers"]}
        assert headers == message.headers  # List-Unsubscribe carried as given
        assert request["EmailTags"] == [{"Name": REF_TAG, "Value": ref_tag(message.ref)}]
    assert len({r.provider_message_id for r in results}) == 50


async def test_the_ref_header_configuration_set_and_encodings() -> None:
    message = Message(
        ref="9f8e:3",
        to_email="zoë@bücher.example",
        to_name="Zoë Ünïcode",
        from_email="news@sender.test",
        from_name=None,
        subject="Grüße ✓",
        html=None,
        text="Hallo",
        headers={"X-Campaign": "Frühling ✓"},
    )
    with pytest.raises(ValueError):  # a non-ASCII local part SES cannot take
        request_body(message)
    message.to_email = "zoe@bücher.example"
    async with provider_for(configuration_set="ConfigSet") as (provider, fake):
        [result] = await provider.send([message])
    assert result.ok, result
    request = fake.received[0]["request"]
    assert request["ConfigurationSetName"] == "ConfigSet"
    [to] = request["Destination"]["ToAddresses"]
    assert to.isascii() and to.endswith("<zoe@xn--bcher-kva.example>") and "=?utf-8?" in to
    assert request["FromEmailAddress"] == "news@sender.test"
    headers = {h["Name"]: h["Value"] for h in request["Content"]["Simple"]["Headers"]}
    assert headers[REF_HEADER] == "9f8e:3"  # added when the message has none
    assert headers["X-Campaign"] == encoded_words("Frühling ✓")
    assert "Html" not in request["Content"]["Simple"]["Body"]
    word = headers["X-Campaign"].split("?")[3]
    assert base64.b64decode(word).decode() == "Frühling ✓"


def test_request_body_refuses_what_ses_would() -> None:
    [message] = make_messages(1)
    message.headers = {f"X-H{i}": "v" for i in range(15)}
    with pytest.raises(ValueError, match="at most 15"):
        request_body(message)  # 15 + the ref header
    message.headers = {"Bad:Name": "v"}
    with pytest.raises(ValueError, match="header name"):
        request_body(message)
    message.headers = {"X-Long": "v" * 996}
    with pytest.raises(ValueError, match="too long"):
        request_body(message)
    assert ref_from_tag(ref_tag("batch-id:12345")) == "batch-id:12345"
    assert len(encoded_words("ü" * 200).split(" ")) > 1
    assert all(len(w) <= 75 for w in encoded_words("ü✓" * 100).split(" "))


async def test_a_message_ses_cannot_take_fails_alone_without_a_request() -> None:
    messages = make_messages(3)
    messages[1].headers["Bad:Name"] = "x"
    async with provider_for() as (provider, fake):
        results = await provider.send(messages)
    assert [r.ok for r in results] == [True, False, True]
    assert not results[1].retryable and "header name" in (results[1].error or "")
    assert fake.requests == 2


# kind -> what the result must say (besides ok=False)
EXPECTED = {
    "throttle": {"retryable": True, "throttled": True, "hold": False, "pause_reason": None},
    "quota": {"retryable": False, "throttled": False, "hold": True, "pause_reason": None},
    "suspended": {"retryable": False, "throttled": False, "hold": False},
    "paused": {"retryable": False, "throttled": False, "hold": False},
    "reject": {"retryable": False, "throttled": False, "hold": False, "pause_reason": None},
    "mail_from": {"retryable": False, "throttled": False, "hold": False, "pause_reason": None},
    "not_found": {"retryable": False, "throttled": False, "hold": False, "pause_reason": None},
    "bad_request": {"retryable": False, "throttled": False, "hold": False, "pause_reason": None},
    "error": {"retryable": True, "throttled": False, "hold": False, "pause_reason": None},
    "unavailable": {"retryable": True, "throttled": False, "hold": False, "pause_reason": None},
}


@pytest.mark.parametrize("style", ["header", "body"])
@pytest.mark.parametrize("kind", sorted(FAILURES))
async def test_each_ses_error_is_mapped(kind: str, style: str) -> None:
    assert set(EXPECTED) == set(FAILURES)
    messages = make_messages(3)
    async with provider_for(FakeSes(error_style=style), concurrency=1) as (provider, fake):
        fake.fail(kind, to=messages[0].to_email)
        results = await provider.send(messages)
    first = results[0]
    assert not first.ok and first.ref == messages[0].ref
    assert {k: v for k, v in asdict(first).items() if k in EXPECTED[kind]} == EXPECTED[kind]
    code = FAILURES[kind][1]
    assert code in (first.error or "")
    if kind in ("suspended", "paused"):
        assert first.pause_reason and code in first.pause_reason
    stops = kind in ("throttle", "quota", "suspended", "paused")
    if stops:  # SES refuses the account: the rest of the call is not sent
        assert fake.requests == 1 and not fake.received
        for rest in results[1:]:
            assert (rest.retryable, rest.throttled, rest.hold, rest.pause_reason) == (
                first.retryable,
                first.throttled,
                first.hold,
                first.pause_reason,
            )
            assert not rest.ok and "not sent" in (rest.error or "")
    else:  # only that message failed
        assert fake.requests == 3 and [r.ok for r in results[1:]] == [True, True]
    assert_no_secrets(results)


async def test_retry_after_is_honoured() -> None:
    async with provider_for(FakeSes(retry_after="7")) as (provider, fake):
        fake.fail("throttle")
        [throttled] = await provider.send(make_messages(1))
        fake.fail("error")
        [failed] = await provider.send(make_messages(1))
    assert throttled.throttled and throttled.retry_after == 7.0
    assert failed.retryable and failed.retry_after == 7.0


async def test_an_error_text_holds_no_address() -> None:
    async with provider_for() as (provider, fake):
        fake.fail("reject")
        [result] = await provider.send(make_messages(1))
    assert fake.refused[0]["message"].endswith("news@sender.test")  # SES names the sender
    assert result.error and "<address>" in result.error and "@" not in result.error
    assert_no_secrets([result])


async def test_a_tampered_signature_is_refused_by_the_fake() -> None:
    async with fake_ses() as (base_url, fake):
        url = base_url + SEND_EMAIL
        body = orjson.dumps(request_body(make_messages(1)[0]))

        def signed(data: bytes, **change: str) -> dict[str, str]:
            creds = {**TEST_CREDENTIALS, **change}
            signer = SigV4Auth(
                Credentials(creds["access_key_id"], creds["secret_access_key"]),
                "ses",
                change.get("region", TEST_REGION),
            )
            request = AWSRequest(
                "POST", url, data=data, headers={"Content-Type": "application/json"}
            )
            signer.add_auth(request)
            return dict(request.headers.items())

        async def post(data: bytes, headers: dict[str, str]) -> tuple[int, str]:
            async with aiohttp.ClientSession() as session:
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("x-amzn-ErrorType", "")

        good = signed(body)
        assert await post(body, good) == (200, "")
        tampered_body = body.replace(b"Hello 0", b"Hello 1")
        assert (await post(tampered_body, good))[0] == 403
        auth = good["Authorization"]
        flipped = auth[:-1] + ("0" if auth[-1] != "0" else "1")
        assert (await post(body, dict(good, Authorization=flipped)))[0] == 403
        wrong_secret = signed(body, secret_access_key="not-the-secret")
        assert await post(body, wrong_secret) == (403, "InvalidSignatureException:")
        wrong_key = signed(body, access_key_id="AKIAOTHERKEY00000000")
        assert await post(body, wrong_key) == (403, "UnrecognizedClientException:")
        other_region = signed(body, region="us-east-1")
        assert (await post(body, other_region))[0] == 403
        unsigned = {"Content-Type": "application/json"}
        assert (await post(body, unsigned))[1] == "MissingAuthenticationTokenException:"
        changed_date = dict(good, **{"X-Amz-Date": "20200101T000000Z"})
        assert (await post(body, changed_date))[0] == 403
        fake.clock = lambda: time.time() + 3600  # a signature an hour old
        assert (await post(body, good))[0] == 403
        assert len(fake.received) == 1
        assert {r["code"] for r in fake.refused} >= {
            "InvalidSignatureException",
            "UnrecognizedClientException",
            "MissingAuthenticationTokenException",
        }


async def test_an_adapter_with_a_wrong_secret_pauses_without_leaking_it() -> None:
    credentials = {"secret_access_key": "wrong/secret/key/0123456789abcdef0123456"}
    async with provider_for(credentials=credentials) as (provider, fake):
        results = await provider.send(make_messages(5))
    assert fake.refused[0]["code"] == "InvalidSignatureException"
    assert fake.requests <= 10 and not fake.received
    for result in results:
        assert not result.ok and not result.retryable and result.pause_reason
        assert credentials["secret_access_key"] not in (result.error or "")
        assert credentials["secret_access_key"] not in result.pause_reason
    assert_no_secrets(results)
    assert "wrong/secret" not in repr(provider)


async def test_temporary_credentials_send_their_session_token() -> None:
    token = "FwoGZXIvYXdzEJr//////////session-token-for-tests"
    async with provider_for(FakeSes(session_token=token), credentials={"session_token": token}) as (
        provider,
        fake,
    ):
        [ok] = await provider.send(make_messages(1))
    async with provider_for(FakeSes(session_token=token)) as (provider, fake_without):
        [refused] = await provider.send(make_messages(1))
    assert ok.ok and fake.received
    assert refused.pause_reason and not fake_without.received
    assert token not in (refused.error or "")


async def test_the_fake_checks_the_request_as_ses_does() -> None:
    async with fake_ses() as (base_url, fake):
        creds = Credentials(
            TEST_CREDENTIALS["access_key_id"], TEST_CREDENTIALS["secret_access_key"]
        )

        async def send(payload: Any, content_type: str = "application/json") -> int:
            data = orjson.dumps(payload)
            request = AWSRequest(
                "POST", base_url + SEND_EMAIL, data=data, headers={"Content-Type": content_type}
            )
            SigV4Auth(creds, "ses", TEST_REGION).add_auth(request)
            async with (
                aiohttp.ClientSession() as session,
                session.post(request.url, data=data, headers=dict(request.headers)) as resp,
            ):
                await resp.read()
                return resp.status

        good = request_body(make_messages(1)[0])
        assert await send(good) == 200
        many = dict(good, Destination={"ToAddresses": [f"u{i}@x.test" for i in range(51)]})
        assert await send(many) == 400  # more than 50 recipients
        fifty = dict(good, Destination={"ToAddresses": [f"u{i}@x.test" for i in range(50)]})
        assert await send(fifty) == 200
        headers = [{"Name": f"X-H{i}", "Value": "v"} for i in range(16)]
        too_many = {
            **good,
            "Content": {"Simple": {**good["Content"]["Simple"], "Headers": headers}},
        }
        assert await send(too_many) == 400  # the model's max of 15
        assert await send({**good, "Unknown": 1}) == 400
        assert await send({**good, "EmailTags": [{"Name": "ref", "Value": "a:b"}]}) == 400
        assert await send({k: v for k, v in good.items() if k != "Destination"}) == 400
        assert await send(good, content_type="text/plain") == 400
        assert len(fake.received) == 2
        assert fake.refused[0]["message"] == "Recipient count exceeds 50."


async def test_network_failures_are_retryable() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = SesProvider(account(f"http://127.0.0.1:{port}"))
    try:
        results = await provider.send(make_messages(2))
    finally:
        await provider.close()
    assert all(not r.ok and r.retryable and not r.throttled for r in results)
    assert_no_secrets(results)
    async with provider_for(FakeSes(latency=1.0), timeout=0.2) as (provider, _fake):
        [slow] = await provider.send(make_messages(1))
    assert not slow.ok and slow.retryable


async def test_empty_chunks_and_reopening_after_close() -> None:
    async with provider_for() as (provider, fake):
        assert await provider.send([]) == []
        assert (await provider.send(make_messages(1)))[0].ok
        await provider.close()
        assert (await provider.send(make_messages(1)))[0].ok
    assert fake.requests == 2


def test_an_account_without_what_ses_needs_is_refused() -> None:
    with pytest.raises(ValueError, match="access_key_id"):
        SesProvider(Account("ses", {"access_key_id": "AKIA"}, region="eu-west-1"))
    with pytest.raises(ValueError, match="region"):
        SesProvider(Account("ses", TEST_CREDENTIALS, region=None))
    with pytest.raises(ValueError, match="region") as info:
        SesProvider(Account("ses", TEST_CREDENTIALS, region="https://evil"))
    assert TEST_CREDENTIALS["secret_access_key"] not in str(info.value)


@pytest.mark.parametrize(
    ("status", "headers", "payload", "code", "kind"),
    [
        (429, {}, b'{"message":"Maximum sending rate exceeded."}', None, "throttled"),
        (
            400,
            {"x-amzn-ErrorType": "ThrottlingException:"},
            b"{}",
            "ThrottlingException",
            "throttled",
        ),
        (
            400,
            {},
            b'{"__type":"com.amazon#LimitExceededException","message":"x"}',
            "LimitExceededException",
            "hold",
        ),
        (
            400,
            {},
            b'{"code":"Throttling","message":"Daily message quota exceeded."}',
            "Throttling",
            "hold",
        ),
        (400, {}, b'{"__type":"SendingQuotaExceeded"}', "SendingQuotaExceeded", "hold"),
        (
            403,
            {},
            b'{"message":"The security token included in the request is invalid."}',
            None,
            "pause",
        ),
        (
            400,
            {"X-Amzn-Errortype": "SendingPausedException"},
            b"",
            "SendingPausedException",
            "pause",
        ),
        (400, {}, b'{"__type":"MessageRejected"}', "MessageRejected", "permanent"),
        (404, {}, b"<html>not found</html>", None, "permanent"),
        (500, {}, b"", None, "retry"),
        (502, {}, b"Bad Gateway", None, "retry"),
    ],
)
def test_error_codes_are_read_and_classified(
    status: int, headers: dict[str, str], payload: bytes, code: str | None, kind: str
) -> None:
    found, detail = error_code(headers, payload)
    assert found == code
    assert classify(status, found, detail) == kind


def test_scrub_removes_addresses_and_keys() -> None:
    text = "identities failed: a.b+c@example.com, <x@y.test>; key AKIAABCDEFGHIJKLMNOP secret s3"
    cleaned = scrub(text, ["s3cr3t-value", "s3"])
    assert "@" not in cleaned and "AKIA" not in cleaned and " s3" not in cleaned


# --- the credentials check (GetAccount, GET /v2/email/account) ----------------------------


async def test_check_signs_get_account_and_reports_the_quota() -> None:
    async with provider_for(FakeSes(max_24_hour_send=50_000, max_send_rate=14)) as (
        provider,
        fake,
    ):
        await provider.send(make_messages(2))
        result = await provider.check()
    detail = provider_support.checked(result, True, *SECRETS, call="GET /v2/email/account")
    assert detail == (
        f"the credentials work and sending is enabled in {TEST_REGION}; quota 50,000 per 24 h "
        "(2 sent), 14 per second"
    )
    assert result.quota == Quota(per_day=50_000, per_second=14, sent_last_24_hours=2)
    assert fake.refused == []  # the signature of the GET verified


async def test_check_without_a_24_hour_limit() -> None:
    async with provider_for(FakeSes(max_24_hour_send=-1)) as (provider, _):
        result = await provider.check()
    assert "quota no 24-hour limit (0 sent), 14 per second" in result.detail
    assert result.ok and result.quota == Quota(None, 14, 0)


async def test_check_sending_disabled_is_not_ok() -> None:
    async with provider_for(FakeSes(production_access=False)) as (provider, fake):
        fake.fail("paused")
        result = await provider.check()
        (sent,) = await provider.send(make_messages(1))
    detail = provider_support.checked(result, False, *SECRETS)
    assert detail.startswith("the credentials work, but sending is disabled for this SES account")
    assert "in the SES sandbox" in detail and result.quota is not None
    assert sent.pause_reason  # and sending is refused so
    async with provider_for() as (provider, fake):
        fake.fail("suspended")
        detail = provider_support.checked(await provider.check(), False, *SECRETS)
    assert "enforcement status SHUTDOWN" in detail


@pytest.mark.parametrize(
    "credentials, expected",
    [
        ({"access_key_id": "AKIAWRONGKEY0000TEST"}, "SES refused the credentials (HTTP 403 "
         "UnrecognizedClientException: The security token included in the request is invalid.)"),
        ({"secret_access_key": "another/secret/key+0123456789abcdefghijkl"},
         "SES refused the signature: is the secret access key right? (HTTP 403 "
         "InvalidSignatureException"),
    ],
)  # fmt: skip
async def test_check_refused_credentials(credentials: dict[str, str], expected: str) -> None:
    async with provider_for(credentials=credentials) as (provider, _):
        result = await provider.check()
    detail = provider_support.checked(result, False, *SECRETS, *credentials.values())
    assert detail.startswith(expected) and result.quota is None
    assert "AKIA" not in detail


async def test_check_a_send_only_policy_is_ok_with_a_note() -> None:
    async with provider_for(FakeSes(denied=frozenset({"GetAccount"}))) as (provider, _):
        result = await provider.check()
        (sent,) = await provider.send(make_messages(1))
    detail = provider_support.checked(result, True, *SECRETS)
    assert "may not call ses:GetAccount" in detail and "AccessDeniedException" in detail
    assert sent.ok and result.quota is None


async def test_check_a_throttled_or_failing_ses() -> None:
    async with provider_for() as (provider, fake):
        fake.fail("error")
        failing = provider_support.checked(await provider.check(), False, *SECRETS)
        fake.fail("throttle")
        throttled = provider_support.checked(await provider.check(), False, *SECRETS)
    assert failing.startswith("the provider had an error; try again later (HTTP 500)")
    assert throttled.startswith("SES is throttling the account")
