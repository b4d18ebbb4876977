"""Chat messages as prompts: a model folder's chat template rendered as ``transformers`` renders it.

A chat prompt is a list of messages ``[{"role": "user", "content": "..."}, ...]``. The template is the
tokenizer folder's ``chat_template.jinja`` or, failing that, ``tokenizer_config.json``'s ``chat_template``
(a string, or a list of named templates of which ``default`` is used). It is rendered with ``jinja2`` in
a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks`` and the ``loopcontrols`` extension
(and the ``{% generation %}`` tag of training templates, rendered as its body),
given ``messages``, ``add_generation_prompt`` and the special tokens of tokenizer_config.json
(``bos_token``, ``eos_token``, ...), with the helpers templates call: ``raise_exception(message)``
(a ValueError here), ``strftime_now(format)`` and a ``tojson`` filter that keeps non-ASCII text as it is.
``jinja2`` is the ``chat`` extra (``pip install 'tiltsmc[chat]'``), imported only to render, and to compile
a template given as an argument (``chat_template=``) when the model loads (``check_chat_template``).

A render is bounded, so that a template that loops for hours or builds a string of terabytes fails within
a fraction of a second (ValueError naming the chat template and the bound) instead of stalling every
prompt: its loops take at most ``MAX_LOOP_ITEMS`` (250,000) items in all (the items of every ``{% for %}``
and recursive ``loop(...)``, and the length of every ``range`` it makes), ``*`` makes a string or list of
at most ``MAX_REPEAT_ITEMS`` (2**20) items and an integer of at most ``MAX_INT_BITS`` (2**20) bits, as
``**`` does, and the text it renders is at most ``MAX_RENDERED_CHARS`` (2**26) characters. Real chat
templates loop over the messages (and their parts, and the tools) a few times, far within these. A render
that runs out of memory all the same is a ValueError too. (The bounds are not a sandbox of CPU time:
filters on large values, ``~`` joins, ... are not counted.)
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from ._config import optional_file

__all__ = ["check_chat_template", "is_chat", "read_tokenizer_config", "render_chat_template"]

# The special-token fields of tokenizer_config.json, as transformers hands them to templates.
SPECIAL_TOKEN_FIELDS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (a non-empty list or tuple of mappings)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(message, Mapping) for message in prompt)
    )


def _token_text(value: Any) -> Any:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken ``{"content": ...}``."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def read_tokenizer_config(folder: Optional[Path]) -> tuple[Optional[str], dict[str, Any]]:
    """``(chat template or None, special tokens)`` of a tokenizer's folder (ValueError for files that
    cannot be read or a template that is not a string)."""
    if folder is None:
        return None, {}
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if optional_file(config_file, "tokenizer_config.json"):
        try:
            with config_file.open(encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
            raise ValueError(
                f"tokenizer_config.json: cannot read {config_file}: {type(error).__name__}: {error}"
            ) from None
        if not isinstance(loaded, dict):
            raise ValueError(f"tokenizer_config.json: expected a JSON object in {config_file}")
        config = loaded
    special: dict[str, Any] = {}
    for field in SPECIAL_TOKEN_FIELDS:
        text = _token_text(config.get(field))
        if isinstance(text, str):
            special[field] = text
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        special["additional_special_tokens"] = [_token_text(t) for t in extra]
    template_file = folder / "chat_template.jinja"
    if optional_file(template_file, "chat_template.jinja"):
        try:
            return template_file.read_text(encoding="utf-8"), special
        except (OSError, ValueError) as error:
            raise ValueError(f"chat_template.jinja: cannot read {template_file}: {error}") from error
    template = config.get("chat_template")
    where = f"{config_file}: chat_template"
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {
            t["name"]: t.get("template")
            for t in template
            if isinstance(t, Mapping) and isinstance(t.get("name"), str)
        }
        if "default" not in named:
            found = f"templates named {', '.join(map(repr, named))}" if named else "no named template"
            raise ValueError(f"{where}: a list of templates with {found}, and none named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: expected a Jinja template string, got {type(template).__name__}")
    return template, special


def _import_jinja2() -> Any:
    try:
        import jinja2
        import jinja2.sandbox
    except ImportError as error:
        raise ImportError(
            "chat prompts need jinja2 to render the chat template: pip install 'tiltsmc[chat]'"
        ) from error
    return jinja2


class _TemplateRaised(Exception):
    """The template called ``raise_exception``."""


# The bounds of one render (see the module docstring).
MAX_LOOP_ITEMS = 250_000
MAX_REPEAT_ITEMS = 1 << 20
MAX_INT_BITS = 1 << 20
MAX_RENDERED_CHARS = 1 << 26


class _BoundHit(Exception):
    """A render went past one of its bounds (the message says which)."""


class _Budget:
    """The loop items left to one render."""

    def __init__(self) -> None:
        self.left = MAX_LOOP_ITEMS

    def charge(self, items: int) -> None:
        self.left -= items
        if self.left < 0:
            raise _BoundHit(
                f"its loops went past {MAX_LOOP_ITEMS:,} items in one render (the items of every for loop "
                "and the length of every range it makes)"
            )


# the budget of the render under way in this thread (None outside render_chat_template: unbounded)
_RENDER_BUDGET: contextvars.ContextVar[Optional[_Budget]] = contextvars.ContextVar(
    "tiltsmc_chat_render_budget", default=None
)

# the filter every {% for %}'s iterable is passed through (a name no template gives a filter of its own)
_LOOP_FILTER = "tiltsmc.loop_items"


def _loop_items(iterable: Iterable[Any]) -> Iterator[Any]:
    """``iterable``'s items, each charged to the render's budget."""
    budget = _RENDER_BUDGET.get()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        budget.charge(1)
        yield item


def _bounded_range(*args: Any) -> range:
    """The sandbox's ``range`` (at most 100,000 items), its length charged to the render's budget."""
    import jinja2.sandbox

    made = jinja2.sandbox.safe_range(*args)
    budget = _RENDER_BUDGET.get()
    if budget is not None:
        budget.charge(len(made))
    return made


def _bounded_binop(operator_name: str, left: Any, right: Any) -> Any:
    """``left * right`` or ``left ** right``, refused where the result would be past ``MAX_REPEAT_ITEMS``
    items (a string or a sequence repeated) or ``MAX_INT_BITS`` bits (an integer)."""
    ints = all(isinstance(x, int) for x in (left, right))
    if operator_name == "*":
        if ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _BoundHit(f"'*' would make an integer of more than {MAX_INT_BITS:,} bits")
        else:
            for sequence, count in ((left, right), (right, left)):
                if isinstance(count, int) and hasattr(sequence, "__len__"):
                    items = len(sequence) * max(count, 0)
                    if items > MAX_REPEAT_ITEMS:
                        raise _BoundHit(
                            f"'*' would repeat a {type(sequence).__name__} to {items:,} items, past "
                            f"{MAX_REPEAT_ITEMS:,}"
                        )
        return operator.mul(left, right)
    if ints and right > 0 and abs(left) > 1 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
        raise _BoundHit(f"'**' would make an integer of more than {MAX_INT_BITS:,} bits")
    return operator.pow(left, right)


@functools.lru_cache(maxsize=1)
def _generation_extension() -> Any:
    """The ``{% generation %}...{% endgeneration %}`` tag some templates use to mark the assistant's text
    for training masks (transformers' ``AssistantTracker``): rendered as its body alone."""
    jinja2 = _import_jinja2()
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2 declares it on Extension)

        def parse(self, parser: Any) -> Any:
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

        def _body(self, caller: Any) -> Any:
            return caller()

    del jinja2
    return Generation


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    jinja2 = _import_jinja2()

    def raise_exception(message: str) -> None:
        raise _TemplateRaised(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.datetime.now().strftime(format)

    # Jinja evaluates constant expressions while it compiles (its optimizer, and its code generator for
    # output), so a template's {{ 'x' * 10**9 }} took seconds and gigabytes at load: with the optimizer off
    # and * and ** intercepted (which a sandbox does not fold), they wait for a render, as other
    # expressions do; the rendered text is the same either way
    # (the bounds of a render: * and ** go through _bounded_binop, range is _bounded_range and every for
    # loop's iterable is passed through _loop_items, a filter put in the parsed template)
    sandboxed: Any = jinja2.sandbox.ImmutableSandboxedEnvironment

    class Environment(sandboxed):  # type: ignore[misc]
        def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
            return _bounded_binop(operator_name, left, right)

    environment = Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_extension(), "jinja2.ext.loopcontrols"],
        optimized=False,
    )
    environment.intercepted_binops = frozenset({"*", "**"})
    environment.filters["tojson"] = tojson
    environment.filters[_LOOP_FILTER] = _loop_items
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["range"] = _bounded_range
    try:
        parsed = environment.parse(template)
        for loop in parsed.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
        for call in parsed.find_all(jinja2.nodes.Call):  # a recursive loop's loop(items), items charged too
            if isinstance(call.node, jinja2.nodes.Name) and call.node.name == "loop" and len(call.args) == 1:
                items, line = call.args[0], call.lineno
                call.args[0] = jinja2.nodes.Filter(items, _LOOP_FILTER, [], [], None, None, lineno=line)
        return environment.from_string(parsed)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"chat_template: not a valid Jinja template: {error} (line {error.lineno})"
        ) from None
    except (RecursionError, MemoryError) as error:  # nested past what the compiler takes
        raise ValueError(f"chat_template: Jinja cannot compile it: {type(error).__name__}") from None


# what a template's own expressions raise as it renders (1/0, the sandbox's range limit, a macro calling
# itself), besides Jinja's errors
_RENDER_ERRORS: tuple[type[Exception], ...] = (
    ArithmeticError, LookupError, TypeError, ValueError, RecursionError,
)  # fmt: skip

# Jinja's markup: an expression, a statement or a comment (tiltsmc's environment has no line statements)
_JINJA_MARKUP = re.compile(r"\{[{%#]")


def check_chat_template(template: Any) -> None:
    """A ``chat_template=`` argument checked where it is given, not at the first chat prompt: a string
    with Jinja markup (``{{ }}``, ``{% %}``: a text without any renders every conversation as itself,
    and a file's path is such a text) that compiles (ValueError naming ``chat_template``). Where jinja2 is
    not installed, the syntax is left to the first chat prompt, which says which extra brings it."""
    if not isinstance(template, str):
        raise TypeError(f"chat_template: expected a Jinja template string, got {type(template).__name__}")
    if not _JINJA_MARKUP.search(template):
        text = template.strip()
        if text and os.path.isfile(text):
            raise ValueError(
                f"chat_template: expected the template's text, got the path of a file, {text!r}: read the "
                "file and pass its text (chat_template=Path(...).read_text()), or use the CLI's "
                "--chat-template FILE"
            )
        looks_like_a_path = "\n" not in text and (text.endswith((".jinja", ".j2", ".json")) or os.sep in text)
        raise ValueError(
            f"chat_template: {text!r:.80} has no Jinja markup ({{{{ ... }}}}, {{% ... %}}), so it would "
            "render every conversation as that same text"
            + (": a file's path? pass the template's text" if looks_like_a_path else "")
        )
    problem = template_problem(template)  # jinja2 not installed: the first chat prompt says which extra
    if problem is not None:
        raise ValueError(problem)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts, each with a string ``role`` (ValueError naming the message)."""
    if not is_chat(messages):
        raise ValueError(
            "a chat prompt is a non-empty list of messages {'role': ..., 'content': ...}, got "
            f"{messages!r:.80}"
        )
    checked = []
    for k, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {k}: expected a 'role' string, got {role!r}")
        if "content" not in message:
            raise ValueError(f"message {k}: no 'content'")
        checked.append(dict(message))
    return checked


def template_problem(template: str) -> Optional[str]:
    """Why ``template`` does not compile (its Jinja syntax error), or None: it compiles, or jinja2 is not
    installed (the first chat prompt then says which extra brings it)."""
    try:
        _compile(template)
    except ImportError:
        return None
    except ValueError as error:
        return str(error)
    return None


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, Any],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The text of ``messages`` by ``template`` (see the module docstring); ValueError where the template
    refuses them (its ``raise_exception``) or fails on them."""
    checked = check_messages(messages)
    compiled = _compile(template)
    jinja2 = _import_jinja2()
    budget = _RENDER_BUDGET.set(_Budget())
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(
            messages=checked, add_generation_prompt=add_generation_prompt, **special_tokens
        ):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise _BoundHit(f"it rendered more than {MAX_RENDERED_CHARS:,} characters")
            chunks.append(chunk)
        return "".join(chunks)
    except _TemplateRaised as error:
        raise ValueError(f"chat template: {error}") from None
    except _BoundHit as error:
        raise ValueError(f"chat template: stopped, a bound on its work: {error}") from None
    except (*_RENDER_ERRORS, MemoryError, jinja2.TemplateError) as error:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(f"chat template failed on these messages: {reason}") from None
    finally:
        _RENDER_BUDGET.reset(budget)
