"""The chat template's render: its bounds (calls, time, the size of the values it makes), the globals it
is given (``tools`` and ``documents`` as None, no ``lipsum``) and the special tokens of
special_tokens_map.json, as transformers renders templates."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import pytest
from tiltsmc.models import chat
from tiltsmc.models.tokenizer import load_tokenizer
from time_limits import at_most

CHAT = Path(__file__).parent / "fixtures" / "models" / "chat-tiny"
MESSAGES = [{"role": "user", "content": "ab"}]
BOUND = r"^chat template: stopped, a bound on its work: "

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM: POSIX")


def _refused(template: str, match: str) -> None:
    with at_most(5.0), pytest.raises(ValueError, match=match):
        chat.render_chat_template(template, MESSAGES, {})


EXPONENTIAL = "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}"


def test_a_macro_recursion_is_stopped_by_the_call_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A macro calling itself twice, 40 deep, renders nothing and no loop: it ran for hours."""
    monkeypatch.setattr(chat, "MAX_CALLS", 10_000, raising=False)
    _refused(EXPONENTIAL, rf"{BOUND}it made more than 10,000 calls in one render")
    monkeypatch.undo()
    # the default call bound, the time bound out of the way (a loaded machine may take 5 s to make the
    # calls); a failure rather than a hang past 120 s
    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 600.0)
    with at_most(120.0), pytest.raises(ValueError, match=rf"{BOUND}it made more than 250,000 calls"):
        chat.render_chat_template(EXPONENTIAL, MESSAGES, {})


def test_a_render_past_its_time_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time a render may take is checked at every loop item and every call."""
    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.0, raising=False)
    for template in ["{% for i in range(3) %}{{ i }}{% endfor %}", "{{ 'a'.upper() }}", "{{ 'a'|upper }}"]:
        _refused(template, rf"{BOUND}it was still rendering after 0 s$")


def test_lipsum_is_not_given() -> None:
    """Jinja's lipsum made gigabytes of text in one call (no loop, no range)."""
    _refused(
        "{{ lipsum(1, False, 10**9, 10**9 + 1) | length }}",
        r"^chat template failed on these messages: UndefinedError: 'lipsum' is undefined$",
    )


@pytest.mark.parametrize(
    ("template", "what"),
    [
        ("{% set s = 'x' | center(2**30) %}{{ s | length }}", "the filter 'center'"),
        ("{% set s = '%01000000000d' % 1 %}{{ s | length }}", "'%'"),
        ("{% set b = [1] | batch(10**8, 0) | first %}{{ b | length }}", "the filter 'batch'"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
            "{{ ns.s | length }}",
            "'~'",
        ),
    ],
)
def test_the_reviewed_bypasses_are_refused_before_the_value_is_made(template: str, what: str) -> None:
    """Values of a gigabyte stored with {% set %} were made (the rendered text alone was counted)."""
    _refused(template, rf"{BOUND}{re.escape(what)} would make ")


@pytest.mark.parametrize(
    ("template", "what"),
    [
        ("{{ 'x' | center(20000) }}", "the filter 'center'"),
        ("{{ ('x\n' * 100) | indent(200) }}", "the filter 'indent'"),
        ("{{ ('x' * 100) | replace('x', 'y' * 200) }}", "the filter 'replace'"),
        ("{{ ('x' * 100) | wordwrap(1, wrapstring='-' * 200) }}", "the filter 'wordwrap'"),
        ("{{ '%020000d' | format(1) }}", "the filter 'format'"),
        ("{{ [1] | batch(20000, 0) | list }}", "the filter 'batch'"),
        ("{{ [1] | slice(20000) | list }}", "the filter 'slice'"),
        ("{{ (['x' * 1000] * 20) | join }}", "the filter 'join'"),
        ("{{ (['x' * 1000] * 20) | map('upper') | join }}", "the filter 'join'"),
        ("{{ (['x' * 1000] * 20) | tojson }}", "the filter 'tojson'"),
        ("{{ ([[1] * 200] * 200) | sum(start=[]) | length }}", "the filter 'sum'"),
        ("{{ range(20000) | list | length }}", "the filter 'list'"),
        ("{{ ['x' * 1000] * 20 }}", "'{{ }}'"),
        ("{{ '%0*d' % (20000, 1) }}", "'%'"),
        ("{{ '%s' % [['x' * 1000] * 20] }}", "'%'"),
        ("{{ 'x' * 6000 + 'x' * 6000 }}", "'+'"),
        ("{{ [1] * 6000 + [1] * 6000 }}", "'+'"),
        ("{{ 'x' ~ ['x' * 1000] * 20 }}", "'~'"),
        ("{{ 'x'.center(20000) }}", "str.center"),
        ("{{ 'x'.zfill(20000) }}", "str.zfill"),
        ("{{ ('\t' * 100).expandtabs(200) }}", "str.expandtabs"),
        ("{{ '-'.join(['x' * 1000] * 20) }}", "str.join"),
        ("{{ '{:>20000}'.format(1) }}", "str.format"),
        ("{{ '{:>{}}'.format(1, 20000) }}", "str.format"),
        ("{{ ('x' * 12000).split('x') | length }}", "a call"),
    ],
)
def test_values_past_the_text_bound_are_refused(
    monkeypatch: pytest.MonkeyPatch, template: str, what: str
) -> None:
    """Filters, methods, ``+``, ``~``, ``%`` and ``{{ }}`` make no string, list or tuple past
    ``MAX_RENDERED_CHARS`` (10,000 here), refused before it is made where the arguments say its size."""
    monkeypatch.setattr(chat, "MAX_RENDERED_CHARS", 10_000)
    _refused(template, rf"{BOUND}{re.escape(what)} (would make|made) ")


def test_filters_on_constants_wait_for_a_render() -> None:
    """Jinja ran a filter on constants while it compiled an output: ``'x' | center(1000000000)`` made a
    gigabyte when the model loaded (``check_chat_template``), outside the render's bounds."""
    template = "{{ 'x' | center(1000000000) }}"
    with at_most(5.0):
        chat.check_chat_template(template)
    _refused(template, rf"{BOUND}the filter 'center' would make more than")


def test_what_real_templates_do_renders_as_jinja_renders_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded filters, calls and operators give what Jinja's own give (within the bounds)."""
    monkeypatch.setattr(chat, "MAX_RENDERED_CHARS", 10_000)
    template = (
        "{% set ns = namespace(text='', parts=[]) %}{% macro tag(m) %}<{{ m.role | upper }}>{% endmacro %}"
        "{% for m in messages %}{% set ns.text = ns.text ~ m.content | trim ~ '|' %}"
        "{% set ns.parts = ns.parts + [m.role] %}{{ tag(m) + m.content.strip() }}{% endfor %}"
        "{{ ns.text }}{{ ns.parts | join(',') }}{{ '%s:%03d' % ('n', 7) }}{{ '%(a)s' % {'a': 1} }}"
        "{{ '%s-%s' | format('a', 'b') }}{{ 'ab' | center(6) }}{{ 'a\nb' | indent(2, true) }}"
        "{{ messages | map(attribute='content') | join(' ') }}{{ messages | tojson }}{{ messages[0] }}"
        "{{ 'a b'.split() }}{{ '{}={:>3}'.format('k', 1) }}{{ '-'.join(['a', 'b']) }}{{ [1, 2] | batch(3, 0) "
        "| list }}{{ [1, 2, 3] | slice(2) | list }}{{ [[1], [2]] | sum(start=[]) }}{{ 7 % 3 }}{{ 1 + 2 }}"
        "{{ 'x' | replace('x', 'yz') }}{{ 'a b c' | wordwrap(2) }}{{ tools }}{{ documents }}"
    )
    messages = [{"role": "system", "content": " s "}, {"role": "user", "content": "ü"}]
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    expected = environment.from_string(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=True
    )
    assert chat.render_chat_template(template, messages, {}) == expected


def test_tools_and_documents_are_none_as_transformers_gives_them() -> None:
    """transformers renders with ``tools=None, documents=None`` where none are given: ``is not none``
    tests were true and ``tools | tojson`` raised."""
    template = (
        "{% if tools is not none %}[TOOLS]{% endif %}{% if documents is not none %}<docs>{% endif %}"
        "{{ tools | tojson }}|{{ documents | tojson }}|{{ messages[0].content }}"
    )
    assert chat.render_chat_template(template, MESSAGES, {}) == "null|null|ab"


def _folder(tmp_path: Path, special_map: Any) -> Path:
    """The chat fixture's tokenizer with a config without bos_token, eos_token and template, and
    ``special_map`` as special_tokens_map.json (a string: the file's text)."""
    shutil.copy(CHAT / "tokenizer.json", tmp_path)
    config = json.loads((CHAT / "tokenizer_config.json").read_text())
    for field in ("bos_token", "eos_token", "chat_template"):
        config.pop(field, None)
    config["unk_token"] = "<config-unk>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    text = special_map if isinstance(special_map, str) else json.dumps(special_map)
    (tmp_path / "special_tokens_map.json").write_text(text)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{{ eos_token }}{% endfor %}{{ unk_token }}"
    )
    return tmp_path


def test_special_tokens_map_json_is_read_and_wins(tmp_path: Path) -> None:
    """transformers loads special_tokens_map.json too, its values over tokenizer_config.json's: a folder
    whose config lacks bos_token and eos_token rendered them as ''."""
    special_map = {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "unk_token": "<u>"}
    tokenizer = load_tokenizer(_folder(tmp_path, special_map), None)
    assert tokenizer is not None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[hi]</s><u>"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", r"cannot read .*special_tokens_map\.json: JSONDecodeError"),
        ("[1]", r"expected a JSON object in "),
    ],
)
def test_a_malformed_special_tokens_map_json_is_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"^special_tokens_map\.json: {problem}"):
        load_tokenizer(_folder(tmp_path, text), None)


def test_text_parts_are_joined_into_the_content_the_template_is_given() -> None:
    """OpenAI's list of text parts is one string for the template (as the server joined it): rendered,
    the same text as the joined string's (it was the list's Python repr through the API and the CLI); a
    None content (an assistant's tool call) stays None; the message's other fields are kept."""
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "name": "u",
        },
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "user", "content": []},
    ]
    assert chat.check_messages(parts) == [
        {"role": "user", "content": "ab", "name": "u"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "user", "content": ""},
    ]
    assert parts[0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]  # a copy
    template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    joined = chat.render_chat_template(template, parts[:1], {})
    assert joined == chat.render_chat_template(template, [{"role": "user", "content": "ab"}], {}) == "[ab]"


@pytest.mark.parametrize("role", ["user", "system", "tool"])
def test_a_null_content_is_an_assistants_only(role: str) -> None:
    """A None content is an assistant's (its tool call), as the server had it: another role's was
    rendered as the string "None" through the API and the CLI; refused by the one check, naming the
    message, so that every front end refuses it alike."""
    messages = [{"role": "system", "content": "s"}, {"role": role, "content": None}]
    problem = (
        rf"^message 1: content: None \(JSON null\) is only for an assistant's message .* a '{role}' message"
    )
    with pytest.raises(ValueError, match=problem):
        chat.check_messages(messages)
    with pytest.raises(ValueError, match=problem):
        chat.render_chat_template("{% for m in messages %}[{{ m.content }}]{% endfor %}", messages, {})
    tool_call = [*messages[:1], {"role": "assistant", "content": None}]
    assert chat.check_messages(tool_call) == tool_call


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ([{"type": "image_url", "image_url": {"url": "x"}}], r"content part 0: expected a text part"),
        ([{"type": "text", "text": "a"}, {"type": "text"}], r"content part 1: expected a text part"),
        ([{"type": "text", "text": 5}], r"content part 0: expected a text part"),
        ([{"type": "text", "text": "a", "extra": 1}], r"content part 0: expected a text part"),
        (["a"], r"content part 0: expected a text part"),
        (5, r"content: expected a string, a list of text parts .* or None \(an assistant's\), got int"),
        ({"type": "text", "text": "a"}, r"content: expected a string, a list of text parts"),
    ],
)
def test_content_other_than_text_is_refused_naming_the_message(content: Any, problem: str) -> None:
    """Parts other than text (an image), and content of another type, are refused as the server refuses
    them, naming the message and the part."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
    with pytest.raises(ValueError, match=rf"^message 1: {problem}"):
        chat.check_messages(messages)
