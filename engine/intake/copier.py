"""Recipients into PostgreSQL: blocks of rows validated and COPYed at once.

Every row is checked (address, name, vars against the template) on the intake's hot path;
the first few are rendered. Bad rows are all reported, up to ``MAX_REPORTED_ERRORS``, by
their 1-based recipient number, and a bad row anywhere rolls the whole upload back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable
from typing import Any

import asyncpg
import orjson
from asyncpg.pgproto.pgproto import UUID as PgUUID

from engine.errors import PayloadTooLarge, TooManyRequests, ValidationError
from engine.intake.decoders import BadRow
from engine.intake.fields import EMAIL, summary, valid_email
from engine.templates import BatchTemplate
from engine.tenants import Limits

MAX_REPORTED_ERRORS = 100
_RECIPIENT_KEYS = frozenset({"email", "name", "vars"})
MAX_NAME_CHARS = 200  # a recipient's name (the fast check in records() says 200 too)
RENDER_CHECK_ROWS = 10  # recipients rendered at intake


class RecipientCopier:
    """Validates blocks of rows and turns them into COPY records; remembers the bad ones."""

    def __init__(
        self,
        batch_id: uuid.UUID,
        template: BatchTemplate,
        status: str,
        limits: Limits,
        first: int = 1,
    ) -> None:
        self.batch_id = PgUUID(str(batch_id))  # asyncpg's own type: copied without conversion
        self.required = template.required_vars
        self.template = template
        self.status = status
        self.limits = limits
        self.count = first - 1  # rows before this upload (appending to a draft)
        self.to_render = RENDER_CHECK_ROWS
        self.invalid = 0
        self.errors: list[dict[str, Any]] = []

    def _bad(self, row: int, field_name: str, message: str) -> None:
        self.invalid += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"row": row, "field": field_name, "message": message})

    def _check(self, row: int, item: Any) -> None:
        """Note what is wrong with a row that ``records`` did not take."""
        if isinstance(item, BadRow):
            return self._bad(row, "row", item.message)
        if not isinstance(item, dict):
            return self._bad(row, "row", "must be an object with an email")
        if not valid_email(item.get("email")):
            return self._bad(row, "email", "is not a valid e-mail address")
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            return self._bad(row, "name", "must be a string")
        if name is not None and len(name) > MAX_NAME_CHARS:
            return self._bad(row, "name", f"must be at most {MAX_NAME_CHARS} characters")
        vars_ = item.get("vars")
        if vars_ is not None and not isinstance(vars_, dict):
            return self._bad(row, "vars", "must be an object")
        missing = self.template.missing(vars_)
        if missing:
            return self._bad(row, "vars", f"unknown template variable(s): {', '.join(missing)}")
        if not item.keys() <= _RECIPIENT_KEYS:
            return self._bad(row, sorted(item.keys() - _RECIPIENT_KEYS)[0], "unknown field")
        raise AssertionError(f"row {row} is valid; records() should have taken it")

    def records(self, block: list[Any]) -> list[tuple]:
        """COPY records of one block (none once a bad row was seen: it will all roll back).

        The loop is the intake's hot path: one inlined test for a good row; ``_check``
        only runs for a bad one, to name what is wrong with it.
        """
        first = self.count + 1
        self.count += len(block)
        limit = self.limits.max_batch_recipients
        if self.count > limit:
            message = f"a batch may have at most {limit} recipients; split it into several"
            if self.limits.own_recipient_limit:
                raise TooManyRequests(
                    message,
                    {"limit": "max_batch_recipients", "value": limit},
                    retry_after=3600,
                    code="too_many_recipients",
                )
            raise PayloadTooLarge(message, {"max_recipients": limit})
        out = []
        append, match, known = out.append, EMAIL.fullmatch, _RECIPIENT_KEYS.issuperset
        batch_id, status, required = self.batch_id, self.status, self.required
        for row, item in enumerate(block, first):
            if type(item) is dict:
                email, name, vars_ = item.get("email"), item.get("name"), item.get("vars")
                if (
                    type(email) is str
                    and len(email) <= 254
                    and match(email) is not None
                    and (name is None or (type(name) is str and len(name) <= 200))
                    and (vars_ is None or type(vars_) is dict)
                    and (not required or (vars_ is not None and required <= vars_.keys()))
                    and known(item)
                ):
                    append((batch_id, row, email, name, vars_ or None, status))
                    continue
            self._check(row, item)
        if self.to_render and out:
            self._render_first(out)
        return [] if self.invalid else out

    def _render_first(self, records: list[tuple]) -> None:
        """Render the first recipients now: a template that fails for them (``{{ 1/0 }}``,
        a value of the wrong type, a limit) is named here instead of failing at send time."""
        for record in records[: self.to_render]:
            try:
                self.template.render(record[2], record[3], record[4])
            except Exception as exc:  # whatever the template raises for this recipient
                self._bad(record[1], "template", f"cannot be rendered: {exc}"[:300])
        self.to_render = max(0, self.to_render - len(records))

    def _unstorable(self, records: list[tuple]) -> None:
        """Name the rows of a block PostgreSQL's COPY could not take (vars nested deeper
        than JSON encoding allows)."""
        for record in records:
            try:
                orjson.dumps(record[4])
            except orjson.JSONEncodeError as exc:
                self._bad(record[1], "vars", f"cannot be stored: {exc}")

    def raise_if_invalid(self) -> None:
        if self.invalid:
            raise ValidationError(
                summary(self.errors, self.invalid),
                {"errors": self.errors, "invalid_rows": self.invalid},
                code="invalid_recipients",
            )

    async def copy(self, conn: asyncpg.Connection, blocks: AsyncIterable[list[Any]]) -> None:
        """Parse and COPY at once: while PostgreSQL takes one block, the next is validated."""
        ready: asyncio.Queue[list[tuple] | None] = asyncio.Queue(maxsize=2)

        async def produce() -> None:
            pending: list[tuple] = []  # records of several blocks: one COPY per ~10,000
            try:
                async for block in blocks:
                    pending += self.records(block)
                    if len(pending) >= COPY_ROWS:
                        await ready.put(pending)
                        pending = []
                    await asyncio.sleep(0)  # a large upload never holds the event loop long
                if pending and not self.invalid:
                    await ready.put(pending)
            finally:
                await ready.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (records := await ready.get()) is not None:
                try:
                    await conn.copy_records_to_table(
                        "recipients", records=records, columns=_COPY_COLUMNS
                    )
                except orjson.JSONEncodeError:
                    self._unstorable(records)
                    break
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        if not producer.cancelled():  # cancelled here only after a block COPY refused
            await producer  # re-raises a parse error (bad encoding, too many recipients)
        self.raise_if_invalid()


_COPY_COLUMNS = ["batch_id", "seq", "email", "name", "vars", "status"]
# Recipients per COPY statement: blocks are parsed a few thousand at a time (the event
# loop stays free), but each COPY has a round trip of its own, so several go in one.
COPY_ROWS = 10_000
