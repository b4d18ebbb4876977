"""Chat messages as prompts: a model folder's chat template rendered as ``transformers`` renders it.

A chat prompt is a list of messages ``[{"role": "user", "content": "..."}, ...]``. The template is the
tokenizer folder's ``chat_template.jinja`` or, failing that, ``tokenizer_config.json``'s ``chat_template``
(a string, or a list of named templates of which ``default`` is used). It is rendered with ``jinja2`` in
a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks`` and the ``loopcontrols`` extension
(and the ``{% generation %}`` tag of training templates, rendered as its body),
given ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None) and the special tokens
(``bos_token``, ``eos_token``, ...) of tokenizer_config.json and special_tokens_map.json (whose values win,
as in transformers), with the helpers templates call: ``raise_exception(message)`` (a ValueError here),
``strftime_now(format)`` and a ``tojson`` filter that keeps non-ASCII text as it is (Jinja's ``lipsum``
is left out). ``jinja2`` is the ``chat`` extra (``pip install 'tiltsmc[chat]'``), imported only to render,
and to compile a template given as an argument (``chat_template=``) when the model loads
(``check_chat_template``).

A render is bounded, so that a template that loops without end or builds a huge text fails (ValueError
naming the chat template and the bound) instead of stalling every prompt: its loops take at most
``MAX_LOOP_ITEMS`` (250,000) items in all (the items of every ``{% for %}`` and recursive ``loop(...)``,
and the length of every ``range`` it makes); it makes at most ``MAX_CALLS`` (250,000) calls (of macros,
``caller()``, globals, methods and filters); it stops at the first of these calls or loop items after
``MAX_RENDER_SECONDS`` (5 s); ``*`` makes a string or list of at most ``MAX_REPEAT_ITEMS`` (2**20) items
and an integer of at most ``MAX_INT_BITS`` (2**20) bits, as ``**`` does; ``+``, ``~``, ``%``, filters and
calls make no string, list or tuple past ``MAX_RENDERED_CHARS`` (2**26) characters or items, refused
before they run where their arguments say the size (``center(width)``, ``'%0999999999d'``,
``batch(n, fill)``, ``str.join``, ...) and where the text of a value is made (``{{ }}``, ``~``, ``%``,
``join``, ``tojson``, ...: a list of a long string repeated is small, its text is not); and the text it
renders is at most ``MAX_RENDERED_CHARS`` characters. Real chat templates loop over the messages (and their
parts, and the tools) a few times, far within these; a hostile one hits one within a second or so. A render
that runs out of memory all the same is a ValueError too. These bounds are not a sandbox of CPU time and
memory: between two checks one operation runs to its end (a filter or method on values within the bounds:
sorting 2**20 items, ``str.format`` with a width it takes from a value's attribute, ...), and some results
are checked only once made, so a render can take seconds and a few times ``MAX_RENDERED_CHARS`` of memory
before it fails. A template comes from the model's folder or from the operator (``chat_template=``,
``--chat-template``) and is trusted as the model itself is (an ONNX graph too can compute and allocate as
it likes).
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import operator
import os
import re
import time
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


def _read_json_object(file: Path, name: str) -> dict[str, Any]:
    """The JSON object in ``file`` (``name`` in errors), or ``{}`` where there is no such file; ValueError
    where it cannot be read or is not an object."""
    if not optional_file(file, name):
        return {}
    try:
        with file.open(encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
        raise ValueError(f"{name}: cannot read {file}: {type(error).__name__}: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: expected a JSON object in {file}")
    return loaded


def read_tokenizer_config(folder: Optional[Path]) -> tuple[Optional[str], dict[str, Any]]:
    """``(chat template or None, special tokens)`` of a tokenizer's folder (ValueError for files that
    cannot be read or a template that is not a string). The special tokens are tokenizer_config.json's,
    each replaced by special_tokens_map.json's where that file has it, as transformers loads them."""
    if folder is None:
        return None, {}
    config_file = folder / "tokenizer_config.json"
    config = _read_json_object(config_file, "tokenizer_config.json")
    special_map = _read_json_object(folder / "special_tokens_map.json", "special_tokens_map.json")
    special: dict[str, Any] = {}
    for field in SPECIAL_TOKEN_FIELDS:
        text = _token_text(special_map.get(field, config.get(field)))
        if isinstance(text, str):
            special[field] = text
    extra = special_map.get("additional_special_tokens", config.get("additional_special_tokens"))
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
        import jinja2.visitor
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
MAX_CALLS = 250_000
MAX_RENDER_SECONDS = 5.0


class _BoundHit(Exception):
    """A render went past one of its bounds (the message says which)."""


class _Budget:
    """The loop items and calls left to one render, and the time it must be done by."""

    def __init__(self) -> None:
        self.left = MAX_LOOP_ITEMS
        self.calls = MAX_CALLS
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def charge(self, items: int) -> None:
        self.left -= items
        if self.left < 0:
            raise _BoundHit(
                f"its loops went past {MAX_LOOP_ITEMS:,} items in one render (the items of every for loop "
                "and the length of every range it makes)"
            )
        self.in_time()

    def charge_call(self) -> None:
        self.calls -= 1
        if self.calls < 0:
            raise _BoundHit(
                f"it made more than {MAX_CALLS:,} calls in one render (of macros, functions, methods and "
                "filters)"
            )
        self.in_time()

    def in_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _BoundHit(f"it was still rendering after {MAX_RENDER_SECONDS:g} s")


# the budget of the render under way in this thread (None outside render_chat_template: unbounded)
_RENDER_BUDGET: contextvars.ContextVar[Optional[_Budget]] = contextvars.ContextVar(
    "tiltsmc_chat_render_budget", default=None
)

# the filters every {% for %}'s iterable and every ~ join are passed through (names no template gives a
# filter of its own)
_LOOP_FILTER = "tiltsmc.loop_items"
_CONCAT_FILTER = "tiltsmc.concat"


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


def _text_size(value: Any) -> int:
    """About ``len(str(value))`` (strings counted without the quotes and escapes of their repr), counted
    only until it is past ``MAX_RENDERED_CHARS``: a list repeated to many items of one long string is
    small, its text is not."""
    if isinstance(value, str):
        return len(value)
    from jinja2.utils import Namespace

    size, stack, seen = 0, [value], set()
    while stack and size <= MAX_RENDERED_CHARS:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, (list, tuple, set, frozenset, Mapping)):
            size += 2 + 2 * len(item)
            if size <= MAX_RENDERED_CHARS:
                stack.extend(item.items() if isinstance(item, Mapping) else item)
        elif isinstance(item, Namespace):  # the one container a template can make hold itself
            if id(item) not in seen:
                seen.add(id(item))
                stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        else:  # a number (of at most MAX_INT_BITS bits), None, a macro, ...
            size += 8
    return size


def _check_text(value: Any, what: str) -> None:
    if _text_size(value) > MAX_RENDERED_CHARS:
        raise _BoundHit(f"{what} would make a text of more than {MAX_RENDERED_CHARS:,} characters")


def _check_made(value: Any, what: str) -> Any:
    """``value``, refused where it is a string, list or tuple longer than ``MAX_RENDERED_CHARS``."""
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_RENDERED_CHARS:
        raise _BoundHit(
            f"{what} made a {type(value).__name__} of {len(value):,} items, past {MAX_RENDERED_CHARS:,}"
        )
    return value


_NUMBERS = re.compile(r"\d+")


def _check_format(text: str, values: Iterable[Any], nested: bool, what: str) -> None:
    """Refuse ``text`` formatted with ``values`` (``%`` or ``str.format``) where the widths it writes and
    the texts of the values come to more than ``MAX_RENDERED_CHARS``; ``nested``: widths may be values
    (``%*d``, ``{:{}}``), so integers count as their value."""
    size = len(text)
    for digits in _NUMBERS.findall(text):
        size += int(digits) if len(digits) < 12 else MAX_RENDERED_CHARS + 1
    for value in values:
        if nested and isinstance(value, int):
            size += abs(value)
        else:
            size += _text_size(value)
        if size > MAX_RENDERED_CHARS:
            break
    if size > MAX_RENDERED_CHARS:
        raise _BoundHit(f"{what} would make a text of more than {MAX_RENDERED_CHARS:,} characters")


def _format_values(values: Any) -> Iterable[Any]:
    """The values of ``text % values``."""
    if isinstance(values, tuple):
        return values
    if isinstance(values, Mapping):
        return list(values.values())
    return (values,)


def _bounded_binop(operator_name: str, left: Any, right: Any) -> Any:
    """``left * right`` or ``left ** right``, refused where the result would be past ``MAX_REPEAT_ITEMS``
    items (a string or a sequence repeated) or ``MAX_INT_BITS`` bits (an integer); ``left + right`` and
    ``text % values``, refused where the result would be past ``MAX_RENDERED_CHARS`` characters or
    items."""
    ints = all(isinstance(x, int) for x in (left, right))
    if operator_name == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > MAX_RENDERED_CHARS:
                raise _BoundHit(
                    f"'+' would make a {type(left).__name__} of more than {MAX_RENDERED_CHARS:,} items"
                )
        return operator.add(left, right)
    if operator_name == "%":
        if isinstance(left, str):
            _check_format(left, _format_values(right), "*" in left, "'%'")
            return _check_made(operator.mod(left, right), "'%'")
        return operator.mod(left, right)
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


def _bounded_concat(values: tuple[Any, ...]) -> str:
    """``a ~ b ~ ...``, as Jinja joins them (``str`` of each), refused past ``MAX_RENDERED_CHARS``."""
    size = 0
    for value in values:
        size += _text_size(value)
        if size > MAX_RENDERED_CHARS:
            raise _BoundHit(f"'~' would make a text of more than {MAX_RENDERED_CHARS:,} characters")
    return "".join(map(str, values))


def _too_big(what: str, size: int) -> None:
    if size > MAX_RENDERED_CHARS:
        raise _BoundHit(f"{what} would make more than {MAX_RENDERED_CHARS:,} characters or items")


def _width(value: Any) -> int:
    return len(value) if isinstance(value, str) else value if isinstance(value, int) else 0


def _check_filter(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse, before it runs, a filter whose arguments ask for a value past ``MAX_RENDERED_CHARS``
    characters or items (``args[0]`` is the filtered value; it may be replaced by a list of its items)."""
    what = f"the filter {name!r}"
    value = args[0] if args else None

    def arg(position: int, keyword: str, default: Any = None) -> Any:
        return args[position] if len(args) > position else kwargs.get(keyword, default)

    if name == "center":
        _too_big(what, _width(arg(1, "width", 80)))
    elif name == "indent" and isinstance(value, str):
        _too_big(what, len(value) + (value.count("\n") + 1) * _width(arg(1, "width", 4)))
    elif name == "wordwrap" and isinstance(value, str):
        _too_big(what, len(value) * (1 + _width(arg(3, "wrapstring") or "\n")))
    elif name == "replace" and isinstance(value, str):
        old, new = str(arg(1, "old", "")), str(arg(2, "new", ""))
        _too_big(what, len(value) + (value.count(old) if old else len(value) + 1) * len(new))
    elif name == "format":
        values = kwargs.values() if kwargs else args[1:]
        _check_format(str(value), values, "*" in str(value), what)
    elif name == "batch" and arg(2, "fill_with") is not None:
        _too_big(what, _width(arg(1, "linecount", 0)))
    elif name == "slice":
        _too_big(what, _width(arg(1, "slices", 0)))
    elif name == "join":
        if value is not None and not isinstance(value, str):
            args[0] = value = list(value)
        _check_text(value, what)
        if isinstance(value, list):
            _too_big(what, _text_size(value) + len(value) * _text_size(arg(1, "d", "")))
    elif name == "sum" and isinstance(arg(2, "start", 0), (list, tuple)):
        args[0] = value = list(args[0])
        _too_big(what, sum(len(x) if isinstance(x, (str, list, tuple)) else 1 for x in value))
    elif name in ("tojson", "string", "pprint", "urlencode", "escape", "e", "forceescape"):
        _check_text(value, what)


def _bounded_filter(name: str, function: Any) -> Any:
    """``function``, a filter, its calls charged to the render's budget, refused before they run where
    their arguments ask for too much (``_check_filter``) and where their result is past
    ``MAX_RENDERED_CHARS`` characters or items. It takes the render's context, so that Jinja does not run
    it while it compiles (on constants: ``{{ 'x' | center(1000000000) }}``), and passes on what
    ``function`` takes of it (the context, its eval context or environment)."""
    import jinja2

    passes = getattr(function, "jinja_pass_arg", None)
    passes = None if passes is None else passes.name  # "context", "eval_context" or "environment"

    @functools.wraps(function)
    def bounded(context: Any, *args: Any, **kwargs: Any) -> Any:
        first = () if passes is None else (context,) if passes == "context" else (
            (context.eval_ctx,) if passes == "eval_context" else (context.environment,)
        )  # fmt: skip
        budget = _RENDER_BUDGET.get()
        if budget is None:
            return function(*first, *args, **kwargs)
        budget.charge_call()
        values = list(args)
        _check_filter(name, values, kwargs)
        return _check_made(function(*first, *values, **kwargs), f"the filter {name!r}")

    return jinja2.pass_context(bounded)


def _bounded_output(value: Any) -> Any:
    """A ``{{ }}`` expression's value, refused where its text would be past ``MAX_RENDERED_CHARS``."""
    if not isinstance(value, str) and _RENDER_BUDGET.get() is not None:
        _check_text(value, "'{{ }}'")
    return value


def _check_method(method: Any, args: list[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse, before it runs, a string method asked for a result past ``MAX_RENDERED_CHARS``
    (``args[0]`` of ``str.join`` is replaced by a list of its items)."""
    wrapped = getattr(method, "__wrapped__", method)  # the sandbox's str.format wraps it
    text = getattr(wrapped, "__self__", None)
    if not isinstance(text, str):
        return
    name = getattr(wrapped, "__name__", "")
    what = f"str.{name}"
    if name in ("center", "ljust", "rjust", "zfill"):
        _too_big(what, _width(args[0]) if args else 0)
    elif name == "expandtabs":
        _too_big(what, len(text) * max(_width(args[0] if args else kwargs.get("tabsize", 8)), 1))
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        _too_big(what, len(text) + (text.count(old) if old else len(text) + 1) * len(new))
    elif name == "join" and args:
        items = args[0] = list(args[0])
        _too_big(what, _text_size(items) + len(items) * len(text))
    elif name in ("format", "format_map"):
        values = (
            [*args, *kwargs.values()] if name == "format" else list(_format_values(args[0] if args else {}))
        )
        _check_format(text, values, bool(re.search(r"\{[^{}]*\{", text)), what)


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
    # (the bounds of a render: *, **, + and % go through _bounded_binop, range is _bounded_range, every
    # call (of a macro, a global, a method) goes through Environment.call and every filter through
    # _bounded_filter, every for loop's iterable is passed through _loop_items and every ~ join is
    # _bounded_concat, filters put in the parsed template)
    sandboxed: Any = jinja2.sandbox.ImmutableSandboxedEnvironment

    class Environment(sandboxed):  # type: ignore[misc]
        def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
            return _bounded_binop(operator_name, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget = _RENDER_BUDGET.get()
            if budget is None:
                return super().call(__context, __obj, *args, **kwargs)
            budget.charge_call()
            values = list(args)
            _check_method(__obj, values, kwargs)
            return _check_made(super().call(__context, __obj, *values, **kwargs), "a call")

    transformer: Any = jinja2.visitor.NodeTransformer

    class Concat(transformer):  # type: ignore[misc]
        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            values = jinja2.nodes.Tuple(node.nodes, "load", lineno=node.lineno)
            return jinja2.nodes.Filter(values, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)

    environment = Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_extension(), "jinja2.ext.loopcontrols"],
        optimized=False,
        finalize=_bounded_output,
    )
    environment.intercepted_binops = frozenset({"*", "**", "+", "%"})
    environment.filters["tojson"] = tojson
    environment.filters = {name: _bounded_filter(name, f) for name, f in environment.filters.items()}
    environment.filters[_LOOP_FILTER] = _loop_items
    environment.filters[_CONCAT_FILTER] = _bounded_concat
    del environment.globals["lipsum"]  # it makes texts of any size in one call
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["range"] = _bounded_range
    try:
        parsed = Concat().visit(environment.parse(template))
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


# A message's content as a refusal describes what it takes (the server's request model takes the same)
_CONTENT = "a string, a list of text parts [{'type': 'text', 'text': ...}] or None (an assistant's)"


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts, each with a string ``role`` and a ``content`` as the chat template
    takes it (ValueError naming the message): a string, None (JSON's null: an assistant's message only, as
    its tool call has; another role's needs its text, else the template renders "None"), or OpenAI's list
    of text parts (``[{"type": "text", "text": ...}]``, each part exactly those two keys), joined into one
    string. The one check of every chat prompt (the API's, ``tiltsmc run --messages``', the server's): the
    same messages are the same prompt through each; any other part (an image) or content is refused."""
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
        if message["content"] is None and role != "assistant":
            raise ValueError(
                f"message {k}: content: None (JSON null) is only for an assistant's message (a tool call); "
                f"a {role[:40]!r} message needs its text"
            )
        checked.append({**message, "content": _content(message["content"], k)})
    return checked


def _content(content: Any, k: int) -> Optional[str]:
    """Message ``k``'s content as a string (its text parts joined) or None; ValueError naming it."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message {k}: content: expected {_CONTENT}, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, Mapping)
            or set(part) != {"type", "text"}
            or part["type"] != "text"
            or not isinstance(part["text"], str)
        ):
            raise ValueError(
                f"message {k}: content part {j}: expected a text part {{'type': 'text', 'text': ...}} "
                f"(only text is taken), got {part!r:.80}"
            )
        texts.append(part["text"])
    return "".join(texts)


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
            # transformers passes tools and documents, None where not given
            messages=checked,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
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
