r"""A decoder-only language model exported to ONNX (Hugging Face ``optimum`` layout) as the base policy.

The graph takes ``input_ids``, ``attention_mask``, optionally ``position_ids`` and ``use_cache_branch``
(merged decoders), and ``past_key_values.{i}.key`` / ``.value`` of shape
``(batch, kv_heads, past, head_dim)``; it returns ``logits`` and ``present.{i}.key`` / ``.value``.
Prompts are run once (left-padded, one row per prompt) and their cache is copied to every particle;
each later call feeds one new token per particle with the cache, so a step costs one batched session
call for all prompts x particles. The caches, masks and next-token logits live in ``Particles.state``
with leading ``(B, N)`` axes, so resampling reorders them with [`tiltsmc.core.gather`][tiltsmc.core.gather]
and nothing is re-run.

The base policy ``p`` is exactly the law sampled: ``softmax(logits / temperature)`` restricted to the
``top_k`` most likely tokens and to the smallest set of probability at least ``top_p`` (then
renormalised); ``log p(step)`` is returned as sampled. A *step* is one token (``step="token"``) or a run
of tokens ending at a delimiter (a string, e.g. ``"\n\n"``, or a set of token ids), generated token by
token here while the samplers see a single step. With ``stop`` strings a trajectory also ends at the token
whose text completes one of them, so ``p`` is the law of the trajectories cut there (as if that token were
an EOS); its text (``decode``) ends before the first stop string, as OpenAI's do, and its tokens keep the
whole last token. Ragged prompts are left-padded, so the graph must take
``position_ids`` (optimum's current exports do; a graph without them numbers positions itself, which is
only right when every prompt of a batch has the same length).

A graph whose attention reads each row's length from its attention mask (ONNX Runtime's
``GroupQueryAttention`` fed ``seqlens_k = sum(attention_mask) - 1``, as onnxruntime-genai's model builder
writes it) takes its rows right-padded instead (``padding_side="right"``, found at load by default): a
row's tokens fill its first columns, its mask has a one for each, and a row that sits out a call is fed
a padding token at its next column with the mask covering it (the operator writes that column; the row's
mask does not keep it, and its next real token overwrites it). Such a graph accepts a piece of a prompt
after a cache on one row at a time only, so prompts longer than ``prefill_tokens`` start one row at a time
(each in one call where the graph computes such a piece wrongly: ONNX Runtime 1.19's operator does; tried
once, on a 4-token prompt, when a long prompt first comes).

On the CPU provider such a graph can also keep its KV cache in place (``cache_in_place``, on by default
where it works; on a GPU the host arrays would be copied to the device and back at each call): each
layer's ``past`` and ``present`` are bound (ONNX Runtime's I/O binding) to one host array of
``(rows, kv_heads, capacity, head_dim)`` per tensor, into which the operator writes each row's new keys
and values at that row's length, leaving its earlier columns as they were. A step then copies no cache
(a graph that returns ``present`` as a new ``past + 1`` array copies every row's cache at every call);
the capacity grows when a step needs more than it has (one copy: to what the batch can still need where
that is at most twice its width, else by a quarter). Joining batches (the serving engine) writes the
newcomers into spare rows behind the batch's (``Particles.in_place``). Whether the graph writes in place
rightly is tried once at load, on two short prompts.

Where the session runs on ONNX Runtime's CUDA provider and tiltsmc's CUDA kernels are usable
(``device_cache=None``, the default, or ``True`` to insist), the KV cache stays on the GPU: the session
is run with an IO binding that writes ``present.*`` into one device buffer for all layers (a
``DeviceKVCache`` in ``Particles.state["lm.cache"]``) and reads the
next step's ``past_key_values.*`` from it by pointer, and resampling reorders it there with one CUDA
[`tiltsmc.core.gather`][tiltsmc.core.gather] for every layer. Per step only the new tokens, mask and positions
go to the device and the new logits come back. Elsewhere (CPU provider, or a build without the CUDA kernels)
the cache lives in host memory, and on a GPU ONNX Runtime copies it to the device and back at every step:
correct, but slower; ``device_cache=False`` asks for that explicitly. A right-padded policy keeps its cache
on the host: there ``device_cache=True`` is refused, whether ``padding_side="right"`` is given or found at
load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import sys
import sysconfig
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt
import tokenizers

from .. import core
from ._config import (
    Source,
    file_problem,
    first,
    flag,
    optional_file,
    positive_int,
    real_number,
    section,
    token_id,
    token_ids,
)
from ._fed_rows import FedRows
from ._ort import (
    CACHE_INPUT,
    FLOAT_TYPES,
    check_cache_input,
    check_inputs,
    float_type_error,
    make_session,
    runtime_version,
    shrink_memory_arena,
)
from .chat import is_chat
from .device_cache import DeviceKVCache
from .particles import MAX_NEW_TOKENS, Particles, mask_lengths, padded, widened
from .prompts import check_prompts
from .sampling import fail_prompts_without_a_law
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["OnnxCausalLM"]

MODEL_FILES = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx")
# Texts whose token ids a policy keeps: a served prompt is encoded to check its length, to count its KV
# cache at admission and again when its batch starts.
ENCODED_TEXTS = 256
# check_batching: a row batched as the samplers batch it may differ from the row alone by this much of its
# largest logit (at least 1). Float rounding across batch shapes is far below it (the optimum exports tried
# give the probe's rows the same logits bitwise; SmolLM2's float32 graph moved longer prompts by 3e-5 on
# logits of about 20), with room for float16 graphs on a GPU, whose batch shapes change their rounding at
# about 1e-3; a graph that ignores its padding is far above it (the GroupQueryAttention fixture: 0.9 of its
# largest logit; dynamic int8 quantisation: 0.08)
BATCHING_TOLERANCE = 1e-2
_PAST = CACHE_INPUT
PADDING_SIDES = ("left", "right")

FloatArray = npt.NDArray[np.float64]


def resolve_model_file(path: Union[str, os.PathLike[str]], argument: str = "path") -> tuple[Path, Path]:
    """``(model file, its folder)`` for a folder holding a known model file, or an .onnx file."""
    location = Path(path)
    if location.is_dir():
        for name in MODEL_FILES:
            if (location / name).is_file():
                return location / name, location
        for name in MODEL_FILES:  # there, but not a file: say what it is
            problem = file_problem(location / name)
            if problem != "does not exist":
                raise ValueError(f"{argument}: {location / name} {problem}, not an ONNX model file")
        found = sorted(p.name for p in location.iterdir())
        raise FileNotFoundError(
            f"{argument}: no {' / '.join(MODEL_FILES)} in {location} (found: {', '.join(found) or 'nothing'})"
        )
    if location.is_file():
        if location.suffix != ".onnx":
            raise ValueError(f"{argument}: expected a folder or an .onnx file, got {location}")
        return location, location.parent
    problem = file_problem(location)
    if problem == "does not exist":
        raise FileNotFoundError(f"{argument}: {location} does not exist")
    raise ValueError(f"{argument}: {location} {problem}, not a folder or an .onnx file")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object of a model folder's config file; ``{}`` where there is none (ValueError where the
    name is taken by something else than a file, or the file is not a JSON object)."""
    if not optional_file(path, path.name):
        return {}
    try:
        with path.open(encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path.name}: cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path.name}: expected a JSON object in {path}, got {type(value).__name__}")
    return value


def cache_geometry(past: Any, config: dict[str, Any], model_file: Path) -> tuple[Any, int, int]:
    """``(dtype, KV heads, head size)`` of a ``past_key_values.*`` input ``(batch, heads, past, head_dim)``:
    from the graph's static dimensions, else from config.json (grouped-query ``num_key_value_heads``)."""
    dtype, heads, head_size, _, _ = cache_geometry_sources(past, config, model_file)
    return dtype, heads, head_size


def cache_geometry_sources(
    past: Any, config: dict[str, Any], model_file: Path
) -> tuple[Any, int, int, str, str]:
    """``cache_geometry`` and where its heads and head size come from, as an error names them: the graph's
    input (``path: model.onnx: past_key_values.0.key [...]``) or config.json's field
    (``/path/config.json: num_key_value_heads``)."""
    source = Source(model_file.parent / "config.json", config)
    dtype = check_cache_input(model_file, past)
    graph = f"path: {model_file.name}: {getattr(past, 'name', 'past_key_values')} {past.shape}"

    def field(*names: str) -> tuple[Optional[int], str]:  # the first of these fields that is set, checked
        value, where = first([(source, name) for name in names])
        return (None, "") if value is None else (positive_int(value, where), where)

    shape = list(past.shape) if len(past.shape) == 4 else [None] * 4  # a rank left unknown: config.json
    if isinstance(shape[1], int):
        kv_heads, heads_from = int(shape[1]), graph
    else:
        heads, heads_from = field("num_key_value_heads", "num_attention_heads", "n_head")
        kv_heads = heads or 0
    if isinstance(shape[3], int):
        head_size, size_from = int(shape[3]), graph
    else:
        head_dim, size_from = field("head_dim")
        if head_dim is None:
            (hidden, hidden_from), (heads, per) = (
                field("hidden_size", "n_embd"),
                field("num_attention_heads", "n_head"),
            )
            head_dim = hidden // heads if hidden and heads else None
            size_from = f"{hidden_from} / {per.rpartition(': ')[2]}"
        head_size = head_dim or 0
    if kv_heads < 1 or head_size < 1:
        raise ValueError(
            f"path: cannot tell the cache's heads and head size from {model_file.name} "
            f"(shape {past.shape}) or config.json"
        )
    return dtype, kv_heads, head_size, heads_from, size_from


# Operators that make a row's result depend on its padding or its batch, named in a refused graph's message:
# what each does that tiltsmc's batches break.
BATCH_DEPENDENT_OPERATORS = {
    "GroupQueryAttention": "GroupQueryAttention (it reads each row's length from the attention mask and "
    "takes the row to be right-padded)",
    "SparseAttention": "SparseAttention (it reads each row's length from the attention mask)",
    "DynamicQuantizeLinear": "DynamicQuantizeLinear (dynamic int8 quantisation: activations scaled over the "
    "whole batch)",
}


def _operators_named(model_file: Path, operators: Mapping[str, str]) -> list[str]:
    """The descriptions of ``operators`` whose names occur in the model file's bytes (where an operator's
    type is stored as text): a hint for a refused graph's message, read only then."""
    try:
        with open(model_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return [text for name, text in operators.items() if data.find(name.encode()) >= 0]
    except (OSError, ValueError):  # unreadable, or empty: no hint
        return []


def session_call_guard(model_file: Path) -> Any:
    """The context every session call of the graph in ``model_file`` runs in: a lock where ONNX Runtime
    before 1.20 runs the graph and it names ``GroupQueryAttention``, which that runtime computes wrongly
    when two threads run one session at once (1.19.2: rows of the wrong tokens, then "cos_cache dimension 0
    ... total_sequence_length"; 1.20.1, 1.22.0 and 1.32.0 gave each thread its own results), so that such
    a graph's calls go one at a time; else none (and the file is not read)."""
    racy = runtime_version() < (1, 20) and bool(_operators_named(model_file, {"GroupQueryAttention": ""}))
    return threading.Lock() if racy else contextlib.nullcontext()


def probe_ids(size: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The token ids of the batching probes (``OnnxCausalLM.batching_difference``,
    ``OnnxRewardModel.cache_difference``), below ``size``: a 2-token prompt, a 4-token prompt, and the
    three tokens fed after them (the short row's, then the long row's two)."""
    short = np.array([3, 5], dtype=np.int64) % size
    long = (np.arange(4, dtype=np.int64) * 7 + 11) % size
    return short, long, np.array([13, 17, 19], dtype=np.int64) % size


def within_tolerance(difference: float, scale: float) -> bool:
    """Whether a ``largest_difference`` is rounding (at most ``BATCHING_TOLERANCE`` of the largest score,
    at least 1); NaN is not."""
    return bool(difference <= BATCHING_TOLERANCE * max(1.0, scale))


def largest_difference(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """``(difference, scale)`` of ``(batched, alone)`` pairs of score arrays: the largest ``|batched -
    alone|`` (equal infinities differ by 0; NaN anywhere gives NaN) and the largest finite ``|alone|``."""
    with np.errstate(invalid="ignore"):
        difference = max(float(np.max(np.where(a == b, 0.0, np.abs(a - b)))) for a, b in pairs)
    scale = max(float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0)) for _, b in pairs)
    return difference, scale


def log_softmax(logits: npt.ArrayLike) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    shift = np.max(z, axis=-1, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    with np.errstate(divide="ignore"):
        result: FloatArray = z - shift - np.log(np.sum(np.exp(z - shift), axis=-1, keepdims=True))
    return result


class _StartBuffers:
    """The arrays of a run's first state (each prompt's cache, mask and logits copied to its particles),
    reused from run to run.

    They live only until the first step replaces them, but fresh memory costs a page fault per page on
    first write (about 0.2-0.3 ms per fixture array on the test VM, 1.3 ms a run): a small pool keeps them.
    A buffer is handed out again only when the pool holds the sole reference to it (CPython's reference
    count; views count too), so particles still alive never share memory; at most ``max_bytes`` are kept.
    Where the reference count cannot say so (another Python implementation, a free-threaded build), no
    buffer is reused.
    """

    max_bytes = 32 << 20

    def __init__(self) -> None:
        self._free_check = sys.implementation.name == "cpython" and not sysconfig.get_config_var(
            "Py_GIL_DISABLED"
        )
        # Held by this attribute alone: the reference count of a buffer that nothing but its pool holds.
        self._sentinel = np.empty(0)
        self._buffers: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self._bytes = 0
        # Threads sharing the policy: between finding a free buffer and holding it, another thread could
        # take the same one (two runs' particles in one memory).
        self._lock = threading.Lock()

    def repeated(self, a: np.ndarray, count: int) -> np.ndarray:
        """``a`` ``(B, ...)`` repeated ``count`` times along a new axis 1: ``(B, count, ...)``."""
        shape = (a.shape[0], count, *a.shape[1:])
        with self._lock:
            pool = self._buffers.setdefault((shape, a.dtype.str), [])
            buffer = None
            if self._free_check and pool:
                # A buffer is free where its count is the sentinel's, read by the same loop: what else
                # a count includes (the loop's own reference, getrefcount's argument) is not fixed:
                # Python 3.14 borrows some of these, and a constant (3) then took a buffer that particles
                # still held for a free one.
                counts = [sys.getrefcount(b) for b in (self._sentinel, *pool)]
                buffer = next((b for b, count in zip(pool, counts[1:]) if count <= counts[0]), None)
            if buffer is None:
                buffer = np.empty(shape, dtype=a.dtype)
                if self._free_check and self._bytes + buffer.nbytes <= self.max_bytes:
                    pool.append(buffer)
                    self._bytes += buffer.nbytes
        buffer[...] = a[:, None]
        return buffer


def _stop_strings(stop: Optional[Union[str, Sequence[str]]]) -> tuple[str, ...]:
    """``stop`` as a tuple of distinct non-empty strings (one string is one stop string)."""
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, Iterable) else [stop]
    if not all(isinstance(text, str) and text for text in strings):
        raise ValueError(f"stop: expected a non-empty string or a sequence of them, got {stop!r}")
    return tuple(dict.fromkeys(strings))


def _device_cache_right_padded(found: str = "") -> ValueError:
    """The error of ``device_cache=True`` with a right-padded policy, asked for or ``found`` at load."""
    return ValueError(
        f"device_cache: not available with padding_side='right' yet{found}; pass device_cache=False"
    )


def _step_option(step: Any) -> Union[str, frozenset[int]]:
    """``step`` checked: ``"token"``, a non-empty delimiter text, or a non-empty collection of token ids
    (ints >= 0; not bools, floats or strings, nor bytes read as ids). A ``TypeError`` or ``ValueError``
    naming ``step`` otherwise."""
    if isinstance(step, str):
        if not step:
            raise ValueError("step: expected 'token', a non-empty delimiter text or token ids, got ''")
        return step
    if isinstance(step, (bytes, bytearray, memoryview)) or not isinstance(step, Iterable):
        raise TypeError(
            f"step: expected 'token', a delimiter text or a collection of token ids, got "
            f"{type(step).__name__} {step!r:.40}"
        )
    ids = list(step)
    if not ids:
        raise ValueError("step: expected at least one token id, got none")
    for value in ids:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"step: expected token ids (ints), got {value!r:.40} in {step!r:.80}")
        if value < 0:
            raise ValueError(f"step: expected token ids >= 0, got {value!r} in {step!r:.80}")
    return frozenset(int(value) for value in ids)


class _InPlaceBinding:
    """A thread's I/O binding of ``OnnxCausalLM._run_in_place``: the caches it binds (``key``: their
    addresses and shapes), weak references to the arrays they were last found to be views of, and, from
    its second call, the arrays its logits and value are written into."""

    __slots__ = ("binding", "key", "outputs", "owners")

    def __init__(self, binding: Any, key: list[tuple[int, tuple[int, ...]]]) -> None:
        self.binding, self.key = binding, key
        self.owners: list[weakref.ref[np.ndarray]] = []
        self.outputs: Optional[list[np.ndarray]] = None

    def holds(self, owners: Sequence[np.ndarray]) -> bool:
        """Whether ``owners`` are the arrays the bound caches were last found in (an array's memory never
        moves, so the caches are still where they were bound)."""
        refs = self.owners
        return len(refs) == len(owners) and all(ref() is owner for ref, owner in zip(refs, owners))

    def follow(self, owners: Sequence[np.ndarray]) -> None:
        self.owners = [weakref.ref(owner) for owner in owners]


class OnnxCausalLM:
    """Base policy from an ONNX decoder with KV cache (see the module docstring for the exact law).

    ``path``: a folder (model.onnx, optionally config.json, generation_config.json, tokenizer.json, and
    onnxruntime-genai's genai_config.json, whose ``model`` object's EOS, BOS and padding ids and
    ``context_length`` count where the other two give none) or an .onnx file. ``tokenizer``: a
    tokenizer.json path or a ``tokenizers.Tokenizer`` (default: the folder's tokenizer.json, if any;
    without one, prompts must be token-id sequences). ``eos_token_id`` (default from
    the configs) ends a trajectory, as do ``max_new_tokens`` and any of the ``stop`` strings (text the
    trajectory's tokens complete; see the module docstring). Prompts start ``prefill_tokens // width``
    rows a session call (at least one; ``width`` the longest prompt's tokens), and a prompt longer than
    ``prefill_tokens`` in pieces of that many positions, so that the logits of every position and the
    attention scores of long prompts are never all in memory at once. Within a step of several tokens,
    once the rows still writing it are at most ``step_rows_below`` of those the session runs on, the
    session runs on theirs alone (their KV caches gathered, the others' set aside until the step ends:
    ``tiltsmc.models._fed_rows``; 0 never does). ``memory_arena=False`` frees ONNX
    Runtime's buffers after each run instead of keeping them at their peak (a long-running service).

    Prompts: a string (encoded with the special tokens the tokenizer's post-processor adds, as Hugging
    Face does; ``add_special_tokens=False`` leaves them out), token ids (used as given), or chat messages
    ``[{"role": ..., "content": ...}, ...]`` rendered by the tokenizer folder's chat template
    (``chat_template=``, the template's text, overrides it and is compiled at load; see
    ``tiltsmc.models.chat``) and encoded without adding special tokens again. A non-empty text the
    tokenizer encodes to no tokens fails alone (the empty prompt is the BOS token alone). Every prompt's
    ids must lie below the logits' width, a tokenizer's too: a prompt whose ids do not fails alone
    (``particles.errors``).
    Texts are decoded without special tokens (``skip_special_tokens=False`` keeps them).
    ``session_options`` and ``provider_options`` go to ONNX Runtime
    (``tiltsmc.models._ort.make_session``).

    Checked at load, each error naming the file, the graph's input or output, or config.json's field: the
    inputs (those tiltsmc feeds, of the types it feeds: ``tiltsmc.models._ort.check_inputs``), float
    logits ``(batch, sequence, vocabulary)``, the KV cache's heads and head size and config.json's
    ``vocab_size`` against what the graph returns (from its declared shapes, or one two-token run where it
    leaves those axes dynamic), the tokenizer's ids against the logits' width.

    Batches: prompts of different lengths run together padded, and a row that is not extended at a call
    is fed a padding token, so a row's logits must not depend on its padding or on the other rows.
    ``padding_side="left"`` (optimum's exports: every row ends at the last column, padding masked) or
    ``"right"`` (attention that reads each row's length from the mask, ONNX Runtime's
    ``GroupQueryAttention`` as onnxruntime-genai's model builder writes it: every row starts at the first
    column; see the module docstring). With ``check_batching`` (the default) the graph is tried on that
    at load ([`batching_difference`][tiltsmc.models.OnnxCausalLM.batching_difference]) and refused where a
    row run with another differs from the row alone; ``padding_side=None`` (the default) tries left
    padding, then right, and keeps the first that passes (without the check: right where the graph names
    ``GroupQueryAttention``, else left). Dynamic int8 quantisation (its activations scaled over the whole
    batch) fails both. ``check_batching=False`` runs such a graph anyway: its samples do not follow the
    stated law. ``cache_in_place`` (right padding, CPU provider): keep each layer's KV cache in one host
    array the session writes in place (see the module docstring); ``None`` (the default) does where a
    step so run gives the logits and cache of the plain run, tried at load; ``True`` insists, ``False``
    never does.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        tokenizer: Any = None,
        max_new_tokens: int = 64,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        step: Union[str, Iterable[int]] = "token",
        temperature: float = 1.0,
        providers: Optional[Sequence[Any]] = None,
        *,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        bos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        max_length: Optional[int] = None,
        intra_op_num_threads: Optional[int] = None,
        inter_op_num_threads: Optional[int] = None,
        require_gpu: bool = False,
        device_cache: Optional[bool] = None,
        memory_arena: bool = True,
        add_special_tokens: bool = True,
        skip_special_tokens: bool = True,
        chat_template: Optional[str] = None,
        session_options: Any = None,
        provider_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        value_output: Optional[str] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        prefill_tokens: int = 512,
        step_rows_below: float = 0.75,
        check_batching: bool = True,
        padding_side: Optional[str] = None,
        cache_in_place: Optional[bool] = None,
    ) -> None:
        step_option = _step_option(step)  # its ids' range is checked once the vocabulary is known
        self.model_file, model_dir = resolve_model_file(path)
        config = read_json(model_dir / "config.json")
        generation = read_json(model_dir / "generation_config.json")
        genai_path = model_dir / "genai_config.json"
        genai_file = section(genai_path, read_json(genai_path), "model")
        self.tokenizer: Optional[Tokenizer] = load_tokenizer(
            tokenizer, model_dir, add_special_tokens=add_special_tokens,
            skip_special_tokens=skip_special_tokens, chat_template=chat_template,
        )  # fmt: skip
        if self.tokenizer is None and chat_template is not None:
            raise ValueError(
                "chat_template: needs a tokenizer (none given, no tokenizer.json beside the model)"
            )
        self._encode_text = functools.lru_cache(maxsize=ENCODED_TEXTS)(self._encode_text_once)
        self.max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        temperature = real_number(temperature, "temperature")  # "1" is refused, not read as 1.0
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        self.temperature = temperature
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or int(top_k) < 1
        ):
            raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
        self.top_k = None if top_k is None else int(top_k)
        if top_p is not None and not 0.0 < real_number(top_p, "top_p") <= 1.0:
            raise ValueError(f"top_p: expected a fraction in (0, 1] or None, got {top_p!r}")
        self.top_p = None if top_p is None else float(top_p)
        self.stop = _stop_strings(stop)
        self.prefill_tokens = positive_int(prefill_tokens, "prefill_tokens")
        step_rows_below = real_number(step_rows_below, "step_rows_below")
        if not 0.0 <= step_rows_below <= 1.0:
            raise ValueError(f"step_rows_below: expected a fraction in [0, 1], got {step_rows_below!r}")
        self.step_rows_below = float(step_rows_below)
        check_batching = flag(check_batching, "check_batching")
        if cache_in_place is not None and not isinstance(cache_in_place, (bool, np.bool_)):
            raise TypeError(f"cache_in_place: expected None, True or False, got {cache_in_place!r}")
        if padding_side is not None and padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side: expected 'left', 'right' or None, got {padding_side!r}")
        if self.stop and self.tokenizer is None:
            raise ValueError(
                "stop: stop strings need a tokenizer (none given, no tokenizer.json beside the model)"
            )

        self.session = make_session(
            self.model_file,
            providers,
            intra_op_num_threads=intra_op_num_threads,
            inter_op_num_threads=inter_op_num_threads,
            require_gpu=require_gpu,
            memory_arena=memory_arena,
            session_options=session_options,
            provider_options=provider_options,
        )
        inputs = {node.name: node for node in self.session.get_inputs()}
        outputs = [node.name for node in self.session.get_outputs()]
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        layers = sorted({int(m.group(1)) for m in (_PAST.match(name) for name in inputs) if m})
        if not layers:
            missing.append("past_key_values.{i}.key/.value")
        if "logits" not in outputs:
            missing.append("logits (output)")
        # every layer's past key and value (a layer named by one of them lacks the other) and present ones
        absent_cache = [
            name
            for i in layers
            for kind in ("key", "value")
            for name, found in ((f"past_key_values.{i}.{kind}", inputs), (f"present.{i}.{kind}", outputs))
            if name not in found
        ]
        if missing or absent_cache:
            raise ValueError(
                f"path: {self.model_file} is not a decoder with KV cache in the optimum layout: missing "
                f"{', '.join(missing + absent_cache)}; inputs found: {', '.join(inputs)}; outputs found: "
                f"{', '.join(outputs)}"
            )
        if layers != list(range(len(layers))):
            raise ValueError(f"path: past_key_values layers are not numbered 0..L-1: found {layers}")
        check_inputs(self.model_file, list(inputs.values()))
        self._check_dynamic_axes(list(inputs.values()))
        self.num_layers = len(layers)
        self.has_position_ids = "position_ids" in inputs
        self.has_cache_branch = "use_cache_branch" in inputs
        self.cache_dtype, self.kv_heads, self.head_dim, heads_from, size_from = cache_geometry_sources(
            inputs["past_key_values.0.key"], config, self.model_file
        )
        self._cache_names = [
            (f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", f"lm.cache.{i}.{kind}")
            for i in range(self.num_layers)
            for kind in ("key", "value")
        ]
        # Built once: every step's session call and token bookkeeping reuse them.
        self._past_names = [past_name for past_name, _, _ in self._cache_names]
        self._output_names = ["logits"] + [present_name for _, present_name, _ in self._cache_names]
        nodes = {node.name: node for node in self.session.get_outputs()}
        self._check_output_types(nodes, inputs["past_key_values.0.key"].type)
        asked: Optional[str] = None  # the value output asked for, where the graph has it
        if isinstance(value_output, str) and value_output in nodes and value_output != "logits":
            asked = value_output
        probe, probed = self._output_shapes(asked, nodes)
        self._check_cache_shapes(probe, probed, nodes, heads_from, size_from)
        config_file = Source(model_dir / "config.json", config)
        generation_file = Source(model_dir / "generation_config.json", generation)
        self.vocab_size = self._logits_width(probe["logits"], probed, nodes["logits"], config_file)
        if self.tokenizer is not None:
            if self.tokenizer.vocab_size > self.vocab_size:
                raise ValueError(
                    f"tokenizer: {self.tokenizer.vocab_size} tokens but the model has {self.vocab_size} "
                    "logits"
                )
            largest, what = self.tokenizer.largest_id()
            if largest >= self.vocab_size:
                raise ValueError(
                    f"tokenizer: {what} has the id {largest}, but the model has {self.vocab_size} logits "
                    f"(ids 0 to {self.vocab_size - 1}): a tokenizer of another model?"
                )
        # An argument first, then generation_config.json, then config.json, then genai_config.json's model
        # object (onnxruntime-genai's model builder writes no other); each checked, and an error names the
        # argument or the file and field it came from.
        arguments = Source(None, {"max_length": max_length, "eos_token_id": eos_token_id,
                                  "bos_token_id": bos_token_id, "pad_token_id": pad_token_id})  # fmt: skip
        length, where = first([(arguments, "max_length"), (config_file, "max_position_embeddings"),
                               (config_file, "n_positions"), (genai_file, "context_length")])  # fmt: skip
        self.max_length = 1 << 30 if length is None else positive_int(length, where)
        if self.max_length <= self.max_new_tokens:
            raise ValueError(
                f"{where}: a context of {self.max_length} tokens leaves no room for a prompt with "
                f"max_new_tokens={self.max_new_tokens}"
            )
        eos, where = first([(arguments, "eos_token_id"), (generation_file, "eos_token_id"),
                            (config_file, "eos_token_id"), (genai_file, "eos_token_id")])  # fmt: skip
        self.eos_token_ids = frozenset() if eos is None else token_ids(eos, where, self.vocab_size)
        bos, where = first([(arguments, "bos_token_id"), (generation_file, "bos_token_id"),
                            (config_file, "bos_token_id"), (genai_file, "bos_token_id")])  # fmt: skip
        self.bos_token_id = None if bos is None else token_id(bos, where, self.vocab_size)
        pad, where = first([(arguments, "pad_token_id"), (config_file, "pad_token_id"),
                            (genai_file, "pad_token_id")])  # fmt: skip
        self.pad_token_id = (
            token_id(pad, where, self.vocab_size)
            if pad is not None
            else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        )

        self.step_ids: Optional[frozenset[int]] = None
        self.step_text: Optional[str] = None
        if isinstance(step_option, str):
            if step_option != "token":
                if self.tokenizer is None:
                    raise ValueError("step: a text delimiter needs a tokenizer (or give a set of token ids)")
                self.step_text = step_option
        else:
            if max(step_option) >= self.vocab_size:
                raise ValueError(
                    f"step: expected token ids in [0, {self.vocab_size}), got {sorted(step_option)}"
                )
            self.step_ids = step_option
        self.token_level = self.step_text is None and self.step_ids is None
        on_cuda = "CUDAExecutionProvider" in self.session.get_providers()
        if device_cache is not None and not isinstance(device_cache, (bool, np.bool_)):
            raise TypeError(f"device_cache: expected None, True or False, got {device_cache!r}")
        device_cache_asked = bool(device_cache)  # True, not the default None: refused where right-padded
        if device_cache and padding_side == "right":
            raise _device_cache_right_padded()
        if device_cache is None:  # a value head's output is read on the host cache path only
            device_cache = on_cuda and value_output is None and bool(core.cuda_available())
        elif device_cache:
            if not on_cuda:
                raise ValueError(
                    f"device_cache: the session runs on {self.session.get_providers()}, not on CUDA; "
                    "pass providers=['CUDAExecutionProvider'] or device_cache=False"
                )
            availability = core.cuda_available()
            if not availability:
                raise ValueError(
                    f"device_cache: tiltsmc's CUDA kernels are not usable: {availability.reason}"
                )
        self.device_cache = bool(device_cache)
        options = self.session.get_provider_options().get("CUDAExecutionProvider", {})
        self.device_id = int(options.get("device_id", 0) or 0)
        self.value_output = self._check_value_output(
            value_output, outputs, None if asked is None else probe.get(asked)
        )
        if self.value_output is not None:  # fetched last: _run hands it back after the cache
            self._output_names.append(self.value_output)
        self._eos_ids = np.array(sorted(self.eos_token_ids), dtype=np.int64)
        self._step_id_array = np.array(sorted(self.step_ids or ()), dtype=np.int64)
        # Per token id: 1 if it could be the last token of a step ending with step_text, 0 if not, -1 not
        # seen yet; None where every row is checked (see _could_end_step).
        decoder = getattr(getattr(self.tokenizer, "inner", None), "decoder", None)
        joins_token_texts = isinstance(decoder, tokenizers.decoders.Fuse)
        self._could_end = (
            np.full(self.vocab_size, -1, dtype=np.int8) if self.step_text and joins_token_texts else None
        )
        self._start_buffers = _StartBuffers()
        self._pieces_follow: Optional[bool] = None  # see _pieces_follow_the_cache
        self._in_place_bindings = threading.local()  # see _run_in_place
        self._one_call_at_a_time = session_call_guard(self.model_file)
        self._stop_window = 4 * max((len(stop) for stop in self.stop), default=0)
        # Per token id: 1 if it decodes alone to some text, 0 if to none (a special token left out), -1 not
        # seen yet (see _stopped).
        self._has_text = np.full(self.vocab_size if self.stop else 0, -1, dtype=np.int8)
        self.padding_side = self._choose_padding_side(padding_side, check_batching)
        if self.padding_side == "right" and self.device_cache:  # found at load
            if device_cache_asked:
                raise _device_cache_right_padded(f" ({self.model_file.name} was found to take right padding)")
            self.device_cache = False  # the default: the host cache
        self.cache_in_place = self._choose_cache_in_place(cache_in_place)

    # -- load checks of the graph's inputs and outputs ---------------------------------------------------

    def _check_dynamic_axes(self, nodes: Sequence[Any]) -> None:
        """Refuse, naming the file and the input, a graph that declares a fixed size on an axis tiltsmc
        varies from call to call: the batch (axis 0 of every input but ``use_cache_branch``), the tokens fed
        (axis 1 of ``input_ids`` and ``position_ids``), the tokens seen (axis 1 of ``attention_mask``) and
        the cached ones (axis 2 of ``past_key_values.*``). ONNX Runtime's own error, at the first call that
        feeds another size, names neither."""
        axes = {"input_ids": (0, 1), "attention_mask": (0, 1), "position_ids": (0, 1)}
        what = {0: "batch (the rows run at once)", 1: "sequence (the tokens fed or seen)",
                2: "past length (the tokens already cached)"}  # fmt: skip
        for node in nodes:
            varied = (0, 2) if _PAST.match(node.name) else axes.get(node.name, ())
            shape = list(node.shape or ())
            for axis in varied:
                if axis < len(shape) and isinstance(shape[axis], int):
                    name = what[1 if node.name == "attention_mask" and axis == 1 else axis]
                    raise ValueError(
                        f"path: {self.model_file.name}: input {node.name} has shape {node.shape}, a fixed "
                        f"size {shape[axis]} on axis {axis}, its {name}; tiltsmc varies that axis from call "
                        "to call: export the model with that axis dynamic (optimum's exports have it so)"
                    )

    def _check_output_types(self, nodes: Mapping[str, Any], cache_type: str) -> None:
        """The outputs' element types and ranks as the graph declares them: float ``logits`` of rank 3,
        ``(batch, sequence, vocabulary)``, and ``present.*`` of the cache's type and rank 4 (a rank the
        graph leaves unknown is checked by ``_output_shapes``'s run)."""
        logits = nodes["logits"]
        if logits.type not in FLOAT_TYPES:
            raise float_type_error(logits.type, f"path: {self.model_file.name}: its logits output", "logits")
        if logits.shape and len(logits.shape) != 3:
            raise ValueError(
                f"path: {self.model_file.name}: its logits output has shape {logits.shape}; expected "
                "(batch, sequence, vocabulary), the logits of every position fed"
            )
        for _, present_name, _ in self._cache_names:
            node = nodes[present_name]
            if node.type != cache_type:
                raise ValueError(
                    f"path: {self.model_file.name}: output {present_name} is {node.type}, its "
                    f"past_key_values input {cache_type}; tiltsmc feeds a step's present as the next step's "
                    "past"
                )
            if node.shape and len(node.shape) != 4:
                raise ValueError(
                    f"path: {self.model_file.name}: output {present_name} has shape {node.shape}; expected a "
                    "KV cache (batch, heads, length, head_dim)"
                )

    def _output_shapes(
        self, value_output: Optional[str], nodes: Mapping[str, Any]
    ) -> tuple[dict[str, tuple[int, ...]], bool]:
        """The shapes of the logits, every ``present.*`` (and ``value_output``'s, where given) for one row of
        two tokens fed an empty KV cache, and whether a session call gave them: ``_check_cache_shapes``,
        ``_logits_width`` and ``_check_value_output`` check them at load, so that a graph whose outputs are
        not what tiltsmc reads is refused there, not at the first step. Where the graph declares every axis
        read (the vocabulary, the cache's heads and head size: optimum's exports do, ONNX Runtime's shape
        inference checked) and no value output is asked for, its declarations (other axes: 1 row, 2
        positions); else one small session call (two tokens of id 0). An ONNX Runtime error of that call is
        a ValueError naming the file and the cache it was fed."""
        names = list(self._output_names)
        read: dict[str, tuple[int, ...]] = {name: (1, 3) for name in names[1:]}
        read["logits"] = (2,)
        if value_output is None and all(
            len(nodes[name].shape) == max(axes) + 1
            and all(isinstance(nodes[name].shape[a], int) for a in axes)
            for name, axes in read.items()
        ):
            return {
                name: tuple(
                    d if isinstance(d, int) else 1 if axis == 0 else 2
                    for axis, d in enumerate(nodes[name].shape)
                )
                for name in names
            }, False
        if value_output is not None and nodes[value_output].type in FLOAT_TYPES:
            names.append(value_output)
        ids = np.zeros((1, 2), dtype=np.int64)
        feeds = self._feeds(ids, np.ones_like(ids), np.arange(2, dtype=np.int64)[None], None)
        try:
            results = self.session.run(names, feeds)
        except Exception as error:
            if not type(error).__module__.startswith("onnxruntime"):
                raise
            reason = " ".join(str(error).split())
            raise ValueError(
                f"path: {self.model_file.name} fails on a 2-token prompt fed an empty KV cache of "
                f"{self.kv_heads} heads of size {self.head_dim} a layer: {reason}"
            ) from error
        return {name: tuple(np.shape(result)) for name, result in zip(names, results)}, True

    def _check_cache_shapes(
        self,
        probe: Mapping[str, tuple[int, ...]],
        probed: bool,
        nodes: Mapping[str, Any],
        heads_from: str,
        size_from: str,
    ) -> None:
        """Every ``present.*`` of the probe ``(1, kv_heads, length, head_dim)``, as the cache geometry read
        from the graph or config.json (``cache_geometry_sources``) says: a KV cache of other heads or head
        size would be fed back at the first step and fail there (or, reshaped, be read wrongly)."""
        past_name = self._past_names[0]
        past_shape = next(node.shape for node in self.session.get_inputs() if node.name == past_name)
        for _, name, _ in self._cache_names:
            shape = probe[name]
            found = f"{self.model_file.name}'s {name} " + (
                f"has shape {shape} for one 2-token prompt" if probed else f"is declared {nodes[name].shape}"
            )
            if len(shape) != 4 or shape[0] != 1:
                raise ValueError(f"path: {found}; expected a KV cache (batch, heads, length, head_dim)")
            for axis, expected, where, what, fix in (
                (1, self.kv_heads, heads_from, "{} heads a layer", "num_key_value_heads"),
                (3, self.head_dim, size_from, "heads of size {}", "head_dim"),
            ):
                if shape[axis] != expected:
                    hint = (
                        f"; the graph declares {past_name} {past_shape}: set {fix} to {shape[axis]} in "
                        "config.json"
                        if "config.json" in where
                        else ""
                    )
                    raise ValueError(
                        f"{where} gives the KV cache {what.format(expected)}, but {found} "
                        f"({what.format(shape[axis])}{hint})"
                    )

    def _logits_width(self, shape: tuple[int, ...], probed: bool, node: Any, config_file: Source) -> int:
        """The vocabulary: the probe's logits, ``(1, 2, vocabulary)``, whose width must be the graph's
        static one and config.json's ``vocab_size`` where they give one."""
        declared = node.shape
        if len(shape) != 3 or shape[:2] != (1, 2) or shape[2] < 1:
            raise ValueError(
                f"path: {self.model_file.name}'s logits "
                + (
                    f"have shape {shape} for one 2-token prompt (declared {declared})"
                    if probed
                    else f"are declared {declared}"
                )
                + "; expected (batch, sequence, vocabulary), the logits of every position fed"
            )
        width = int(shape[2])
        if len(declared) == 3 and isinstance(declared[2], int) and declared[2] != width:
            raise ValueError(
                f"path: {self.model_file.name} declares logits {declared} but returns {shape} for one "
                "2-token prompt"
            )
        vocab = config_file.get("vocab_size")
        if vocab is not None and positive_int(vocab, config_file.name("vocab_size")) != width:
            raise ValueError(
                f"{config_file.name('vocab_size')}: {vocab}, but {self.model_file.name} returns {width} "
                "logits a position: a config.json of another model?"
            )
        return width

    @functools.cached_property
    def _names_group_query_attention(self) -> bool:
        """Whether the graph names ``GroupQueryAttention`` (its file read once, and only where asked)."""
        return bool(_operators_named(self.model_file, {"GroupQueryAttention": "GroupQueryAttention"}))

    def _choose_padding_side(self, padding_side: Optional[str], check_batching: bool) -> str:
        """The padding side asked for (``None``: the first of left and right whose rows pass the batching
        check; without the check, right where the graph names ``GroupQueryAttention``), checked where
        ``check_batching``; raises where none passes."""
        if not check_batching:
            if padding_side is not None:
                return padding_side
            return "right" if self._names_group_query_attention else "left"
        tried: list[tuple[str, float, float]] = []
        for side in PADDING_SIDES if padding_side is None else (padding_side,):
            self.padding_side = side
            difference, scale = self.batching_difference()
            if np.isnan(difference):
                short, long, _ = probe_ids(self.vocab_size)
                raise ValueError(
                    f"path: {self.model_file.name} returned NaN logits for two short prompts (token ids "
                    f"{', '.join(map(str, short))} and {', '.join(map(str, long))}): is the graph broken?"
                )
            if within_tolerance(difference, scale):
                return side
            tried.append((side, difference, scale))
        found = _operators_named(self.model_file, BATCH_DEPENDENT_OPERATORS)
        if not self.has_position_ids:  # its positions come from the batch's width: a padded row's are shifted
            cause = (
                "it has no position_ids input, so it numbers each row's positions itself, and a padded row "
                "gets other positions than alone (tiltsmc pads prompts of different lengths and the rows "
                "that sit out a step)"
                + (f"; its graph also names {', '.join(found)}" if found else "")
                + ": "
            )
        elif found:
            cause = f"its graph names {', '.join(found)}: "
        else:
            cause = (
                "attention that reads each row's length from the attention mask (ONNX Runtime's "
                "GroupQueryAttention, as onnxruntime-genai's model builder exports it) run with the other "
                "padding side, and dynamic int8 quantisation do this; "
            )
        other = ", let padding_side=None try both sides" if padding_side is not None else ""
        moved = "; ".join(
            f"{side}-padded by up to {difference:.3g} (logits up to {scale:.3g})"
            for side, difference, scale in tried
        )
        raise ValueError(
            f"path: {self.model_file.name} gives a row other logits when it runs beside a longer row or is "
            f"fed padding than when it runs alone ({moved}): tiltsmc batches rows that way, so its samples "
            f"would not follow the policy's law. {cause[0].upper()}{cause[1:]}export with optimum "
            f"(text-generation-with-past){other}, or pass check_batching=False to run it anyway"
        )

    def _choose_cache_in_place(self, cache_in_place: Optional[bool]) -> bool:
        """Whether decoding steps write the KV cache in place: asked for (``True``: refused where the
        policy is not right-padded, its session runs on the GPU, or the graph fails the trial) or, by
        default, where the trial passes (``in_place_difference``). On a GPU the host arrays would be copied
        to the device and back at every call, where the operator could not write them in place."""
        if cache_in_place is False:
            return False
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        if self.padding_side != "right" or on_gpu:
            if cache_in_place:
                where = "its session runs on the GPU" if on_gpu else "it is left-padded"
                raise ValueError(
                    "cache_in_place: needs a right-padded policy on the host (attention that reads each "
                    "row's length from its mask, such as GroupQueryAttention); "
                    f"{self.model_file.name}: {where}"
                )
            return False
        try:
            difference, scale = self.in_place_difference()
        except Exception as error:  # the graph refuses a past and present in one buffer
            if cache_in_place:
                raise ValueError(
                    f"cache_in_place: {self.model_file.name} does not run with its past and present in one "
                    f"buffer ({error}); pass cache_in_place=False"
                ) from error
            return False
        if within_tolerance(difference, scale):
            return True
        if cache_in_place:
            raise ValueError(
                f"cache_in_place: {self.model_file.name} with its past and present in one buffer moves a "
                f"step's logits or cache by up to {difference:.3g} (values up to {scale:.3g}) from the plain "
                "run; pass cache_in_place=False"
            )
        return False

    def in_place_difference(self) -> tuple[float, float]:
        """How far one decoding step written in place (``cache_in_place``) is from the plain step:
        ``(difference, scale)``, the largest absolute difference of the logits and of every row's cache
        columns, and the largest absolute value of the plain step's.

        Two prompts (2 and 4 tokens, right-padded) run, then one step feeds both a token with the cache in
        arrays three columns wider than the step needs, NaN in every row's columns past its length: a
        batch's rows hold what other runs or the memory left there (``Particles.in_place``), which the
        operator must never read.
        """
        short, long, token = probe_ids(self.vocab_size)
        ids, mask, positions = self._padded([short, long])
        _, present = self._run(ids, mask, positions, None)
        past = self._cache_of(present)
        step_ids, step_mask, step_positions, _ = self._decode_inputs(
            mask, np.array([True, True]), token[:2].copy()
        )
        plain_logits, plain_present = self._run(step_ids, step_mask, step_positions, past)
        buffers = [widened(cache, mask.shape[1] + 4, 2) for cache in past]
        prompt_lengths = mask_lengths(mask).tolist()
        for buffer in buffers:
            for row, length in enumerate(prompt_lengths):
                buffer[row, :, length:] = np.nan
        logits, _ = self._run_in_place(step_ids, step_mask, step_positions, buffers, buffers)
        lengths = mask_lengths(step_mask).tolist()
        pairs = [(logits, plain_logits)] + [
            (buffer[r, :, :n], cache[r, :, :n])
            for buffer, cache in zip(buffers, self._cache_of(plain_present))
            for r, n in enumerate(lengths)
        ]
        return largest_difference(pairs)

    def batching_difference(self) -> tuple[float, float]:
        """How far a row's logits move when it is batched as the samplers batch it (with this policy's
        ``padding_side``): ``(difference, scale)``, the largest absolute difference and the largest absolute
        logit of the row alone.

        Two prompts (2 and 4 tokens of fixed ids) run together, the shorter padded, then two steps: the
        first feeds the shorter row padding while the other gets a token, the second gives both a token.
        The shorter row's logits after its prompt and after its token are compared with the same prompt and
        token run alone. A graph that honours its attention mask gives the same logits to float rounding
        (the optimum exports tried give them bitwise here, left-padded; the GroupQueryAttention fixture to
        1e-6, right-padded).

        An ONNX Runtime error of these calls is a ValueError naming the file and the batches it was fed.
        """
        try:
            return self._batching_difference()
        except Exception as error:
            if not type(error).__module__.startswith("onnxruntime"):
                raise
            short, long, _ = probe_ids(self.vocab_size)
            reason = " ".join(str(error).split())
            raise ValueError(
                f"path: {self.model_file.name} fails on the batching check (padding_side="
                f"{self.padding_side!r}: two prompts of token ids {', '.join(map(str, short))} and "
                f"{', '.join(map(str, long))} in one batch, then two steps of one token a row, each with its "
                f"KV cache; and the first prompt alone): {reason}"
            ) from error

    def _batching_difference(self) -> tuple[float, float]:
        short, long, token = probe_ids(self.vocab_size)
        cache = self._cache_of

        def step(mask: np.ndarray, fed: list[bool], tokens: list[int], past: Any) -> tuple[Any, ...]:
            ids, feed_mask, positions, new_mask = self._decode_inputs(
                mask, np.array(fed), np.array(tokens, dtype=np.int64)
            )
            logits, present = self._run(ids, feed_mask, positions, past)
            return logits[:, -1], new_mask, cache(present)

        ids, mask, positions = self._padded([short, long])
        batch_logits, present = self._run(ids, mask, positions, None)
        alone_logits, alone_present = self._run(
            short[None], np.ones((1, 2), np.int64), np.arange(2)[None], None
        )
        _, mask, past = step(mask, [False, True], [0, int(token[1])], cache(present))
        batch_step, _, _ = step(mask, [True, True], [int(token[0]), int(token[2])], past)
        alone_step, _, _ = step(np.ones((1, 2), np.int64), [True], [int(token[0])], cache(alone_present))
        short_last = len(short) - 1 if self.padding_side == "right" else -1
        return largest_difference(
            [(batch_logits[0, short_last], alone_logits[0, -1]), (batch_step[0], alone_step[0])]
        )

    def _cache_of(self, present: Any) -> Any:
        """The cache tensors of a session call's outputs after the logits (the value scores come last,
        where the graph has them)."""
        return present[:-1] if self.value_output is not None else present

    def _padded(
        self, sequences: Sequence[npt.NDArray[np.int64]]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Prompts as one batch on this policy's ``padding_side``: ``(input_ids, attention_mask,
        position_ids)``."""
        return padded(sequences, self.pad_token_id, self.padding_side)

    def _decode_inputs(
        self, mask: npt.NDArray[np.int64], still: npt.NDArray[np.bool_], tokens: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """One cached step's inputs for rows with attention ``mask`` ``(rows, width)`` so far, row ``r``
        fed ``tokens[r]`` where ``still[r]``, else padding: ``(input_ids, attention_mask, position_ids,
        mask after the step)``, the masks ``(rows, width + 1)``. A row's position is its number of tokens
        so far. Left padding: the new column is the row's, a one where it is fed (the session reads the
        mask kept). Right padding: the session's mask covers each row's next column, which the graph
        writes whether or not the row is fed; the mask kept has a one there only where it is."""
        if self.padding_side == "left":
            ids, new_mask, positions = core.decode_inputs(mask, still, tokens, self.pad_token_id)
            return ids, new_mask, positions, new_mask
        return core.decode_inputs_right_padded(mask, still, tokens, self.pad_token_id)

    def _check_value_output(
        self, value_output: Optional[str], outputs: list[str], probe: Optional[tuple[int, ...]]
    ) -> Optional[str]:
        """A value head in the policy's graph, fetched with the logits at every run: one score per position
        (``(batch, seq)`` or ``(batch, seq, 1)``, read by ``tiltsmc.models.joint.PolicyValue``), or a
        token-level twist head, one score per position and token (``(batch, seq, vocab)`` with a static
        last dimension equal to the logits', read by ``tiltsmc.models.twist.PolicyTwist``), of a float
        type. ``probe``: its shape for one 2-token prompt (``_output_shapes``), which must be
        ``(1, 2)`` / ``(1, 2, 1)``, or ``(1, 2, vocab)`` for a twist head: a pooled score, one a row
        (``(batch, 1)``), is refused. Sets ``twist_head``."""
        self.twist_head = False
        if value_output is None:
            return None
        if not isinstance(value_output, str) or value_output not in outputs or value_output == "logits":
            raise ValueError(
                f"value_output: {value_output!r} is not a value output of {self.model_file.name}: outputs "
                f"{', '.join(outputs)}"
            )
        if self.device_cache:
            raise ValueError(
                "value_output: not read with device_cache=True (the KV cache on the GPU): pass False"
            )
        node = next(node for node in self.session.get_outputs() if node.name == value_output)
        if node.type not in FLOAT_TYPES:
            raise float_type_error(node.type, f"value_output: {value_output!r}", "scores")
        static = node.shape[2] if len(node.shape) == 3 and isinstance(node.shape[2], int) else 1
        expected = "one score per position, (batch, seq) or (batch, seq, 1), or a twist head (batch, seq, "
        if len(node.shape) not in (2, 3) or static not in (1, self.vocab_size):
            raise ValueError(
                f"value_output: {value_output!r} has shape {node.shape}; expected "
                f"{expected}{self.vocab_size})"
            )
        self.twist_head = static == self.vocab_size and static != 1
        allowed = [(1, 2, self.vocab_size)] if self.twist_head else [(1, 2), (1, 2, 1)]
        if probe not in allowed:
            pooled = probe is not None and len(probe) >= 1 and probe[1:] in ((), (1,), (1, 1))
            raise ValueError(
                f"value_output: {value_output!r} gives shape {probe} for one 2-token prompt (declared "
                f"{node.shape}); expected {expected}{self.vocab_size}) with a static last dimension"
                + ("; a pooled score, one a row, is not read: export the head's score at every position"
                   if pooled else "")
            )  # fmt: skip
        return value_output

    # -- prompts -----------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: Any, max_new_tokens: Optional[int] = None) -> npt.NDArray[np.int64]:
        """Token ids of one prompt (a string or chat messages with a tokenizer, or a sequence of ids);
        raises on bad input, and where the prompt and its new tokens (``max_new_tokens``, a run's limit,
        where lower than the policy's own) would not fit the model's context. An empty prompt is the BOS
        token alone; a text or chat prompt the tokenizer encodes to no tokens is refused."""
        encoded: Optional[Tokenizer] = None  # the tokenizer that wrote the ids, if one did
        if prompt is None or (isinstance(prompt, str) and prompt == ""):
            ids = np.zeros(0, dtype=np.int64)
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer= or token ids")
            ids, encoded = self._encode_text(prompt, None), self.tokenizer
        elif isinstance(prompt, Mapping):
            raise ValueError(
                "a single message is not a prompt: a chat prompt is a list of messages, e.g. "
                "[{'role': 'user', 'content': ...}] (and prompts a list of such lists)"
            )
        elif is_chat(prompt):
            if self.tokenizer is None:
                raise ValueError("a chat prompt needs a tokenizer with a chat template")
            # the template writes the special tokens it wants: none added again (Tokenizer.encode_chat)
            ids = self._encode_text(self.tokenizer.apply_chat_template(prompt), False)
            encoded = self.tokenizer
        else:
            ids = np.asarray(prompt)
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(f"expected a string or a 1-D sequence of token ids, got {prompt!r:.80}")
            ids = ids.astype(np.int64)
        # A tokenizer's ids are checked too: its post-processor or chat template may write ids past the
        # model's logits, on which the session would fail, and every prompt of the batch with it.
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            if encoded is None:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {bad}")
            token = encoded.token_text(bad)
            raise ValueError(
                f"the tokenizer encodes this prompt with the token id {bad}"
                + (f" ({token!r})" if token is not None else "")
                + f", outside the model's vocabulary [0, {self.vocab_size})"
            )
        if ids.size == 0 and encoded is not None:  # not the empty prompt: it would run unconditioned
            what = "text prompt" if isinstance(prompt, str) else "chat prompt (its template's text)"
            raise ValueError(
                f"the tokenizer gave no tokens for the {what} {prompt!r:.80}: it drops every character of "
                "it (no unk_token?); only the empty prompt, '', runs as the BOS token alone"
            )
        if ids.size == 0:
            if self.bos_token_id is None:
                raise ValueError("an empty prompt needs a bos_token_id (none in the configs)")
            ids = np.array([self.bos_token_id], dtype=np.int64)
        limit = (
            self.max_new_tokens if max_new_tokens is None else min(int(max_new_tokens), self.max_new_tokens)
        )
        if ids.size + limit > self.max_length:
            raise ValueError(
                f"{ids.size} prompt tokens + max_new_tokens {limit} exceed the model's context of "
                f"{self.max_length}"
            )
        return ids

    def _encode_text_once(self, text: str, add_special_tokens: Optional[bool]) -> npt.NDArray[np.int64]:
        """``Tokenizer.encode``, read-only: ``encode_prompt`` keeps the last ``ENCODED_TEXTS`` texts' ids."""
        assert self.tokenizer is not None
        ids = self.tokenizer.encode(text, add_special_tokens)
        ids.setflags(write=False)
        return ids

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache a particle holds a token: keys and values of every layer."""
        return int(2 * self.num_layers * self.kv_heads * self.head_dim * np.dtype(self.cache_dtype).itemsize)

    def decode(self, ids: npt.ArrayLike) -> str:
        """The text of a trajectory's tokens, ending before the first of the ``stop`` strings in it."""
        if self.tokenizer is None:
            raise ValueError("decode: this policy has no tokenizer")
        text = self.tokenizer.decode(ids)
        found = [at for at in (text.find(stop) for stop in self.stop) if at >= 0]
        return text[: min(found)] if found else text

    # -- the session ------------------------------------------------------------------------------------

    def _run(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        position_ids: npt.NDArray[np.int64],
        past: Any,
    ) -> tuple[np.ndarray, Any]:
        """Logits and the new cache: per-tensor host arrays, or a ``DeviceKVCache`` on the GPU."""
        if self.device_cache:
            return self._run_on_device(input_ids, attention_mask, position_ids, past)
        feeds = self._feeds(input_ids, attention_mask, position_ids, past)
        with self._one_call_at_a_time:
            results = self.session.run(self._output_names, feeds)
        return results[0], results[1:]  # with value_output, the value scores come last

    def _feeds(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        position_ids: npt.NDArray[np.int64],
        past: Optional[Sequence[np.ndarray]],
    ) -> dict[str, Any]:
        """A host session call's inputs: the cache tensors ``past``, or an empty cache (prompts)."""
        feeds: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            feeds["position_ids"] = position_ids
        if self.has_cache_branch:
            feeds["use_cache_branch"] = np.array([past is not None])
        if past is None:  # prompts: every layer starts from an empty cache
            empty = np.zeros((input_ids.shape[0], self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
            feeds.update((name, empty) for name in self._past_names)
        else:
            feeds.update(zip(self._past_names, past))
        return feeds

    def _run_in_place(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        position_ids: npt.NDArray[np.int64],
        caches: Sequence[np.ndarray],
        owners: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One session call whose ``past`` and ``present`` are the same host arrays, ``caches`` (``(rows,
        kv_heads, capacity, head_dim)`` each, C-contiguous, at least the mask's width of columns): the
        graph writes each row's new keys and values into them. Returns the logits and, where the graph
        has them, ``[value scores]`` (the cache needs no returning).

        A thread's binding is kept from call to call, its caches bound again only where their addresses
        or shapes change (a new width, a join): most steps bind the three small inputs alone. It knows the
        arrays ``caches`` are views of (``owners``, by weak reference): while they are the same, their
        memory is, and the addresses are not read again. From its second call, the binding writes the
        logits and value into arrays of its own (their shapes learned from the first), read without
        asking ONNX Runtime for its outputs."""
        bound: Optional[_InPlaceBinding] = getattr(self._in_place_bindings, "bound", None)
        if bound is None or not bound.holds(owners):
            key = [(cache.ctypes.data, cache.shape) for cache in caches]
            if bound is None or bound.key != key:
                binding = self.session.io_binding()
                binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
                if self.value_output is not None:
                    binding.bind_output(self.value_output, "cpu")
                for (past_name, present_name, _), cache in zip(self._cache_names, caches):
                    shape, pointer = list(cache.shape), cache.ctypes.data
                    binding.bind_input(past_name, "cpu", 0, self.cache_dtype, shape, pointer)
                    binding.bind_output(present_name, "cpu", 0, self.cache_dtype, shape, pointer)
                # by address and shape: arrays that come and go at the same address are the same binding
                self._in_place_bindings.bound = bound = _InPlaceBinding(binding, key)
            bound.follow(owners)
        binding = bound.binding
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        if self.has_position_ids:
            binding.bind_cpu_input("position_ids", position_ids)
        if self.has_cache_branch:
            binding.bind_cpu_input("use_cache_branch", np.array([True]))
        with self._one_call_at_a_time:
            self.session.run_with_iobinding(binding)
        # copied: a binding kept writes its next call's logits and value into the same memory
        if bound.outputs is not None:
            results = [array.copy() for array in bound.outputs]
        else:  # ONNX Runtime's own arrays (the caches come too, after them: not read back)
            names = ["logits"] if self.value_output is None else ["logits", self.value_output]
            outputs = binding.get_outputs()
            results = [np.array(outputs[k].numpy()) for k in range(len(names))]
            bound.outputs = [np.empty_like(result) for result in results]
            for name, array in zip(names, bound.outputs):  # from the next call on: written there
                binding.bind_output(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
        return results[0], results[1:]

    def _in_place_caches(self, particles: Particles, width: int) -> list[np.ndarray]:
        """The state's caches as ``(rows, kv_heads, capacity, head_dim)`` arrays a session writes in place,
        at least ``width`` columns wide: the state's own arrays where they are, else (too narrow, or not
        writeable and C-contiguous) copies into wider ones (``widened``: with spare rows where the batch had
        them), stored in the state. The new columns are not initialised, nor are a row's columns past
        its length after a join (another run's, or the memory's): the operator reads no column past a
        row's length (``in_place_difference`` checks it with NaN there, at load).

        A copy is as wide as the batch can ever need (``width`` and one column a token its rows may still
        take, at most ``max_new_tokens`` or the sampler's limit) where that is at most twice ``width``, so
        that a batch near its end grows once; else a quarter wider (at least 16 columns), since a limit far
        off may never be reached and the columns would hold memory for nothing. Never wider than the
        model's context (``max_length``): ONNX Runtime 1.19's operator refuses a buffer longer than its
        rotary table."""
        rows = particles.lengths.size
        caches = []
        capacity = None
        for _, _, key in self._cache_names:
            array = particles.state[key]
            if array.shape[3] < width or not (array.flags.c_contiguous and array.flags.writeable):
                if capacity is None:
                    capacity = max(width, array.shape[3] + max(array.shape[3] // 4, 16))
                    most = width + self._tokens_left(particles)
                    if capacity < most <= 2 * width:
                        capacity = most
                    capacity = max(width, min(capacity, self.max_length))
                particles.state[key] = array = widened(array, capacity, 3)
            caches.append(array.reshape(rows, self.kv_heads, -1, self.head_dim))
        return caches

    def _tokens_left(self, particles: Particles) -> int:
        """The most tokens any unfinished particle may still take (its limit: ``max_new_tokens``, or a
        sampler's ``Particles.state[MAX_NEW_TOKENS]`` where lower)."""
        going = ~particles.finished
        if not going.any():
            return 0
        limit = np.full(particles.lengths.shape, self.max_new_tokens, dtype=np.int64)
        own = particles.state.get(MAX_NEW_TOKENS)
        if own is not None:
            limit = np.minimum(limit, own)
        return max(0, int((limit - particles.lengths)[going].max()))

    def _run_on_device(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        position_ids: npt.NDArray[np.int64],
        past: Optional[DeviceKVCache],
    ) -> tuple[np.ndarray, DeviceKVCache]:
        """One session call with the cache in device memory. ``past`` (or nothing, for prompts) is bound by
        pointer; ``present`` is written by the session straight into a new cache of ``past``'s particles
        (``(rows, 1)`` for prompts), each tensor ``past + new tokens`` long; only ``logits`` come back to
        the host."""
        rows, width = input_ids.shape
        batch, count = (rows, 1) if past is None else past.shape[:2]
        length = width + (0 if past is None else past.length)
        present = DeviceKVCache.empty(
            2 * self.num_layers, batch, count, self.kv_heads, length, self.head_dim, self.cache_dtype,
            self.device_id,
        )  # fmt: skip
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        if self.has_position_ids:
            binding.bind_cpu_input("position_ids", position_ids)
        if self.has_cache_branch:
            binding.bind_cpu_input("use_cache_branch", np.array([past is not None]))
        for k, (name, present_name, _) in enumerate(self._cache_names):
            if past is None:
                empty = np.zeros((rows, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
                binding.bind_cpu_input(name, empty)
            else:
                pointer, shape = past.tensor(k)
                binding.bind_input(name, "cuda", self.device_id, self.cache_dtype, shape, pointer)
            pointer, shape = present.tensor(k)
            binding.bind_output(present_name, "cuda", self.device_id, self.cache_dtype, shape, pointer)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as error:
            raise RuntimeError(
                f"{self.model_file.name} failed with the KV cache on the GPU ({error}); the device cache "
                "expects each present.* to be past + new tokens long (device_cache=False lifts that)"
            ) from error
        return binding.get_outputs()[0].numpy(), present

    def release_memory(self) -> bool:
        """Shrink ONNX Runtime's CPU arena to about its idle size (the serving engine calls it when its
        last request has left: ``shrink_memory_arena``)."""
        return shrink_memory_arena(self.session)

    @property
    def supports_engine(self) -> bool:
        """Whether the serving engine can batch it: its host KV cache joins by padding
        (``Particles.aligned``); a device cache cannot join yet."""
        return not self.device_cache

    @property
    def engine_unsupported_reason(self) -> Optional[str]:
        if self.device_cache:
            return "its KV cache is on the GPU (device_cache); pass device_cache=False"
        return None

    # -- the Policy protocol ----------------------------------------------------------------------------

    # The samplers hand ``start`` each prompt's run's token limit (``Models.start``): a prompt fits the
    # context with the tokens its run may add, not the policy's own limit.
    start_takes_token_limits = True
    # next_log_probs fails a prompt whose logits no token can be drawn from itself (Models reads it so)
    log_probs_checked = True

    def start(
        self,
        prompts: Optional[Sequence[Any]],
        num_particles: int,
        max_new_tokens: Optional[Sequence[Optional[int]]] = None,
    ) -> Particles:
        """The Policy protocol's ``start``; ``max_new_tokens``: each prompt's run's token limit (None: the
        policy's), which its context check counts (``encode_prompt``)."""
        checked = check_prompts(prompts)
        prompt_list = [None] if checked is None else checked
        if not prompt_list:
            raise ValueError("prompts: expected at least one prompt, got an empty sequence")
        limits = [None] * len(prompt_list) if max_new_tokens is None else list(max_new_tokens)
        if len(limits) != len(prompt_list):
            raise ValueError(
                f"max_new_tokens: expected one per prompt ({len(prompt_list)}), got {len(limits)}"
            )
        encoded: list[npt.NDArray[np.int64]] = []
        errors: dict[int, str] = {}
        for b, prompt in enumerate(prompt_list):
            try:
                encoded.append(self.encode_prompt(prompt, limits[b]))
            except ImportError:  # a missing package (jinja2 for chat templates) fails every prompt alike
                raise
            except Exception as error:  # any failure of one prompt (the tokenizer's too) is that prompt's
                errors[b] = f"prompt {b}: {error}"
                encoded.append(np.array([self.pad_token_id], dtype=np.int64))
        input_ids, mask, positions = self._padded(encoded)
        batch = input_ids.shape[0]
        logits, present = self._prefill(input_ids, mask, positions)
        particles = Particles.empty(prompt_list, num_particles, self.max_new_tokens)
        particles.text_decoder = self if self.tokenizer is not None else None  # the verifier's text
        if self.value_output is not None:  # each prompt's value (or twist row) at its last token
            *present, value = present
            scores = np.asarray(value, dtype=np.float64).reshape(batch, -1)
            if not self.twist_head:
                scores = scores[:, 0]
            else:  # the twist score of each particle's last token, read from its parent's row
                particles.state["lm.value.chosen"] = np.full((batch, num_particles), np.nan)
            particles.state["lm.value"] = self._start_buffers.repeated(scores, num_particles)
        particles.prompt_tokens = encoded
        particles.errors = errors
        for b in errors:
            particles.finished[b] = True

        def repeat(a: np.ndarray) -> np.ndarray:
            return self._start_buffers.repeated(a, num_particles)

        particles.state["lm.mask"] = repeat(mask)
        # Padded sequences: batches of other lengths join by padding (Particles.concatenate).
        particles.aligned["lm.mask"] = (2, "lm.mask")
        particles.aligned.update((key, (3, "lm.mask")) for _, _, key in self._cache_names)
        if self.padding_side == "right":
            particles.right_padded.add("lm.mask")
        if self.cache_in_place:  # never trimmed; joins write newcomers into spare rows
            particles.in_place.update(key for _, _, key in self._cache_names)
        particles.state["lm.logits"] = repeat(np.asarray(logits, dtype=np.float32))
        if isinstance(present, DeviceKVCache):  # every particle of prompt b copies its prompt's cache
            particles.state["lm.cache"] = present.take(np.zeros((batch, num_particles), dtype=np.int64))
            return particles
        for (_, _, key), cache in zip(self._cache_names, present):
            particles.state[key] = repeat(cache)
        return particles

    def _prefill(
        self, input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]
    ) -> tuple[np.ndarray, Any]:
        """The prompts run through the graph: each prompt's logits at its last position ``(B, vocab)``, and
        the cache (with ``value_output``, the value scores at the last position last, ``(B, k)``).

        A graph returns logits at every position and holds attention scores for every pair of positions:
        a batch of long prompts in one call takes memory in proportion to its rows times their width (and
        more, the square of the width, for the scores). Rows are run ``prefill_tokens // width`` at a time
        (at least one), each call's outputs copied into the batch's arrays as it returns; a prompt wider
        than ``prefill_tokens`` runs in pieces of that many positions, each piece a cached step over the
        cache of the pieces before it (as decoding a token is, with more tokens); right-padded, such rows
        run one at a time (see the module docstring). With the cache on the GPU, one call."""
        batch, width = input_ids.shape
        rows = max(1, self.prefill_tokens // max(width, 1))
        if self.device_cache or rows >= batch:
            return self._prefill_rows(input_ids, mask, positions)
        if self.padding_side == "right" and width > self.prefill_tokens:
            return self._prefill_alone(input_ids, mask, positions)
        logits: Optional[np.ndarray] = None
        present: list[np.ndarray] = []
        for k in range(0, batch, rows):
            part = slice(k, k + rows)
            part_logits, part_present = self._prefill_rows(input_ids[part], mask[part], positions[part])
            if logits is None:
                logits = np.empty((batch, *part_logits.shape[1:]), dtype=part_logits.dtype)
                present = [np.empty((batch, *t.shape[1:]), dtype=t.dtype) for t in part_present]
            logits[part] = part_logits
            for whole, piece in zip(present, part_present):
                whole[part] = piece
        assert logits is not None
        return logits, present

    def _prefill_rows(
        self, input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]
    ) -> tuple[np.ndarray, Any]:
        """``_prefill`` of rows run together: in one call, or in pieces of ``prefill_tokens`` positions
        where they are wider (the attention mask of every position so far, the cache carried). Right-padded,
        rows come here wider than ``prefill_tokens`` one at a time without padding (``_prefill_alone``),
        and run whole where the graph computes a piece after a cache wrongly."""
        width = input_ids.shape[1]
        if (
            self.device_cache
            or width <= self.prefill_tokens
            or (self.padding_side == "right" and not self._pieces_follow_the_cache())
        ):
            return self._last_position(*self._run(input_ids, mask, positions, None), mask)
        past: Any = None
        for start in range(0, width, self.prefill_tokens):
            stop = min(start + self.prefill_tokens, width)
            logits, present = self._run(
                input_ids[:, start:stop], mask[:, :stop], positions[:, start:stop], past
            )
            past = self._cache_of(present)
        return self._last_position(logits, present, mask[:, start:stop])

    def _pieces_follow_the_cache(self) -> bool:
        """Whether a prompt run in two pieces, the second after the first's cache, gets the logits of the
        prompt run whole (to ``BATCHING_TOLERANCE``): asked once, by a right-padded policy whose prompt is
        longer than ``prefill_tokens`` (ONNX Runtime 1.19.2's CPU GroupQueryAttention computes the second
        piece wrongly, 1.32.0's rightly)."""
        if self._pieces_follow is None:
            _, prompt, _ = probe_ids(self.vocab_size)
            ones = np.ones((1, len(prompt)), dtype=np.int64)
            positions = np.arange(len(prompt))[None]
            whole, _ = self._run(prompt[None], ones, positions, None)
            _, present = self._run(prompt[None, :2], ones[:, :2], positions[:, :2], None)
            second, _ = self._run(prompt[None, 2:], ones, positions[:, 2:], self._cache_of(present))
            difference, scale = largest_difference([(second[0], whole[0, 2:])])
            self._pieces_follow = within_tolerance(difference, scale)
        return self._pieces_follow

    def _prefill_alone(
        self, input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]
    ) -> tuple[np.ndarray, Any]:
        """Right-padded rows wider than ``prefill_tokens``, each run alone without its padding (in pieces
        where the graph computes them rightly), their caches joined right-padded."""
        lengths = mask_lengths(mask)
        rows = [
            self._prefill_rows(input_ids[r : r + 1, :n], mask[r : r + 1, :n], positions[r : r + 1, :n])
            for r, n in enumerate(lengths)
        ]
        logits = np.concatenate([row_logits for row_logits, _ in rows])
        layers = len(self._cache_names)
        present: list[np.ndarray] = [
            core.concatenate_padded([row_present[k] for _, row_present in rows], 2, padding_side="right")
            for k in range(layers)
        ]
        if self.value_output is not None:
            present.append(np.concatenate([row_present[layers] for _, row_present in rows]))
        return logits, present

    def _last_position(self, logits: np.ndarray, present: Any, mask: np.ndarray) -> tuple[np.ndarray, Any]:
        """The logits, and the value scores where the graph has them, at each row's last position, the
        last column of ``mask`` (the call's columns) or, right-padded, its last one (copies: the arrays of
        every position are freed at once)."""
        if self.padding_side == "right":
            last = np.maximum(mask_lengths(mask) - 1, 0)
        else:
            last = np.full(len(mask), mask.shape[1] - 1)
        rows = np.arange(len(last))  # index arrays: copies
        if self.value_output is None or isinstance(present, DeviceKVCache):
            return logits[rows, last], present
        *cache, value = present
        value = np.asarray(value)
        return logits[rows, last], [*cache, value.reshape(value.shape[0], value.shape[1], -1)[rows, last]]

    def next_log_probs(self, particles: Particles) -> FloatArray:
        """``log p(v | prefix)`` of every token, ``(B, N, vocab)``: the sampled law, filters included.

        A prompt whose unfinished particles got logits no token can be drawn from (NaN, ``+inf``, every
        logit ``-inf``) fails alone, as in ``propose``: its reason in ``particles.errors``, its particles
        finished. Finished particles (never drawn for) read a uniform law whatever their logits."""
        particles.flush()
        logits = particles.state["lm.logits"]
        try:
            return self._log_probs(logits)
        except ValueError:
            if type(logits) is not np.ndarray:  # on a device: the batch fails
                raise
            self._fail_prompts_with_bad_logits(particles, ~particles.finished)
        finished = particles.finished.reshape(*particles.finished.shape, 1)
        return self._log_probs(np.where(finished, np.zeros((), dtype=logits.dtype), logits))

    def _log_probs(self, logits: FloatArray) -> FloatArray:
        """``next_log_probs`` of these logits (ValueError for NaN or ``+inf`` among them, or a row of
        ``-inf`` only: no law)."""
        row_max = logits.max(axis=-1) if logits.size else logits
        if not (row_max < np.inf).all():  # NaN propagates through max
            what = "NaN" if np.isnan(logits).any() else "+inf"
            raise ValueError(f"logits: {self.model_file.name} returned bad logits: {what} in its output")
        if not (row_max > -np.inf).all():
            raise ValueError(f"logits: {self.model_file.name} returned bad logits: a row of -inf only")
        log_probs = log_softmax(self._scaled(logits, row_max))
        if self.top_k is not None and self.top_k < self.vocab_size:
            kth = np.partition(log_probs, -self.top_k, axis=-1)[..., -self.top_k][..., None]
            log_probs = np.where(log_probs >= kth, log_probs, -np.inf)
            log_probs = log_softmax(log_probs)
        if self.top_p is not None and self.top_p < 1.0:
            order = np.argsort(-log_probs, axis=-1, kind="stable")
            sorted_probs = np.exp(np.take_along_axis(log_probs, order, axis=-1))
            before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ranked above
            keep_sorted = before < self.top_p
            keep = np.empty_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            log_probs = log_softmax(np.where(keep, log_probs, -np.inf))
        return log_probs

    def _scaled(self, logits: np.ndarray, row_max: np.ndarray) -> np.ndarray:
        """``logits / temperature`` (in the logits' type), whose rows' largest ``row_max`` are finite; where
        that overflows (a temperature far below 1, whose quotients pass the type's range) or the type holds
        the temperature only roughly (below its smallest normal number, or not at all),
        ``(logits - row_max) / temperature`` in float64, the same law (as ``tiltsmc.core.sample_logits``
        draws it): a zero in every row, never NaN or ``+inf``, so a temperature that tends to 0 gives its
        limit, the most likely tokens."""
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scaled = logits / self.temperature
            # the rows' largest quotients, without a pass over them: dividing by T > 0 keeps the order
            largest = row_max / self.temperature
        normal = scaled.dtype.kind != "f" or self.temperature >= np.finfo(scaled.dtype).tiny
        if normal and np.isfinite(largest).all():
            return scaled
        shifted = np.asarray(logits, dtype=np.float64) - np.asarray(row_max, dtype=np.float64)[..., None]
        with np.errstate(over="ignore"):
            return shifted / self.temperature

    def _draw(
        self, particles: Particles, rng: np.random.Generator, active: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """One token per ``active`` particle from
        [`next_log_probs`][tiltsmc.models.onnx_lm.OnnxCausalLM.next_log_probs]'s law, and its log-probability
        (0 elsewhere), ``(B, N)``.

        Without top-k / top-p the law is ``softmax(logits / temperature)``: one
        [`tiltsmc.core.sample_logits`][tiltsmc.core.sample_logits] call draws every token and returns ``log
        p(v)``. With them, [`tiltsmc.core.pool_select`][tiltsmc.core.pool_select] draws from the filtered,
        normalised log-probabilities ``s = log p``, so ``log p(v) = s_v``.
        """
        particles.flush()
        try:
            return self._draw_active(particles, rng, active)
        except ValueError:  # NaN, +inf or no token of positive probability: the prompts whose rows hold them
            if not self._fail_prompts_with_bad_logits(particles, active):
                raise
        return self._draw_active(particles, rng, active)  # the others, with the keys drawn before: undone

    def _draw_active(
        self, particles: Particles, rng: np.random.Generator, active: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.int64], FloatArray]:
        shape = particles.lengths.shape
        logits = particles.state["lm.logits"].reshape(-1, self.vocab_size)
        if self.top_k is None and self.top_p is None:
            try:
                index, chosen = core.sample_logits(logits, self.temperature, rng, where=active)
            except ValueError as error:  # NaN or +inf logits
                raise ValueError(f"logits: {self.model_file.name} returned bad logits: {error}") from error
        else:  # the rows not drawn are not read (as sample_logits reads them); _log_probs refuses NaN, +inf
            if not active.all():
                logits = np.where(active.reshape(-1, 1), logits, 0.0)
            scores = self._log_probs(logits)
            index, _ = core.pool_select(scores, rng)
            chosen = np.where(active.reshape(-1), scores[np.arange(len(index)), index], 0.0)
        return index.reshape(shape), chosen.reshape(shape)

    def _fail_prompts_with_bad_logits(self, particles: Particles, active: npt.NDArray[np.bool_]) -> bool:
        """Fail the prompts whose ``active`` rows got logits no token can be drawn from (NaN, ``+inf``, or
        every logit ``-inf``): each gets its reason in ``particles.errors`` and its particles finish (and
        leave ``active``), so that the others are drawn as they would be without it (a serving batch's
        other requests go on). Whether any did; False (the batch fails) for logits on a device."""
        logits = particles.state["lm.logits"]
        if type(logits) is not np.ndarray:
            return False
        row_max = logits.reshape(*particles.lengths.shape, -1).max(axis=-1)
        failing = fail_prompts_without_a_law(
            particles, row_max, active, f"logits: {self.model_file.name} returned"
        )
        active[failing] = False
        return bool(failing)

    def append(self, particles: Particles, tokens: npt.NDArray[np.int64]) -> None:
        """Extend every unfinished particle by one token (``(B, N)``) and run the model one step.

        ``tokens`` must be integer token ids of shape ``(B, N)`` (``particles.lengths.shape``), each
        unfinished particle's in ``[0, vocab_size)`` (finished particles' entries are not read): TypeError
        or ValueError naming ``tokens`` otherwise, raised before anything is written."""
        active = ~particles.finished
        self._advance(particles, self._checked_tokens(tokens, active), active)

    def _checked_tokens(self, tokens: Any, active: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """``append``'s ``tokens`` as a C-contiguous int64 array, once checked: an integer array of
        ``active``'s shape whose ``active`` entries are token ids in ``[0, vocab_size)``."""
        array = np.asarray(tokens)
        if array.dtype.kind not in "iu":
            raise TypeError(f"tokens: expected integer token ids, got an array of {array.dtype}")
        if array.shape != active.shape:
            raise ValueError(f"tokens: expected shape (B, N) = {active.shape}, got {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            chosen = array[active]  # a finished particle's entry may hold anything
            outside = chosen[(chosen < 0) | (chosen >= self.vocab_size)]
            if outside.size:
                raise ValueError(
                    f"tokens: token ids of unfinished particles must lie in [0, {self.vocab_size}), got "
                    f"{int(outside[0])}"
                )
        return np.ascontiguousarray(array, dtype=np.int64)

    def _advance(
        self,
        particles: Particles,
        tokens: npt.NDArray[np.int64],
        active: npt.NDArray[np.bool_],
        fed: Optional[FedRows] = None,
    ) -> None:
        """Append ``tokens`` where ``active``; feed every row one position (padding, masked, elsewhere).

        A row's position is the number of tokens its mask has let through so far (its prompt's real
        tokens and the tokens it was fed), so left padding and masked steps never shift positions. The
        session run itself is deferred ([`Particles.defer`][tiltsmc.models.particles.Particles.defer]) until
        the state is next needed: the next draw, or resampling, which then copies caches the run has just
        written (still in the CPU's caches); the run after a sampler's last step never happens. ``fed``:
        the rows a multi-token step runs on (``propose``).
        """
        particles.flush()
        if self.twist_head:  # the parent's twist row scores the token appended now
            index = np.clip(tokens, 0, self.vocab_size - 1)[..., None]  # inactive rows may hold anything
            chosen = np.take_along_axis(particles.state["lm.value"], index, -1)[..., 0]
            particles.state["lm.value.chosen"] = np.where(active, chosen, particles.state["lm.value.chosen"])
        still, going = self._append_tokens(particles, tokens, active)
        if self.value_output is not None and not self.twist_head:
            # a value head needs the value of the last token too: rows that have just ended are fed it
            still, going = active.copy(), int(np.count_nonzero(active))
        if going == 0:
            return
        batch, count = particles.lengths.shape
        rows = batch * count
        feed_tokens, feed_mask, positions, new_mask = self._decode_inputs(
            particles.state["lm.mask"].reshape(rows, -1), still, tokens
        )
        particles.state["lm.mask"] = new_mask.reshape(batch, count, -1)
        run = functools.partial(self._decode, particles, feed_tokens, feed_mask, positions, still, fed)
        particles.defer(run)

    def _decode(
        self,
        particles: Particles,
        feed_tokens: npt.NDArray[np.int64],
        feed_mask: npt.NDArray[np.int64],
        positions: npt.NDArray[np.int64],
        still: npt.NDArray[np.bool_],
        fed: Optional[FedRows] = None,
    ) -> None:
        """One session call on the inputs ``_advance`` built: new logits and caches into the state. With
        ``fed``, on the rows it gives (every row, or those still writing the step: their caches kept in
        ``fed`` until the step ends)."""
        rows = particles.lengths.size
        past: Any = (
            particles.state["lm.cache"]
            if self.device_cache
            else [
                particles.state[key].reshape(rows, self.kv_heads, -1, self.head_dim)
                for _, _, key in self._cache_names
            ]
        )
        index = None
        if fed is not None:
            index, past = fed.session_rows(past, still)
            if index is not None:
                feed_tokens, feed_mask, positions = feed_tokens[index], feed_mask[index], positions[index]
        in_place = self.cache_in_place and index is None
        if in_place:  # every row's cache written where it lies: nothing to store after the call
            past = self._in_place_caches(particles, feed_mask.shape[1])
            owners = [particles.state[key] for _, _, key in self._cache_names]
            logits, present = self._run_in_place(feed_tokens, feed_mask, positions, past, owners)
        else:
            logits, present = self._run(feed_tokens, feed_mask, positions, past)
        if self.value_output is not None:
            *present, value = present
            scores = np.asarray(value, dtype=np.float64)
            scores = scores.reshape(len(scores), -1)
            if not self.twist_head:
                scores = scores[:, 0]
            particles.state["lm.value"] = _fed_rows_updated(particles.state["lm.value"], scores, still, index)
        logits = np.asarray(logits[:, -1, :], dtype=np.float32)
        particles.state["lm.logits"] = _fed_rows_updated(particles.state["lm.logits"], logits, still, index)
        if isinstance(present, DeviceKVCache):
            particles.state["lm.cache"] = present
        elif in_place:
            return
        elif fed is not None and index is not None:
            fed.keep(present)
        else:
            self._store_caches(particles, present)

    def _store_caches(self, particles: Particles, caches: Sequence[np.ndarray]) -> None:
        """Every row's host caches, ``(rows, heads, length, dim)`` each, into the state as ``(B, N, ...)``."""
        batch, count = particles.lengths.shape
        for (_, _, key), cache in zip(self._cache_names, caches):
            particles.state[key] = cache.reshape(batch, count, *cache.shape[1:])

    def _merge_fed(self, particles: Particles, fed: FedRows) -> None:
        """The end of a step run on fewer rows: every row's caches back into the state (``FedRows.merge``)."""
        merged = fed.merge()
        if merged is not None:
            self._store_caches(particles, merged)

    def _append_tokens(
        self, particles: Particles, tokens: npt.NDArray[np.int64], active: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.bool_], int]:
        """Write ``tokens`` where ``active`` and mark ended trajectories (at ``max_new_tokens`` or an EOS
        token, or at a sampler's own limit ``Particles.state[MAX_NEW_TOKENS]``); returns the rows still going
        and how many there are."""
        still, going = core.append_tokens(
            particles.tokens, particles.lengths, particles.finished, tokens, active, self._eos_ids,
            self.max_new_tokens,
        )  # fmt: skip
        limit = particles.state.get(MAX_NEW_TOKENS)
        if limit is not None:
            over = still & (particles.lengths >= limit)
            if over.any():
                particles.finished |= over
                still &= ~over
                going = int(np.count_nonzero(still))
        if self.stop and going:
            stopped = self._stopped(particles, still)
            if stopped.any():
                particles.finished |= stopped
                still &= ~stopped
                going = int(np.count_nonzero(still))
        return still, going

    def _stopped(self, particles: Particles, rows: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """Which of ``rows`` have just completed a stop string with their newest token: the text of their
        last ``_stop_window`` tokens that have text of their own holds one (an earlier one would have ended
        the row earlier), with the tokens without text among and after them (``_has_text``: special tokens
        where ``decode`` leaves them out, however many split the stop string). The window covers the
        longest stop string however it is split (a token with text is at least one byte of it, a character
        at most four); where its tokens are whole characters it also holds the token before the stop
        string, which matters where a decoder drops a text's leading space (SentencePiece). A row whose
        last ``_stop_window`` tokens all have text (most rows) decodes just those, as before.
        """
        assert self.tokenizer is not None
        index = np.nonzero(rows)
        lengths = particles.lengths[index]
        starts = np.maximum(lengths - self._stop_window, 0)
        tokens = particles.tokens[index]
        textless = self._textless(tokens, starts, lengths)
        for r in np.nonzero(textless)[0].tolist():  # widened to _stop_window tokens with text
            starts[r] = self._window_start(tokens[r], int(lengths[r]))
        windows = [row[start:length].tolist() for row, start, length in zip(tokens, starts, lengths)]
        texts = self.tokenizer.decode_batch(windows)
        stopped = np.zeros(rows.shape, dtype=bool)
        stopped[index] = [any(stop in text for stop in self.stop) for text in texts]
        return stopped

    def _textless(
        self, tokens: npt.NDArray[np.int64], starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """Whether each row's tokens ``tokens[r, starts[r]:lengths[r]]`` include one that decodes alone to
        no text (learned per token id on first sight, in ``_has_text``)."""
        table = self._has_text
        width = int((lengths - starts).max(initial=0))
        if width == 0:
            return np.zeros(len(lengths), dtype=bool)
        columns = starts[:, None] + np.arange(width)
        inside = columns < lengths[:, None]
        ids = np.clip(np.take_along_axis(tokens, np.minimum(columns, tokens.shape[1] - 1), axis=1), 0,
                      self.vocab_size - 1)  # fmt: skip
        known = table[ids]
        unknown = inside & (known < 0)
        if unknown.any():
            self._learn_text(np.unique(ids[unknown]))
            known = table[ids]
        textless: npt.NDArray[np.bool_] = (inside & (known == 0)).any(axis=1)
        return textless

    def _window_start(self, tokens: npt.NDArray[np.int64], length: int) -> int:
        """Where ``_stopped``'s window of a row of ``tokens`` (its first ``length``) starts: at its
        ``_stop_window``-th last token with text, or at its first token where it has fewer."""
        table, need, start = self._has_text, self._stop_window, length
        while start > 0 and need > 0:  # each pass reads at least the tokens with text still needed
            begin = max(start - need, 0)
            ids = np.clip(tokens[begin:start], 0, self.vocab_size - 1)
            if (table[ids] < 0).any():
                self._learn_text(np.unique(ids[table[ids] < 0]))
            has_text = table[ids] > 0
            if int(np.count_nonzero(has_text)) >= need:  # the need-th from the end among them
                return begin + int(np.nonzero(has_text)[0][-need])
            need -= int(np.count_nonzero(has_text))
            start = begin
        return start

    def _learn_text(self, ids: npt.NDArray[np.int64]) -> None:
        """Note in ``_has_text`` whether each of ``ids`` decodes alone to some text (as ``decode`` would:
        a special token left out has none)."""
        assert self.tokenizer is not None
        texts = self.tokenizer.decode_batch([[token] for token in ids.tolist()])
        self._has_text[ids] = [text != "" for text in texts]

    def _could_end_step(self, tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Whether each token could be the one that makes a step's text end with ``step_text`` (it did
        not end with it before: the step would have ended there). Where the tokenizer's text of a sequence
        is its tokens' texts joined (its decoder is ``Fuse`` alone), only a token whose text ends with the
        delimiter's last character can, and the other rows skip decoding the step so far, the check
        ``propose`` makes on the rest; with any other decoder (byte-level, SentencePiece's: a token's text
        depends on its neighbours) every row is checked. Learned per token id on first sight."""
        assert self.step_text is not None and self.tokenizer is not None
        table = self._could_end
        if table is None:  # another decoder, or the empty delimiter (every text ends with it)
            return np.ones(tokens.shape, dtype=bool)
        ids = np.clip(tokens, 0, self.vocab_size - 1)  # rows that did not draw hold anything
        known = table[ids]
        if known.min() < 0:
            for token in np.unique(ids[known < 0]).tolist():
                text = self.tokenizer.decode([token], skip_special_tokens=False)
                table[token] = text.endswith(self.step_text[-1])
            known = table[ids]
        could: npt.NDArray[np.bool_] = known > 0
        return could

    def propose(self, particles: Particles, rng: np.random.Generator) -> FloatArray:
        """Draw one step for every unfinished particle; returns ``log p(step)`` (0 where finished).

        A step of several tokens adds up their log-probabilities: ``log p(step) = sum_k log p(token_k)``.
        """
        in_step = ~particles.finished
        if self.token_level:
            tokens, log_p = self._draw(particles, rng, in_step)
            self._advance(particles, tokens, in_step)
            return log_p
        step_start = particles.lengths.copy() if self.step_text is not None else None
        total = np.zeros(particles.lengths.shape)
        fed = None
        if self.step_rows_below > 0 and not self.device_cache:
            fed = FedRows(particles.lengths.size, self.step_rows_below)
        while in_step.any():
            tokens, chosen = self._draw(particles, rng, in_step)
            total += chosen
            self._advance(particles, tokens, in_step, fed)
            done = particles.finished.copy()
            if self.step_ids is not None:
                done |= np.isin(tokens, self._step_id_array)
            else:
                assert self.step_text is not None and self.tokenizer is not None and step_start is not None
                for b, i in zip(*np.nonzero(in_step & ~done & self._could_end_step(tokens))):
                    text = self.tokenizer.decode(  # a delimiter may be a special token
                        particles.tokens[b, i, step_start[b, i] : particles.lengths[b, i]],
                        skip_special_tokens=False,
                    )
                    done[b, i] = text.endswith(self.step_text)
            in_step &= ~done
        if fed is not None:  # after the step's last session call, which is deferred too
            particles.defer(functools.partial(self._merge_fed, particles, fed))
        return total


def _fed_rows_updated(
    old: np.ndarray, new: np.ndarray, still: npt.NDArray[np.bool_], index: Optional[npt.NDArray[np.int64]]
) -> np.ndarray:
    """A per-row state array (``(B, N, ...)``) after a session call: ``new``'s rows (one per row run: every
    row, or ``index``'s) where ``still`` (fed a real token), ``old``'s elsewhere (rows fed padding keep what
    their last real token gave)."""
    if index is None:
        new = new.reshape(old.shape)
        if still.all():
            return new
        return np.where(still.reshape(still.shape + (1,) * (old.ndim - 2)), new, old)
    out = old.copy()
    fed = still.reshape(-1)[index]
    out.reshape(-1, *old.shape[2:])[index[fed]] = new[fed]
    return out
