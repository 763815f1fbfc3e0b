"""Templates come from clients: the work a template can ask for is bounded (issue 8, defect 3),
and the fast form of plain templates renders exactly as Jinja2 does (property-based)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from engine.errors import ValidationError
from engine.templates import BatchTemplate, TemplateLimitError, _joined

BOMBS = [
    "{{ 7**6000000 }}",  # folded at compile time by plain Jinja2: seconds of CPU
    "{{ 10**5000 }}",  # more digits than int -> str allows: a 500 before
    "{{ (9**99)**99 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(9000) %}{% for j in range(9000) %}x{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ ['a'] * 10**9 }}",
    "{{ 'a'|center(1000000000) }}",
    "{{ ''.center(10**8) }}",
    "{{ 'x'.ljust(99999999) }}",
    "{{ '%100000000s' % 'a' }}",
    "{{ '%*s' % (100000000, 'a') }}",
    "{{ '{:>100000000}'.format(1) }}",
    "{{ lipsum(100000) }}",
    "{% set a = 'x' * 1000 %}{% set b = a~a~a~a~a~a~a~a~a~a %}{% set c = b~b~b~b~b~b~b~b~b~b %}"
    "{% set d = c~c~c~c~c~c~c~c~c~c %}{{ d ~ d }}",
    "{% set a = 'x' * 1000 %}{% set b = a+a+a+a+a+a+a+a+a+a %}{% set c = b+b+b+b+b+b+b+b+b+b %}"
    "{% set d = c+c+c+c+c+c+c+c+c+c %}{{ d + d }}",
    "{{ 'ab'|replace('a', 'x' * 999999) * 3 }}",
]


@pytest.mark.parametrize("source", BOMBS)
def test_work_and_memory_bombs_are_refused(source: str) -> None:
    template = BatchTemplate(source, None, None)  # compiles without folding anything huge
    with pytest.raises(SecurityError):
        template.render("a@example.com", "Ann", {})


@pytest.mark.parametrize(
    "source",
    [
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{% for x in items recursive %}{{ loop(x) }}{% endfor %}",
        "{% call f() %}x{% endcall %}",
        "{% include 'other' %}",
        "{% extends 'base' %}",
        "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",  # RecursionError in Jinja2's parser
        "{{ " + "1" * 6000 + " }}",  # an integer literal Python will not print
    ],
)
def test_what_cannot_be_bounded_is_refused_at_compile_time(source: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchTemplate("subject", source, None)
    assert caught.value.code == "invalid_template"
    assert caught.value.details == {"field": "html"}


def test_namespace_cannot_carry_state_across_loop_iterations() -> None:
    template = BatchTemplate(
        "{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
        "{% endfor %}{{ ns.x }}",
        None,
        None,
    )
    with pytest.raises(Exception, match="namespace"):
        template.render("a@example.com", None, {})


def test_the_iteration_budget_is_per_message_and_shared_by_its_parts() -> None:
    loop = "{% for i in range(6000) %}.{% endfor %}"
    assert len(BatchTemplate(loop, None, None).render("a@example.com", None, {}).subject) == 6000
    both = BatchTemplate(loop, loop, None)  # 12,000 iterations for one message
    with pytest.raises(TemplateLimitError):
        both.render("a@example.com", None, {})
    # ... and a new message has a new budget.
    assert BatchTemplate(loop, None, None).render("b@example.com", None, {}).subject


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "{{ name|upper }} {{ 2 ** 10 }} {{ 'ab' * 3 }} {{ '%05d' % 42 }}",
            "ANN 1024 ababab 00042",
        ),
        ("{% for i in items %}{{ loop.index }}:{{ i }} {% endfor %}", "1:x 2:y "),
        ("{% if vip %}Dear {{ name|title }}{% else %}Hi{% endif %}", "Dear Ann"),
        ("{{ items|join(', ') }} {{ 'x'|center(5) }}|{{ name ~ '!' }}", "x, y   x  |ann!"),
        ("{% set total = 3 * 4 %}{{ total }} {{ (price * 1.5)|round(1) }}", "12 3.0"),
        ("{{ range(3)|list }} {{ items|length }}", "[0, 1, 2] 2"),
    ],
)
def test_ordinary_templates_still_work(source: str, expected: str) -> None:
    rendered = BatchTemplate(source, None, None).render(
        "a@example.com", "ann", {"items": ["x", "y"], "vip": True, "price": 2}
    )
    assert rendered.subject == expected


_text = st.text(alphabet=st.sampled_from(list("ab {}%#\r\n\t<&>\"'-")), max_size=30)
_name = st.sampled_from(["name", "email", "code", "x_1", "true", "if", "none"])


@st.composite
def plain_templates(draw: st.DrawFn) -> str:
    parts = draw(
        st.lists(st.tuples(_text, _name, st.sampled_from(["", " ", "  ", "\n"])), max_size=6)
    )
    tail = draw(_text)
    return "".join(f"{text}{{{{{pad}{name}{pad}}}}}" for text, name, pad in parts) + tail


@settings(max_examples=400, deadline=None)
@given(source=plain_templates(), html=st.booleans())
def test_the_fast_form_renders_exactly_like_jinja(source: str, html: bool) -> None:
    """Whenever the fast form takes a template, its output is Jinja2's, byte for byte."""
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=html)
    context = {"name": '<Ann & "Bo">', "email": "a@b.example", "code": 42, "x_1": None}
    fast = _joined(source, html)
    if fast is None:
        return
    try:
        expected = env.from_string(source).render(context)
    except Exception as exc:  # Jinja2 refuses it: the fast form must not have taken it
        raise AssertionError(f"fast form took a template Jinja2 refuses: {exc!r}") from None
    assert fast.render(context) == expected
