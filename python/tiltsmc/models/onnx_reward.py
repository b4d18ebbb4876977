r"""A process reward model or value model exported to ONNX, read as ``log Vh`` of each prefix.

The graph takes ``input_ids`` and ``attention_mask`` (and ``position_ids`` where it has that input) for
the prefix prompt + generated steps, and returns one score per row (``(batch,)`` or ``(batch, 1)``) or per
position (``(batch, seq)`` or ``(batch, seq, 1)``), read at the last real token (``position="last"``) or,
for a process reward model scoring steps at their delimiter, at the last step delimiter of the generated
text (``position="delimiter"`` with ``delimiter_ids``, for an output with a score per position; the last
prompt token before the first delimiter, the last token once the trajectory is finished).
``kind`` says what the score is: ``"log_value"`` (``log Vh`` itself), ``"prob"`` (``Vh`` in [0, 1]) or
``"logit"`` (``Vh = sigmoid(score)``). On finished trajectories the terminal reward ``r`` is the model's
value unless a ``verifier(prompt, text) -> r >= 0`` is given (``text``: the policy's, as the results report
it, from ``Particles.text_decoder``; the token ids where the particles carry no decoder and this model
reads other ids, a ``token_map``'s). Prefixes are scored in one batched call per
step, and only those that changed since they were last scored (values follow resampling in
``Particles.state``). An empty prompt's ``log Vh_0`` is 0 (no token to read it at), as is an empty
prefix's, and the other prompts of its batch are scored as without it. ``token_map`` translates the
policy's token ids into the reward model's (padding, ``pad_token_id``, is the reward model's own id, as
are ``delimiter_ids``: a step is scored where the translated ids hold a delimiter).

The output's layout is read at load: from its declared shape where its axes bear the names of
``input_ids``' (batch, sequence) and its last axis is the sequence or of fixed size, else from its shapes
for 2 rows of 3 and of 5 tokens (two small runs): an axis after the rows' that follows their width is the
sequence, one of fixed size a class axis. Refused at load, naming the output: one that fits no layout
(rank 0 or above 3, rows not first), scores of a type other than float, float16 or double, a class axis
without ``label=`` (optimum's text-classification ``(batch, 2)`` among them), ``label=`` without a class
axis, a label or classes beyond it; and inputs it cannot feed (``input_ids``, ``attention_mask`` and
``position_ids`` are fed int64, as to the policy: ``_ort.check_inputs``).

Classifier heads. With ``label=k`` the output has a class axis last, ``(batch, C)`` or ``(batch, seq, C)``
(a ``token-classification`` export with C labels, e.g. a two-label PRM whose step score is ``softmax(s)[1]``;
or a causal LM's ``logits`` over its vocabulary, as PRMs that score a step by the next-token probability
of a "good" token), and ``Vh`` is class ``k``'s probability. Over the classes ``K`` (``classes=``, default
all ``C``) of the score vector ``s`` read at the row's position:

* ``kind="logit"``: ``log Vh = s_k - log sum_{j in K} exp(s_j)`` (log-softmax over ``K``);
* ``kind="prob"``: ``Vh = s_k / sum_{j in K} s_j`` with ``classes=``, else ``s_k``;
* ``kind="log_value"``: ``s_k - log sum_{j in K} exp(s_j)`` with ``classes=``, else ``s_k``.

A decoder exported with a KV cache (``past_key_values.*`` inputs and ``present.*`` outputs,
``use_cache_branch`` of a merged decoder, ``position_ids``) and one score per position keeps its own cache
per particle in ``Particles.state`` (``tiltsmc.models.reward_cache``): each call runs only the tokens
appended since the last, and the values equal re-encoding's. ``kv_cache=False`` re-encodes whole prefixes
instead (fed an empty cache), as graphs without a cache always are; ``kv_cache=True`` refuses a graph that
cannot keep one. The cache needs scores that do not depend on a row's padding (prompts start left-padded,
a row with fewer new tokens is fed masked padding): at load the cached path is tried against re-encoding
on two rows of different lengths (``cache_difference``), and where they differ (attention that reads each
row's length from the mask, as ONNX Runtime's ``GroupQueryAttention`` does) ``kv_cache=None`` re-encodes
(right-padded, which such a graph reads correctly) and ``kv_cache=True`` is refused. Batches with an empty
prompt are re-encoded. A decoder's ``logits`` hold ``rows x seq x vocab`` floats per call (a 150k
vocabulary makes that 0.6 MB a position), so for large vocabularies an export whose head keeps only the
classes needed is the one to use.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol, Union

import numpy as np
import numpy.typing as npt

from .. import core
from ._config import Source, positive_int, token_id, token_ids
from ._ort import FLOAT_TYPES, check_inputs, float_type_error, make_session, shrink_memory_arena
from .onnx_lm import (
    _PAST,
    BATCHING_TOLERANCE,
    cache_geometry,
    largest_difference,
    log_softmax,
    probe_ids,
    read_json,
    resolve_model_file,
    session_call_guard,
)
from .particles import Particles
from .reward_cache import KVCachedScorer, Reader
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["OnnxRewardModel"]

FloatArray = npt.NDArray[np.float64]
KINDS = core.SCORE_KINDS
_LAYOUTS = (
    "expected one score a row ((batch,) or (batch, 1)) or a position ((batch, seq) or (batch, seq, 1)), "
    "or pass label= to read a class axis"
)
_CLASS_LAYOUTS = "(batch, classes) or (batch, seq, classes)"
logger = logging.getLogger(__name__)


class TextDecoder(Protocol):
    """What decodes a trajectory's token ids for a verifier: a policy (``OnnxCausalLM.decode``, whose text
    ends before its stop strings) or a tokenizer."""

    def decode(self, ids: npt.ArrayLike) -> str: ...


def _select(array: np.ndarray, selected: Optional[npt.NDArray[np.int64]]) -> np.ndarray:
    """The entries ``selected`` (flat particle indices) of a ``(B, N)`` array, or all of them (flattened)."""
    flat = array.reshape(-1)
    return flat if selected is None else flat[selected]


@dataclass(frozen=True)
class _Prompts:
    """A batch's prompt tokens laid end to end for
    [`tiltsmc.core.right_padded_prefixes`][tiltsmc.core.right_padded_prefixes]: prompt ``b`` is
    ``ids[offsets[b]:offsets[b + 1]]``. ``arrays`` are the arrays it was built from (None: no prompt
    tokens, every prompt empty)."""

    arrays: Optional[tuple[npt.NDArray[np.int64], ...]]
    ids: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]

    @classmethod
    def of(cls, arrays: Optional[Sequence[npt.NDArray[np.int64]]], num_prompts: int) -> _Prompts:
        pieces = [np.zeros(0, dtype=np.int64)] * num_prompts if arrays is None else list(arrays)
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in pieces], out=offsets[1:])
        ids = np.concatenate(pieces).astype(np.int64, copy=False) if pieces else np.zeros(0, dtype=np.int64)
        return cls(None if arrays is None else tuple(arrays), np.ascontiguousarray(ids), offsets)

    def fits(self, arrays: Optional[Sequence[npt.NDArray[np.int64]]], num_prompts: int) -> bool:
        """Whether it was built from these very prompt arrays (the same objects)."""
        if arrays is None or self.arrays is None:
            return arrays is None and self.arrays is None and len(self.offsets) == num_prompts + 1
        return len(arrays) == len(self.arrays) and all(a is b for a, b in zip(arrays, self.arrays))


class OnnxRewardModel:
    """``log Vh`` from an ONNX scoring model (see the module docstring). ``kind`` defaults to ``"logit"``
    (``Vh = sigmoid(score)``: what a reward head trained with a logistic loss outputs, as the bundled
    demo's PRM). It scores the prompt ids the policy encoded (``Particles.prompt_tokens``), so both see
    the same tokens. ``memory_arena=False`` frees ONNX Runtime's buffers after each run instead of keeping
    them at their peak (a long-running service); ``session_options`` and ``provider_options`` go to ONNX
    Runtime (``tiltsmc.models._ort.make_session``). A ``verifier`` that is not callable is refused at
    construction (TypeError); the text it is given is the policy's (``Particles.text_decoder``)."""

    # Its log-values are finite or -inf (it raises on anything else itself): the samplers need not check.
    log_values_checked = True
    # Each prefix is scored on its own (rows never mix) and its cached scores are recomputed where absent.
    supports_engine = True

    def release_memory(self) -> bool:
        """Shrink ONNX Runtime's CPU arena to about its idle size (the serving engine calls it when its
        last request has left: ``shrink_memory_arena``)."""
        return shrink_memory_arena(self.session)

    _serial_numbers = itertools.count()

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        output: Optional[str] = None,
        kind: Literal["log_value", "prob", "logit"] = "logit",
        position: Literal["last", "delimiter"] = "last",
        *,
        tokenizer: Any = None,
        verifier: Optional[Callable[[Any, str], float]] = None,
        token_map: Optional[npt.ArrayLike] = None,
        providers: Optional[Sequence[Any]] = None,
        intra_op_num_threads: Optional[int] = None,
        inter_op_num_threads: Optional[int] = None,
        require_gpu: bool = False,
        pad_token_id: int = 0,
        delimiter_ids: Optional[Union[Sequence[int], npt.NDArray[np.integer[Any]]]] = None,
        label: Optional[int] = None,
        classes: Optional[Sequence[int]] = None,
        memory_arena: bool = True,
        session_options: Any = None,
        provider_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        kv_cache: Optional[bool] = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if position not in ("last", "delimiter"):
            raise ValueError(f"position: expected 'last' or 'delimiter', got {position!r}")
        unbounded = np.iinfo(np.int64).max  # checked against the vocabulary once it is known
        # one id, or any sequence or 1-D array of ints (an array has no truth value to test for emptiness);
        # anything else is given to token_ids as it is, which refuses it naming delimiter_ids
        given: Any = () if delimiter_ids is None else delimiter_ids
        if isinstance(given, Iterable) and not isinstance(given, (np.ndarray, str, bytes)):
            given = list(given)
        delimiters = token_ids(given, "delimiter_ids", unbounded)
        if position == "delimiter" and not delimiters:
            raise ValueError("delimiter_ids: position='delimiter' needs the token ids that end a step")
        check_verifier(verifier)
        self.position = position
        self.delimiter_ids = np.array(sorted(delimiters), dtype=np.int64)
        self.kind = kind
        self.model_file, model_dir = resolve_model_file(path)
        self.config = read_json(model_dir / "config.json")
        self.tokenizer: Optional[Tokenizer] = load_tokenizer(tokenizer, model_dir)
        self.verifier = verifier
        self._prompts: Optional[_Prompts] = None  # the last batch's prompts, see _prompt_layout
        # Its scores in Particles.state are its own: another reward model scoring the same particles
        # keeps its values under other names.
        serial = next(self._serial_numbers)
        self._values_key, self._scored_key = f"rm.{serial}.log_value", f"rm.{serial}.scored_length"
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
        self._one_call_at_a_time = session_call_guard(self.model_file)
        inputs = {node.name: node for node in self.session.get_inputs()}
        outputs = {node.name: node for node in self.session.get_outputs()}
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        known = ("input_ids", "attention_mask", "position_ids", "use_cache_branch")
        unsupported = [name for name in inputs if name not in known and not _PAST.match(name)]
        if missing or unsupported:
            raise ValueError(
                f"path: {self.model_file} needs inputs input_ids and attention_mask (optionally "
                "position_ids, and a decoder's past_key_values.* / use_cache_branch, fed an empty cache): "
                f"missing {missing or 'none'}, unexpected {unsupported or 'none'}; inputs found: "
                f"{', '.join(inputs)}"
            )
        check_inputs(self.model_file, list(inputs.values()))  # their types and ranks, as the policy's
        self.has_position_ids = "position_ids" in inputs
        self.has_cache_branch = "use_cache_branch" in inputs
        # (name, dtype, KV heads, head size) of each cache input (re-encoding feeds it empty)
        self._cache_inputs = [
            (name, *cache_geometry(node, self.config, self.model_file))
            for name, node in inputs.items()
            if _PAST.match(name)
        ]
        if output is None:
            output = next(iter(outputs))
        elif not isinstance(output, str):
            raise TypeError(
                f"output: expected the name of an output of {self.model_file.name} (a string), got "
                f"{output!r:.60}; its outputs: {list(outputs)}"
            )
        elif output not in outputs:
            raise ValueError(
                f"output: {output!r} is not an output of {self.model_file.name}: found {list(outputs)}"
            )
        self.output = output
        if outputs[output].type not in FLOAT_TYPES:
            subject = f"output: {output!r} of {self.model_file.name}"
            raise float_type_error(outputs[output].type, subject, "scores")
        self.label, self.classes = self._check_classes(label, classes)
        # where the label sits among the classes read, and those classes (None: the whole class axis)
        label_at = self.label or 0
        self._label_at = self.classes.index(label_at) if self.classes else label_at
        self._class_index = None if self.classes is None else np.array(self.classes, dtype=np.int64)
        vocab = self.config.get("vocab_size")
        if vocab is not None:
            vocab = positive_int(vocab, Source(model_dir / "config.json", self.config).name("vocab_size"))
        self.vocab_size = vocab or (self.tokenizer.vocab_size if self.tokenizer is not None else None)
        upper = self.vocab_size if self.vocab_size is not None else unbounded
        self.pad_token_id = token_id(pad_token_id, "pad_token_id", upper)
        token_ids(self.delimiter_ids.tolist(), "delimiter_ids", upper)
        self.token_map = None
        if token_map is not None:
            mapping = np.asarray(token_map)
            if mapping.ndim != 1 or mapping.dtype.kind not in "iu" or mapping.size == 0:
                raise ValueError(
                    f"token_map: expected a non-empty 1-D array of token ids, got shape {mapping.shape}"
                )
            upper = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int64).max
            if mapping.size and (mapping.min() < 0 or mapping.max() >= upper):
                raise ValueError(f"token_map: ids must lie in [0, {upper}) of the reward model's vocabulary")
            self.token_map = mapping.astype(np.int64)
        # delimiter_ids are the reward model's ids, as pad_token_id is (the ids a PRM was trained to score
        # at, checked against its vocabulary above); prefixes hold the policy's, so they are matched against
        # the policy's ids that token_map translates into a delimiter
        self.policy_delimiter_ids = self.delimiter_ids
        if self.token_map is not None:
            self.policy_delimiter_ids = np.flatnonzero(np.isin(self.token_map, self.delimiter_ids))
            if position == "delimiter" and not self.policy_delimiter_ids.size:
                ends = self.delimiter_ids.tolist()
                raise ValueError(
                    f"delimiter_ids: token_map translates no policy token into {ends}, so no step "
                    "would be scored at its delimiter (delimiter_ids are the reward model's ids, as "
                    "pad_token_id is)"
                )
        # whether the output holds a score (or, with label, a class vector) per position, not per row
        self.per_position = self._output_layout(outputs[output].shape, inputs["input_ids"].shape)
        if position == "delimiter" and not self.per_position:
            per_row = "one class vector a row" if self.label is not None else "one score a row"
            declared = list(outputs[output].shape)
            raise ValueError(
                f"position: 'delimiter' reads a prefix's score at its last step delimiter, but output "
                f"{output!r} of {self.model_file.name} has {per_row} (declared {declared}), a score of the "
                "whole prefix; use position='last', or an output with a score per position"
            )
        self._cached = self._cached_scorer(kv_cache, outputs, f"rm.{serial}")
        if self._cached is not None:
            difference, scale = self.cache_difference()
            if difference > BATCHING_TOLERANCE * max(1.0, scale):  # NaN scores are refused when read
                why = (
                    f"{self.model_file.name}'s scores with its KV cache (prompts left-padded, a row fed "
                    f"masked padding) differ from re-encoding the same prefixes by up to {difference:.3g} "
                    "(attention that reads each row's length from the mask, as ONNX Runtime's "
                    "GroupQueryAttention does, gives this)"
                )
                if kv_cache:
                    raise ValueError(f"kv_cache: {why}; kv_cache=None or False re-encodes them")
                logger.warning("%s: re-encoding every prefix instead", why)
                self._cached = None

    def _cached_scorer(
        self, kv_cache: Optional[bool], outputs: dict[str, Any], prefix: str
    ) -> Optional[KVCachedScorer]:
        """The KV-cached path where the graph allows it (``kv_cache`` None or True) and is asked for."""
        if kv_cache is not None and not isinstance(kv_cache, (bool, np.bool_)):
            raise TypeError(f"kv_cache: expected None, True or False, got {kv_cache!r}")
        if kv_cache is False:
            return None
        shape = outputs[self.output].shape
        absent = [
            "present" + name[len("past_key_values") :]
            for name, *_ in self._cache_inputs
            if "present" + name[len("past_key_values") :] not in outputs
        ]
        reasons = []
        if not self._cache_inputs:
            reasons.append("it has no past_key_values.* inputs")
        if absent:
            reasons.append(f"it lacks the outputs {', '.join(absent)}")
        if not self.has_position_ids:
            reasons.append("it has no position_ids input")
        if not self.per_position:
            reasons.append(f"its output {self.output!r} {list(shape)} is not one score per position")
        if reasons:
            if kv_cache:
                why = "; ".join(reasons)
                raise ValueError(f"kv_cache: {self.model_file.name} cannot keep a cache: {why}")
            return None
        return KVCachedScorer(self, list(self._cache_inputs), prefix)

    def cache_difference(self) -> tuple[float, float]:
        """How far the KV-cached scores are from re-encoding's: ``(difference, scale)``, the largest
        absolute difference of the raw score read at the last token (the ``label`` class's, or the one
        score a position), and the largest absolute score re-encoding gives.

        Two prompts (2 and 4 tokens of fixed ids) start together, the shorter left-padded; then the longer
        row is fed a token while the shorter is fed masked padding, then both a token. Their scores after
        the prompts and at the end are compared with the same prefixes re-encoded (right-padded).
        """
        if self._cached is None:
            raise ValueError("cache_difference: this reward model re-encodes its prefixes (no KV cache)")
        column = self.label or 0

        def raw_scores(raw: np.ndarray, shape: tuple[int, int], columns: npt.NDArray[np.int64]) -> FloatArray:
            rows, width = shape
            scores: FloatArray = np.asarray(raw, dtype=np.float64).reshape(rows, width, -1)
            return np.ascontiguousarray(scores[np.arange(rows), columns, column])

        size = len(self.token_map) if self.token_map is not None else (self.vocab_size or 64)
        short, long, token = probe_ids(size)
        particles = Particles.empty([None, None], 1, 2)
        particles.prompt_tokens = [short, long]
        cached = [self._cached.start(particles, raw_scores)]
        particles.tokens[1, 0, 0], particles.lengths[1, 0] = token[1], 1
        self._cached.advance(particles, raw_scores)
        particles.tokens[0, 0, 0], particles.lengths[0, 0] = token[0], 1
        particles.tokens[1, 0, 1], particles.lengths[1, 0] = token[2], 2
        self._cached.advance(particles, raw_scores)
        cached.append(particles.state[self._cached.last_key][:, 0])
        encoded = [
            self._score([short, long], raw_scores),
            self._score([np.append(short, token[0]), np.append(long, token[1:])], raw_scores),
        ]
        return largest_difference(list(zip(cached, encoded)))

    @property
    def kv_cached(self) -> bool:
        """Whether it keeps a KV cache per particle (see the module docstring)."""
        return self._cached is not None

    def _check_classes(
        self, label: Optional[int], classes: Optional[Sequence[int]]
    ) -> tuple[Optional[int], Optional[list[int]]]:
        """``label`` and ``classes`` checked against each other (against the output's class axis:
        ``_output_layout``)."""
        if label is None:
            if classes is not None:
                raise ValueError("classes: needs label= (the class whose probability is Vh)")
            return None, None
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"label: expected a class index >= 0, got {label!r}")
        largest = int(np.iinfo(np.int64).max)  # class indices are read as int64
        if label > largest:
            raise ValueError(f"label: class index {label} is too large (the largest is {largest})")
        if classes is None:
            return int(label), None
        if isinstance(classes, (str, bytes)):
            raise ValueError(f"classes: expected a sequence of class indices, got {classes!r}")
        if not isinstance(classes, Sequence) and not (isinstance(classes, np.ndarray) and classes.ndim == 1):
            raise TypeError(f"classes: expected a sequence of class indices, got {classes!r:.60}")
        for c in classes:  # each an int, as label is (not a float, a string, a bool, None)
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                raise ValueError(
                    f"classes: expected class indices >= 0 (integers), got {c!r} in {classes!r:.60}"
                )
        chosen = [int(c) for c in classes]
        if len(chosen) < 2 or len(set(chosen)) != len(chosen) or min(chosen) < 0:
            raise ValueError(f"classes: expected two or more distinct class indices >= 0, got {chosen}")
        if max(chosen) > largest:
            raise ValueError(f"classes: class index {max(chosen)} is too large (the largest is {largest})")
        if int(label) not in chosen:
            raise ValueError(f"classes: {chosen} must include label {int(label)}")
        return int(label), chosen

    def _output_layout(self, declared: Sequence[Any], ids_shape: Sequence[Any]) -> bool:
        """Whether the output holds one score (with ``label``, one class vector) per position rather than
        per row, from its declared shape where that settles it, else from the shapes it gives for 2 rows of
        3 and of 5 tokens (``_probe_output``); ValueError naming the output where it fits neither, or fits
        ``label`` / ``classes`` badly. The declared shape settles it where its axes bear the names of
        ``input_ids``' (batch, sequence) axes, its last a fixed size unless it is the sequence: ``(batch,)``,
        ``(batch, k)``, ``(batch, sequence)``, ``(batch, sequence, k)``. Else an axis after the rows' is the
        sequence where it follows the width of the rows fed, and a class axis where its size is fixed."""
        shape = list(declared)
        rank = len(shape)
        if rank >= 4:
            self._refuse_layout(shape)
        batch, sequence = [*ids_shape, None, None][:2]
        if (
            isinstance(batch, str)
            and isinstance(sequence, str)
            and batch != sequence
            and rank
            and shape[0] == batch
        ):
            last = shape[-1]
            if rank == 1:
                return self._layout(shape, 1, False, None)
            if rank == 2 and isinstance(last, int):
                return self._layout(shape, 2, False, last)
            if rank == 2 and last == sequence:
                return self._layout(shape, 2, True, None)
            if rank == 3 and shape[1] == sequence and isinstance(last, int):
                return self._layout(shape, 3, True, last)
        # an unknown rank ([]), axes named otherwise than input_ids', or one that may be the sequence or
        # classes: run it
        shapes = self._probe_output(shape)
        ranks = {len(s) for s in shapes}
        first, second = shapes
        rank = len(first)
        if len(ranks) == 1 and rank in (1, 2, 3) and first[0] == second[0] == 2:
            follows = first[1:2] == (3,) and second[1:2] == (5,)  # its second axis is the sequence
            if rank == 1:
                return self._layout(first, 1, False, None)
            if rank == 2 and (follows or first[1] == second[1]):
                return self._layout(first, 2, follows, None if follows else first[1])
            if rank == 3 and follows and first[2] == second[2]:
                return self._layout(first, 3, True, first[2])
        raise ValueError(
            f"output: {self.output!r} of {self.model_file.name} (declared {shape}) gave shapes "
            f"{list(first)} and {list(second)} for 2 rows of 3 and of 5 tokens; "
            + (_LAYOUTS if self.label is None else f"with label= expected {_CLASS_LAYOUTS}")
        )

    def _layout(self, shape: Sequence[Any], rank: int, per_position: bool, count: Optional[int]) -> bool:
        """``per_position`` checked against ``label`` / ``classes``: ``count`` is the size of the last axis
        after the batch's (and the sequence's, where ``per_position``), None where there is none or it is
        unknown."""
        label = self.label
        has_class_axis = rank == 3 or (rank == 2 and not per_position)
        if label is None:
            if has_class_axis and count is not None and count != 1:
                per = " per position" if per_position else ""
                raise ValueError(
                    f"output: {self.output!r} has {count} classes{per} (shape {list(shape)} in "
                    f"{self.model_file.name}); pass label= (and classes=) to read one class's probability "
                    "as Vh"
                )
            return per_position
        if not has_class_axis:
            per = "a position" if per_position else "a row"
            raise ValueError(
                f"label: output {self.output!r} has one score {per} (shape {list(shape)} in "
                f"{self.model_file.name}), no class axis; leave label= (and classes=) out"
            )
        if count is not None:
            highest = max(self.classes or [label])
            if highest >= count:
                what = "classes" if self.classes and highest != label else "label"
                raise ValueError(f"{what}: {highest} is not a class of {self.output!r} ({count} classes)")
        return per_position

    def _refuse_layout(self, shape: Sequence[Any]) -> None:
        expected = _LAYOUTS if self.label is None else f"with label= expected {_CLASS_LAYOUTS}"
        raise ValueError(
            f"output: {self.output!r} has shape {list(shape)}; {expected} ({self.model_file.name})"
        )

    def _probe_output(self, declared: Sequence[Any]) -> list[tuple[int, ...]]:
        """The output's shapes for 2 rows of 3 and of 5 tokens, one session call each (a ValueError naming
        the file where the graph fails on them)."""
        size = len(self.token_map) if self.token_map is not None else (self.vocab_size or 64)
        short, long, token = probe_ids(size)
        sequence = np.concatenate([long, token, short])
        shapes: list[tuple[int, ...]] = []

        def shape_of(raw: np.ndarray, shape: tuple[int, int], columns: npt.NDArray[np.int64]) -> FloatArray:
            shapes.append(tuple(raw.shape))
            return np.zeros(shape[0])

        for width in (3, 5):
            try:
                self._score([sequence[:width], sequence[1 : width + 1]], shape_of)
            except Exception as error:  # ONNX Runtime's own error types: said of the file
                raise ValueError(
                    f"path: {self.model_file.name} failed on 2 rows of {width} tokens, run at load because "
                    f"the declared shape {list(declared)} of its output {self.output!r} leaves its layout "
                    f"open: {error}"
                ) from error
        return shapes

    def check_policy(self, policy: Any) -> None:
        """Refuse a policy whose vocabulary differs from this model's, unless a ``token_map`` is given."""
        if self.token_map is not None:
            if self.token_map.ndim != 1 or self.token_map.size < int(getattr(policy, "vocab_size", 0)):
                raise ValueError("token_map: expected one reward-model id per policy token id")
            return
        theirs = getattr(policy, "tokenizer", None)
        if self.tokenizer is not None and theirs is not None:
            if self.tokenizer.vocabulary() != theirs.vocabulary():
                raise ValueError(
                    "reward: the reward model's tokenizer differs from the policy's (vocabulary sizes "
                    f"{self.tokenizer.vocab_size} and {theirs.vocab_size}); pass token_map= to translate ids"
                )
        elif self.vocab_size is not None and getattr(policy, "vocab_size", None) not in (
            None,
            self.vocab_size,
        ):
            raise ValueError(
                f"reward: vocabulary size {self.vocab_size} differs from the policy's {policy.vocab_size}; "
                "pass token_map= to translate ids"
            )

    # -- scoring --------------------------------------------------------------------------------------------

    def _score(self, sequences: list[npt.NDArray[np.int64]], read: Optional[Reader] = None) -> FloatArray:
        """``log Vh`` of each token sequence, in one session call (right padding, read at the last token;
        ``read`` in place of ``_read``)."""
        prompts = _Prompts.of([np.asarray(s, dtype=np.int64) for s in sequences], len(sequences))
        empty = np.zeros((len(sequences), 1, 0), dtype=np.int64)
        batch = core.right_padded_prefixes(
            prompts.ids, prompts.offsets, empty, np.zeros((len(sequences), 1), dtype=np.int64), None,
            self.pad_token_id, self.has_position_ids,
        )  # fmt: skip
        return self._score_batch(*batch, read=read)

    def _score_batch(
        self,
        ids: npt.NDArray[np.int64],
        mask: npt.NDArray[np.int64],
        last: npt.NDArray[np.int64],
        positions: Optional[npt.NDArray[np.int64]],
        read_at: Optional[npt.NDArray[np.int64]] = None,
        read: Optional[Reader] = None,
    ) -> FloatArray:
        """``log Vh`` of right-padded rows (as
        [`tiltsmc.core.right_padded_prefixes`][tiltsmc.core.right_padded_prefixes] gives them), read at
        ``read_at[r]`` (default: the row's last token) where the model scores every position."""
        (raw,) = self.run_session([self.output], self.session_feeds(ids, mask, positions))
        return (read or self._read)(np.asarray(raw), ids.shape, last if read_at is None else read_at)

    def run_session(self, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        """``session.run(outputs, feeds)``, one call at a time where the runtime needs it
        (``session_call_guard``). Shared by re-encoding and the KV-cached path."""
        with self._one_call_at_a_time:
            return list(self.session.run(outputs, feeds))

    def session_feeds(
        self,
        ids: npt.NDArray[np.int64],
        mask: npt.NDArray[np.int64],
        positions: Optional[npt.NDArray[np.int64]],
        past: Optional[list[np.ndarray]] = None,
    ) -> dict[str, Any]:
        """The graph's inputs for ``ids`` ``(rows, width)`` fed after ``past`` (the cache tensors in the
        order of its ``past_key_values.*`` inputs; None: an empty cache, where the graph has one): ``mask``
        covers past and new columns, ``positions`` go where the graph takes them, and the new tokens are
        translated by ``token_map`` (padding is ``pad_token_id``). Shared by re-encoding and the KV-cached
        path."""
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.token_map is not None:  # padding (pad_token_id, the reward model's) is not looked up
            real = mask[:, mask.shape[1] - ids.shape[1] :] == 1
            feeds["input_ids"] = np.where(real, self.token_map[np.where(real, ids, 0)], self.pad_token_id)
        if positions is not None:
            feeds["position_ids"] = positions
        if self.has_cache_branch:
            feeds["use_cache_branch"] = np.array([past is not None])
        for k, (name, dtype, heads, head_size) in enumerate(self._cache_inputs):
            if past is None:
                feeds[name] = np.zeros((ids.shape[0], heads, 0, head_size), dtype=dtype)
            else:
                feeds[name] = past[k]
        return feeds

    def _read(self, raw: np.ndarray, shape: tuple[int, ...], columns: npt.NDArray[np.int64]) -> FloatArray:
        """The model's output ``(rows,)`` / ``(rows, 1)`` (one score a row) or ``(rows, width)`` / ``(rows,
        width, 1)`` (one a position, read at ``columns``) as ``log Vh`` by ``kind``, in one core call; with
        ``label``, ``(rows, C)`` or ``(rows, width, C)`` read by ``_class_log_values``."""
        rows, width = shape
        per_position = self.per_position
        if self.label is not None:
            if not per_position and raw.ndim == 2 and raw.shape[0] == rows:
                vectors = raw
            elif per_position and raw.ndim == 3 and raw.shape[:2] == (rows, width):
                vectors = raw[np.arange(rows), columns]
            else:
                raise self._unexpected(raw.shape, rows, width)
            return self._class_log_values(vectors)
        read: Optional[npt.NDArray[np.int64]] = None  # one score a row
        if per_position and raw.shape in ((rows, width), (rows, width, 1)):
            read = columns
        elif per_position or raw.shape not in ((rows,), (rows, 1)):
            raise self._unexpected(raw.shape, rows, width)
        if raw.dtype.char not in "fd" or not raw.flags.c_contiguous:
            raw = np.ascontiguousarray(raw, dtype=np.float64)
        try:
            return core.read_log_values(raw, rows, read, self.kind)
        except ValueError as error:  # say it of the model: which scores, how many
            scores = raw.reshape(rows, -1)[np.arange(rows), -1 if read is None else read]
            checks = [("NaN", np.isnan(scores))]
            if self.kind == "log_value":
                checks.append(("+inf as a log-value", scores == np.inf))
            for what, bad in checks:
                if bad.any():
                    raise ValueError(
                        f"reward: {self.model_file.name} returned {what} for {int(bad.sum())} prefix(es)"
                    ) from error
            if self.kind == "prob":
                raise ValueError(
                    f"reward: kind='prob' but {self.model_file.name} returned values outside [0, 1] ({error})"
                ) from error
            raise ValueError(f"reward: {self.model_file.name}: {error}") from error

    def _unexpected(self, got: tuple[int, ...], rows: int, width: int) -> ValueError:
        """The error for an output of another shape than the layout found at load (``_output_layout``)."""
        what = "a class vector" if self.label is not None else "one score"
        per = "a position" if self.per_position else "a row"
        return ValueError(
            f"output: {self.output!r} of {self.model_file.name} has shape {got} for {rows} rows of {width} "
            f"tokens; its layout at load was {what} {per}"
        )

    def _class_log_values(self, vectors: np.ndarray) -> FloatArray:
        """``log Vh`` of each row's class scores ``(rows, C)`` by ``kind`` (see the module docstring)."""
        assert self.label is not None
        highest = max(self.classes or [self.label])
        if highest >= vectors.shape[1]:
            raise ValueError(
                f"{'classes' if self.classes else 'label'}: {highest} is not a class of {self.output!r} "
                f"({vectors.shape[1]} classes)"
            )
        chosen_classes = vectors if self._class_index is None else vectors[:, self._class_index]
        scores = np.asarray(chosen_classes, dtype=np.float64)
        at = self._label_at

        def refuse(bad: npt.NDArray[np.bool_], what: str) -> None:
            rows = np.count_nonzero(bad.any(axis=1))
            if rows:
                raise ValueError(f"reward: {self.model_file.name} returned {what} for {rows} prefix(es)")

        refuse(np.isnan(scores), "NaN")
        if self.kind == "prob":
            refuse((scores < 0) | (scores > 1), "class probabilities outside [0, 1] (kind='prob')")
            chosen = scores[:, at]
            if self.classes is not None:
                total = scores.sum(axis=1)
                refuse((total == 0)[:, None], "probability 0 for every class in classes=")
                chosen = chosen / total
            with np.errstate(divide="ignore"):
                return np.log(chosen)
        if self.kind == "log_value" and self.classes is None:
            refuse(scores[:, at : at + 1] == np.inf, "+inf as a log-value")
            return scores[:, at].copy()
        refuse(scores == np.inf, f"+inf as a class {'logit' if self.kind == 'logit' else 'log-value'}")
        refuse((scores.max(axis=1) == -np.inf)[:, None], "-inf for every class")
        return log_softmax(scores)[:, at]

    @staticmethod
    def _prompt(particles: Particles, b: int) -> npt.NDArray[np.int64]:
        if particles.prompt_tokens is None:
            return np.zeros(0, dtype=np.int64)
        return particles.prompt_tokens[b]

    def initial_log_value(self, particles: Particles) -> FloatArray:
        """``log Vh_0``: the model's value of each prompt (0 for an empty prompt, the others' unchanged)."""
        sequences = [self._prompt(particles, b) for b in range(particles.num_prompts)]
        empty = np.array([len(s) == 0 for s in sequences], dtype=bool)
        if empty.any():  # an empty prompt's log Vh_0 is 0 (no token to read it at); the others' as alone
            values = np.zeros(particles.num_prompts)
            if not empty.all():
                values[~empty] = self._score([s for s in sequences if len(s)])
            return values
        if self._cached is not None and not particles.lengths.any():
            # the prompts' cache, ready for the first step (and for joining a serving batch)
            values = self._cached.start(particles, self._read)
            particles.state[self._values_key] = np.repeat(values[:, None], particles.num_particles, axis=1)
            particles.state[self._scored_key] = particles.lengths.copy()
            return values
        return self._score(sequences)

    def log_value(self, particles: Particles) -> FloatArray:
        values: Optional[FloatArray] = particles.state.get(self._values_key)
        scored: Optional[npt.NDArray[np.int64]] = particles.state.get(self._scored_key)
        cached = self._cached
        if cached is not None and cached.usable(particles) and not cached.has_state(particles):
            values = scored = None  # values without the cache they came with: start again
        stale: Optional[npt.NDArray[np.bool_]] = None  # None: every prefix
        if values is not None and scored is not None:
            stale = scored != particles.lengths
            moved = np.count_nonzero(stale)
            if moved == 0:
                return values.copy()
            if moved == stale.size:  # the usual step: every particle has moved
                stale = None
        values, scored = self._rescore(particles, values, scored, stale)
        particles.state[self._values_key] = values
        particles.state[self._scored_key] = scored
        return values.copy()  # the stored array follows resampling in place

    def _rescore(
        self,
        particles: Particles,
        values: Optional[FloatArray],
        scored: Optional[npt.NDArray[np.int64]],
        stale: Optional[npt.NDArray[np.bool_]],
    ) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """``log Vh`` of the ``stale`` prefixes (None: all) scored in one session call, merged into
        ``values``; and the lengths the values were scored at."""
        batch, count = particles.lengths.shape
        selected = None if stale is None else np.flatnonzero(stale)
        if self._cached is not None and self._cached.usable(particles):
            fresh = _select(self._cached.advance(particles, self._read), selected)
        else:
            fresh = self._encoded(particles, selected)
        if self.verifier is not None:
            for k in np.flatnonzero(_select(particles.finished, selected)):
                b, i = divmod(int(k if selected is None else selected[k]), count)
                fresh[k] = self._verify(particles, b, i)
        if stale is None or values is None or scored is None:
            return fresh.reshape(batch, count), particles.lengths.copy()
        merged = values.copy()
        merged[stale] = fresh
        return merged, np.where(stale, particles.lengths, scored)

    def _encoded(self, particles: Particles, selected: Optional[npt.NDArray[np.int64]]) -> FloatArray:
        """``log Vh`` of the prefixes ``selected`` (flat indices; None: all) re-encoded, in buckets of
        similar lengths (``_length_buckets``); an empty prefix (an empty prompt, nothing generated) is 0,
        as ``initial_log_value`` gives it, and not run."""
        rows = np.arange(particles.lengths.size) if selected is None else selected
        prompt_lengths = np.diff(self._prompt_layout(particles).offsets)
        if prompt_lengths.size and prompt_lengths.min() == 0:
            lengths = (
                np.repeat(prompt_lengths, particles.num_particles)[rows] + particles.lengths.reshape(-1)[rows]
            )
            if not lengths.all():
                fresh = np.zeros(rows.size)
                if lengths.any():
                    fresh[lengths > 0] = self._encoded(particles, rows[lengths > 0])
                return fresh
        buckets = self._length_buckets(particles, selected)
        if buckets is None:
            return self._score_rows(particles, selected)
        fresh = np.empty(rows.size)
        for bucket in buckets:
            fresh[bucket] = self._score_rows(particles, rows[bucket])
        return fresh

    # A call re-encodes whole prefixes: ONNX Runtime's attention holds several ``rows x heads x L x L`` float
    # tensors at once (``L``: the padded length), so memory grows with ``rows x L^2`` (about 150 bytes per
    # unit on the demo's 4-head PRM: 256 prefixes of 227 tokens took 2 GB for 1.9 MB of weights). Calls are
    # split into chunks of at most ``max_rows_tokens2`` units (at least one row each): about 0.3 GB there,
    # at no measurable cost in speed (a chunk of 40 such rows is still tens of thousands of tokens).
    max_rows_tokens2 = 2**21

    def _score_rows(self, particles: Particles, selected: Optional[npt.NDArray[np.int64]]) -> FloatArray:
        """``log Vh`` of the prefixes ``selected`` (flat indices; None: all), in as few session calls as
        ``max_rows_tokens2`` allows."""
        rows = particles.lengths.size if selected is None else selected.size
        if rows > 1:
            prompt_lengths = np.diff(self._prompt_layout(particles).offsets)
            lengths = np.repeat(prompt_lengths, particles.num_particles) + particles.lengths.reshape(-1)
            longest = int((lengths if selected is None else lengths[selected]).max())
            per_call = max(int(self.max_rows_tokens2) // max(longest * longest, 1), 1)
            if per_call < rows:
                per_call = -(-rows // -(-rows // per_call))  # as many calls, of equal sizes
                flat = np.arange(rows) if selected is None else selected
                out = np.empty(rows)
                for start in range(0, rows, per_call):
                    chunk = flat[start : start + per_call]
                    out[start : start + per_call] = self._score_call(particles, chunk)
                return out
        return self._score_call(particles, selected)

    def _score_call(self, particles: Particles, selected: Optional[npt.NDArray[np.int64]]) -> FloatArray:
        """``log Vh`` of the prefixes ``selected`` (flat indices; None: all) in one session call."""
        ids, mask, last, positions = self._prefixes(particles, selected)
        read_at = None
        if self.position == "delimiter":
            read_at = self._last_delimiter(particles, selected, ids, last)
        return self._score_batch(ids, mask, last, positions, read_at)

    # A batch's prefixes are right-padded to the longest, so rows of very different lengths (requests of a
    # serving batch at different depths) pay for the longest: sorted by length, they are scored in buckets
    # whose longest prefix is at most ``bucket_ratio`` times their shortest, of ``bucket_rows`` rows at least
    # (fewer, larger session calls where the lengths are close).
    bucket_ratio = 1.5
    bucket_rows = 32

    def _length_buckets(
        self, particles: Particles, selected: Optional[npt.NDArray[np.int64]]
    ) -> Optional[list[npt.NDArray[np.int64]]]:
        """Positions in ``selected`` (or in all rows) of each bucket, or None for one call."""
        rows = particles.lengths.size if selected is None else selected.size
        if rows < 2 * self.bucket_rows:
            return None
        prompts = self._prompt_layout(particles)
        count = particles.num_particles
        prompt_lengths = np.repeat(np.diff(prompts.offsets), count)
        lengths = prompt_lengths + particles.lengths.reshape(-1)
        if selected is not None:
            lengths = lengths[selected]
        if lengths.max() <= self.bucket_ratio * max(int(lengths.min()), 1):
            return None
        order = np.argsort(lengths, kind="stable")
        buckets: list[npt.NDArray[np.int64]] = []
        start = 0
        for end in range(1, rows + 1):
            closes = end == rows or (
                end - start >= self.bucket_rows
                and lengths[order[end]] > self.bucket_ratio * max(int(lengths[order[start]]), 1)
                and rows - end >= self.bucket_rows
            )
            if closes:
                buckets.append(order[start:end])
                start = end
        return buckets if len(buckets) > 1 else None

    def _prefixes(
        self, particles: Particles, selected: Optional[npt.NDArray[np.int64]] = None
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], Optional[npt.NDArray[np.int64]]
    ]:
        """Prompt + generated tokens of the particles ``selected`` (flat indices ``b * N + i``; None: all, in
        order), right-padded: ``(ids, attention_mask, last, position_ids or None)`` in one core call."""
        prompts = self._prompt_layout(particles)
        return core.right_padded_prefixes(
            prompts.ids, prompts.offsets, particles.tokens, particles.lengths, selected, self.pad_token_id,
            self.has_position_ids,
        )  # fmt: skip

    def _prompt_layout(self, particles: Particles) -> _Prompts:
        """The batch's ``_Prompts``, built again only when its prompts change (a new run)."""
        prompts = self._prompts
        if prompts is None or not prompts.fits(particles.prompt_tokens, particles.num_prompts):
            prompts = self._prompts = _Prompts.of(particles.prompt_tokens, particles.num_prompts)
        return prompts

    def _last_delimiter(
        self,
        particles: Particles,
        selected: Optional[npt.NDArray[np.int64]],
        ids: npt.NDArray[np.int64],
        last: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.int64]:
        """Per row (``selected`` as in ``_prefixes``): the last delimiter among the generated tokens
        (else the last prompt token); the last token for finished trajectories."""
        lengths = last + 1
        prompt_lengths = lengths - _select(particles.lengths, selected)
        columns = np.arange(ids.shape[1])
        generated = (columns >= prompt_lengths[:, None]) & (columns < lengths[:, None])
        is_delimiter = generated & np.isin(ids, self.policy_delimiter_ids)
        found = np.where(is_delimiter, columns, -1).max(axis=1)
        read_at = np.where(found >= 0, found, np.maximum(prompt_lengths - 1, 0))
        return np.where(_select(particles.finished, selected), last, read_at)

    def _verify(self, particles: Particles, b: int, i: int) -> float:
        assert self.verifier is not None
        return verified_log_reward(self.verifier, self._verifier_decoder(particles), particles, b, i)

    def _verifier_decoder(self, particles: Particles) -> Optional[TextDecoder]:
        """What decodes ``particles``' finished trajectories for the verifier: the policy that started them
        (``Particles.text_decoder``: its ``decode`` gives the results' texts, which end before its stop
        strings), carried by the particles, not this model, which several policies may share; else this
        model's tokenizer where it reads the policy's ids (no ``token_map``); else None (the verifier is
        given the policy's token ids)."""
        decoder: Optional[TextDecoder] = particles.text_decoder
        if decoder is not None:
            return decoder
        return self.tokenizer if self.token_map is None else None


def verified_log_reward(
    verifier: Callable[[Any, Any], float],
    decoder: Optional[TextDecoder],
    particles: Particles,
    b: int,
    i: int,
) -> float:
    """``log r`` of particle ``(b, i)``'s finished trajectory by ``verifier(prompt, text) -> r >= 0`` (the
    generated tokens decoded by ``decoder``: the policy's ``decode`` gives the text the results report; the
    token ids where ``decoder`` is None); ValueError for a reward that is negative, NaN or infinite."""
    generated = particles.tokens[b, i, : particles.lengths[b, i]]
    text: Any = decoder.decode(generated) if decoder is not None else generated
    reward = checked_reward(verifier(particles.prompts[b], text))
    if not (reward >= 0.0) or reward == np.inf:
        raise ValueError(f"verifier: returned {reward!r} for prompt {b}; rewards must be finite and >= 0")
    return float(np.log(reward)) if reward > 0 else -np.inf


def check_verifier(verifier: Any) -> None:
    """Refuse a ``verifier`` that is neither None nor callable (TypeError naming ``verifier``)."""
    if verifier is not None and not callable(verifier):
        raise TypeError(
            f"verifier: expected a function verifier(prompt, text) -> r >= 0, got {type(verifier).__name__}"
        )


def checked_reward(reward: Any) -> float:
    """A verifier's return as a float, where it is a real number: an int or a float of Python or numpy (a
    0-d array of one too), a bool read as 1 / 0; TypeError naming ``verifier`` otherwise (a string such as
    ``"1"``, None, ...), which ``float()`` would have converted or refused without a name. Its range
    (finite, ``>= 0``) is ``verified_log_reward``'s to check."""
    value = reward
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf":
        value = value[()]
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"verifier: returned {reward!r:.60} (a {type(reward).__name__}); expected a real number r >= 0"
        )
    return float(value)
