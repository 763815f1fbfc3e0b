"""engine.templates: variables, escaping, missing variables, syntax errors, the sandbox."""

from __future__ import annotations

import pytest
from jinja2.exceptions import SecurityError, UndefinedError

from engine.errors import ValidationError
from engine.templates import BatchTemplate


def test_variables_are_found_in_every_part() -> None:
    template = BatchTemplate(
        "Hello {{ name }}, {{ greeting }}",
        "<p>{{ offer }} for {{ email }}</p>",
        "{{ offer }} / {{ footer }}",
    )
    assert template.variables == {"name", "greeting", "offer", "email", "footer"}
    assert template.required_vars == {"greeting", "offer", "footer"}  # email/name are built in


def test_variables_inside_blocks_filters_and_loops() -> None:
    template = BatchTemplate(
        "{{ email | upper }}",
        None,
        "{% if vip %}VIP{% endif %}{% for item in items %}{{ item }}{% endfor %}"
        "{% set local = 1 %}{{ local }}",
    )
    # ``item`` and ``local`` are defined by the template itself.
    assert template.required_vars == {"vip", "items"}


def test_no_variables() -> None:
    template = BatchTemplate("Plain subject", None, "Plain text")
    assert template.variables == frozenset()
    assert template.missing(None) == []
    assert template.missing({}) == []


def test_html_escapes_values_and_plain_text_does_not() -> None:
    template = BatchTemplate(
        "Re: {{ item }}", "<p>{{ item }} for {{ name }}</p>", "Text: {{ item }}"
    )
    value = '<script>alert("x")</script> & co'
    rendered = template.render("a@example.com", "<Ann>", {"item": value})
    assert rendered.subject == f"Re: {value}"
    assert rendered.text == f"Text: {value}"
    assert rendered.html == (
        "<p>&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co for &lt;Ann&gt;</p>"
    )
    assert "<script>" not in rendered.html


def test_markup_in_the_template_itself_is_kept() -> None:
    rendered = BatchTemplate("s", "<b>{{ v }}</b>", None).render("a@example.com", None, {"v": 1})
    assert rendered.html == "<b>1</b>"
    assert rendered.text is None


def test_builtin_variables_are_filled() -> None:
    template = BatchTemplate("For {{ email }}", None, "Hi {{ name }}!")
    rendered = template.render("bob@example.com", None, None)
    assert rendered.subject == "For bob@example.com"
    assert rendered.text == "Hi !"  # no name: empty, not an error
    assert template.render("bob@example.com", "Bob", {}).text == "Hi Bob!"


def test_builtin_variables_win_over_vars() -> None:
    rendered = BatchTemplate("{{ email }}", None, "x").render(
        "real@example.com", None, {"email": "spoof@example.com"}
    )
    assert rendered.subject == "real@example.com"


def test_missing_variables() -> None:
    template = BatchTemplate("{{ a }}", "{{ b }}", "{{ c }} {{ name }}")
    assert template.missing(None) == ["a", "b", "c"]
    assert template.missing({}) == ["a", "b", "c"]
    assert template.missing({"b": 1, "x": 2}) == ["a", "c"]
    assert template.missing({"a": None, "b": "", "c": 0}) == []  # present counts, not truthy


def test_rendering_with_a_missing_variable_raises() -> None:
    template = BatchTemplate("{{ a }}", None, "x")
    with pytest.raises(UndefinedError):
        template.render("a@example.com", None, {})


@pytest.mark.parametrize(
    ("subject", "html", "text", "field"),
    [
        ("Hi {{ name", None, "x", "subject"),
        ("ok", "{% for x in y %}", None, "html"),
        ("ok", None, "{% if %}", "text"),
        ("ok", "{{ }}", None, "html"),
        ("ok", None, "{% endblock %}", "text"),
    ],
)
def test_syntax_error_is_a_validation_error(
    subject: str, html: str | None, text: str | None, field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchTemplate(subject, html, text)
    error = caught.value
    assert error.code == "invalid_template"
    assert error.status == 422
    assert error.details == {"field": field}
    assert error.message.startswith(f"{field}: template syntax error on line 1")


def test_syntax_error_reports_its_line() -> None:
    with pytest.raises(ValidationError) as caught:
        BatchTemplate("ok", None, "line one\nline two\n{{ broken")
    assert "line 3" in caught.value.message


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ email.__class__ }}",
        "{{ vars_obj.__init__.__globals__ }}",
    ],
)
def test_sandbox_blocks_unsafe_attribute_access(source: str) -> None:
    template = BatchTemplate("s", source, None)
    with pytest.raises(SecurityError):
        template.render("a@example.com", None, {"vars_obj": object()})


def test_sandbox_blocks_unsafe_access_in_plain_text_too() -> None:
    template = BatchTemplate("{{ name.__class__.__base__ }}", None, "x")
    with pytest.raises(SecurityError):
        template.render("a@example.com", "Ann", None)


def test_safe_attribute_and_method_access_still_works() -> None:
    template = BatchTemplate("{{ name.upper() }} {{ user.city }}", None, "x")
    rendered = template.render("a@example.com", "ann", {"user": {"city": "Oslo"}})
    assert rendered.subject == "ANN Oslo"


@pytest.mark.parametrize(
    "source",
    [
        "Hi {{ name }}!",
        "{{ code }}",
        "plain text only",
        "",
        "trailing newline {{ name }}\n",
        "<p>{{ name }} &amp; {{ code }}</p>\n\n",
        "{{ name }}{{ code }}{{ email }}",
    ],
)
@pytest.mark.parametrize("html", [False, True])
def test_joined_templates_render_exactly_like_jinja(source: str, html: bool) -> None:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from engine.templates import _joined

    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=html)
    context = {"name": '<Ann & "Bo">', "code": 42, "email": "a@b.example"}
    fast = _joined(source, html)
    assert fast is not None
    assert fast.render(context) == env.from_string(source).render(context)


def test_templates_with_logic_are_left_to_jinja() -> None:
    from engine.templates import _joined

    for source in (
        "{{ name|upper }}",
        "{% if name %}x{% endif %}",
        "{{ vars.code }}",
        "{{ 1 + 2 }}",
        "{{- name }}",
        "{{ true }}",
        "{# note #}{{ name }}",
    ):
        assert _joined(source, False) is None
