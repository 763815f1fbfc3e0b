"""Per-recipient templates: ``{{ var }}`` in subject, html and text, via sandboxed Jinja2.

A batch's templates are compiled once (``BatchTemplate``); each recipient supplies
``email``, ``name`` and the keys of its ``vars``. HTML output escapes values; subject and
text do not. Variables a template uses but a recipient lacks are found at intake.

Rendering is on the hot path (once per recipient). A template that is only text and
``{{ var }}`` placeholders (the common case) is recognised by one regular expression and
rendered by joining its parts: the same output as Jinja2 at a tenth of the cost (about
2 µs instead of 20 µs per recipient, see bench/RESULTS.md), and compiled in linear time
(Jinja2's own lexer needs seconds for a large template). Anything else (filters,
conditions, loops) is compiled and rendered by Jinja2 itself, in a sandbox that bounds
the work a template can ask for, because templates come from clients:

- no macros, ``call`` blocks, recursive loops, includes or imports, and no ``namespace``;
- every loop iteration counts against ``MAX_ITERATIONS`` per message;
- ``**``, ``*``, ``%``, ``+`` and ``~`` refuse results past ``MAX_VALUE_CHARS`` characters
  (or ``MAX_INT_BITS`` bits), so nothing is folded into a huge constant at compile time;
- numbers passed to functions and filters (``center(10**9)``) are at most ``MAX_ARGUMENT``;
- ``str.format`` is not reachable, and each rendered part is at most ``MAX_OUTPUT_CHARS``.
A template that breaks a bound raises ``TemplateLimitError`` (a Jinja2 ``SecurityError``):
intake names it for the first recipients it renders, and a worker fails the recipient.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, soft_str

from engine.errors import ValidationError

BUILTIN_VARIABLES = frozenset({"email", "name"})
MAX_ITERATIONS = 10_000  # loop iterations per message, all loops and parts together
MAX_VALUE_CHARS = 1_000_000  # one string or list built by an operator or a filter
MAX_INT_BITS = 4096  # one integer built by an operator (about 1,200 digits)
MAX_ARGUMENT = 10_000  # a number passed to a function or filter
MAX_OUTPUT_CHARS = 2 << 20  # one rendered part (subject, html or text)


class TemplateLimitError(SecurityError):
    """A template asked for more work or memory than a message may take."""


_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("template_budget")


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's iterable, each item paid for from the message's iteration budget."""
    budget = _budget.get(None)
    if budget is None:  # rendered outside BatchTemplate.render: a budget of its own
        budget = [MAX_ITERATIONS]
    for item in iterable:
        budget[0] -= 1
        if budget[0] < 0:
            raise TemplateLimitError(f"loops ran more than {MAX_ITERATIONS} times")
        yield item


def _sized(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_VALUE_CHARS:
        raise TemplateLimitError(f"a value longer than {MAX_VALUE_CHARS} was built")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"a number larger than 2**{MAX_INT_BITS} was built")
    return value


def _joined_parts(*parts: Any) -> str:
    """Jinja2's ``~`` (its ``markup_join``), bounded."""
    texts = [soft_str(p) for p in parts]
    if sum(map(len, texts)) > MAX_VALUE_CHARS:
        raise TemplateLimitError(f"a value longer than {MAX_VALUE_CHARS} was built")
    if any(hasattr(p, "__html__") for p in parts):
        return Markup("").join(texts)
    return "".join(texts)


def _check_arguments(args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_ARGUMENT:
            raise TemplateLimitError(f"numbers passed to functions are at most {MAX_ARGUMENT}")


def _limit_operands(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be huge, before computing it."""
    if operator == "**":
        if not isinstance(left, int | float) or not isinstance(right, int | float):
            return
        if abs(right) > 1024 or (
            isinstance(left, int) and abs(left).bit_length() * right > MAX_INT_BITS
        ):
            raise TemplateLimitError(f"a number larger than 2**{MAX_INT_BITS} was asked for")
    elif operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(count, int):
                if len(seq) * count > MAX_VALUE_CHARS:
                    raise TemplateLimitError(f"a value longer than {MAX_VALUE_CHARS} was asked for")
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError(f"a number larger than 2**{MAX_INT_BITS} was asked for")
    elif operator == "%" and isinstance(left, str):
        values = right.values() if isinstance(right, Mapping) else right
        _check_arguments(
            values if isinstance(values, Iterable) and not isinstance(values, str) else [values]
        )
        if re.search(r"%[^a-zA-Z%]*\d{5}", left):
            raise TemplateLimitError("format widths are at most 9999")


def _bounded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose numeric arguments are bounded and whose result is sized."""

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args)
        _check_arguments(kwargs.values())
        return _sized(function(*args, **kwargs))

    return bounded


class _Bounded(SandboxedEnvironment):
    """Jinja2's sandbox with the work a template may ask for bounded (module docstring)."""

    intercepted_binops = frozenset({"**", "*", "%", "+"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=autoescape)
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}
        del self.globals["namespace"], self.globals["lipsum"]
        self.globals["range"] = _bounded_filter(self.globals["range"])
        self.globals["_bs_counted"] = _counted
        self.globals["_bs_joined"] = _joined_parts

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _limit_operands(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_arguments(args)
        _check_arguments(kwargs.values())
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in ("format", "format_map"):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        return None  # str.format is refused (``is_safe_attribute``), not sandboxed


_plain = _Bounded(autoescape=False)
_html = _Bounded(autoescape=True)
_REFUSED = (
    nodes.Macro,
    nodes.CallBlock,
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
    nodes.Block,
)


class _Bounder(NodeTransformer):
    """Refuses what cannot be bounded; makes loops and ``~`` pay for their work."""

    def __init__(self, field: str) -> None:
        self.field = field

    def _refuse(self, what: str) -> ValidationError:
        return ValidationError(
            f"{self.field}: {what} not available in templates",
            {"field": self.field},
            code="invalid_template",
        )

    def generic_visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> nodes.Node:
        if isinstance(node, _REFUSED):
            raise self._refuse(f"'{type(node).__name__.lower()}' is")
        return super().generic_visit(node, *args, **kwargs)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        if node.recursive:
            raise self._refuse("recursive loops are")
        node = self.generic_visit(node)
        node.iter = _call("_bs_counted", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return _call("_bs_joined", node.nodes, node.lineno)


def _call(function: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    return nodes.Call(nodes.Name(function, "load"), args, [], None, None, lineno=lineno)


class _Joined:
    """A template of text and ``{{ name }}`` parts, rendered by one ``str.format_map``
    (``format(value, "")`` is ``str(value)`` for every JSON value, as Jinja2 prints them)."""

    __slots__ = ("parts", "escape", "_format", "_names")

    def __init__(self, parts: list[tuple[bool, str]], html: bool):
        self.parts = parts
        self.escape = html
        self._format = "".join(
            t.replace("{", "{{").replace("}", "}}") if literal else "{" + t + "}"
            for literal, t in parts
        )
        self._names = tuple(dict.fromkeys(t for literal, t in parts if not literal))

    def render(self, context: Mapping[str, Any]) -> str:
        try:
            if self.escape:
                return self._format.format_map({n: _escaped(context[n]) for n in self._names})
            return self._format.format_map(context)
        except KeyError as exc:  # as Jinja2's StrictUndefined
            raise UndefinedError(f"{exc.args[0]!r} is undefined") from None


def _escaped(value: Any) -> str:
    """``value`` printed and HTML-escaped exactly as ``markupsafe.escape`` does for every
    JSON value (none has ``__html__``), at a third of its cost."""
    text = value if type(value) is str else str(value)
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&#39;")
        .replace('"', "&#34;")
    )


_PLACEHOLDER = re.compile(r"\{\{[ \t\r\n]*([A-Za-z_][A-Za-z0-9_]*)[ \t\r\n]*\}\}")
_NEWLINE = re.compile(r"\r\n|\r|\n")
# Names Jinja2 reads as constants or operators rather than variables.
_NOT_NAMES = frozenset(
    {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if", "else"}
)


def _joined(source: str, html: bool) -> _Joined | None:
    """The fast form of a template of text and ``{{ name }}`` only, rendering exactly as
    Jinja2 does (newlines normalised, one trailing newline dropped); None otherwise."""
    pieces = _PLACEHOLDER.split(source)
    names = pieces[1::2]
    texts = pieces[::2]
    if (
        any("{{" in t or "{%" in t or "{#" in t for t in texts)
        or any(t.endswith("{") for t in texts[:-1])  # '{{{ x }}' is Jinja2's dict syntax
        or _NOT_NAMES.intersection(names)
    ):
        return None
    texts = [_NEWLINE.sub("\n", t) for t in texts]
    if texts[-1].endswith("\n"):
        texts[-1] = texts[-1][:-1]
    parts: list[tuple[bool, str]] = []
    for index, text in enumerate(texts):
        if text:
            parts.append((True, text))
        if index < len(names):
            parts.append((False, names[index]))
    return _Joined(parts, html)


def _compile(env: _Bounded, field: str, source: str | None) -> tuple[Any, set[str]]:
    if source is None:
        return None, set()
    fast = _joined(source, env.autoescape is True)
    if fast is not None:
        return fast, {t for literal, t in fast.parts if not literal}
    try:
        ast = env.parse(source)
        used = set(meta.find_undeclared_variables(ast))
        bounded = _Bounder(field).visit(ast)
        bounded.set_environment(env)
        return env.from_string(bounded), used
    except TemplateSyntaxError as exc:
        raise ValidationError(
            f"{field}: template syntax error on line {exc.lineno}: {exc.message}",
            {"field": field},
            code="invalid_template",
        ) from None
    except ValidationError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, SecurityError) as exc:
        raise ValidationError(
            f"{field}: the template cannot be compiled: {exc}"[:300],
            {"field": field},
            code="invalid_template",
        ) from None


@dataclass(slots=True)
class Rendered:
    subject: str
    html: str | None
    text: str | None


class BatchTemplate:
    """The compiled subject/html/text of one batch.

    Compiling a large template that needs Jinja2 takes a while: callers on an event loop
    compile with ``await asyncio.to_thread(BatchTemplate, ...)``.
    """

    def __init__(self, subject: str, html: str | None, text: str | None):
        self._subject, used_subject = _compile(_plain, "subject", subject)
        self._html, used_html = _compile(_html, "html", html)
        self._text, used_text = _compile(_plain, "text", text)
        self._fast = all(
            isinstance(p, _Joined | None) for p in (self._subject, self._html, self._text)
        )
        self.variables = frozenset(used_subject | used_html | used_text)
        self.required_vars = self.variables - BUILTIN_VARIABLES

    def missing(self, vars_: Mapping[str, Any] | None) -> list[str]:
        """The template variables this recipient does not supply (empty when it can render)."""
        if not self.required_vars:
            return []
        if not vars_:
            return sorted(self.required_vars)
        return sorted(v for v in self.required_vars if v not in vars_)

    def render(self, email: str, name: str | None, vars_: Mapping[str, Any] | None) -> Rendered:
        """The recipient's message. Raises what the template raises for this recipient
        (``UndefinedError``, ``SecurityError``, ``TemplateLimitError``, ``TypeError``...)."""
        context = dict(vars_) if vars_ else {}
        context["email"] = email
        context["name"] = name or ""
        if self._fast:
            return Rendered(
                self._subject.render(context),
                self._html.render(context) if self._html is not None else None,
                self._text.render(context) if self._text is not None else None,
            )
        token = _budget.set([MAX_ITERATIONS])
        try:
            parts = [
                None if part is None else _output(part.render(context))
                for part in (self._subject, self._html, self._text)
            ]
        finally:
            _budget.reset(token)
        return Rendered(parts[0] or "", parts[1], parts[2])


def _output(text: str) -> str:
    if len(text) > MAX_OUTPUT_CHARS:
        raise TemplateLimitError(f"a rendered part is longer than {MAX_OUTPUT_CHARS} characters")
    return text
