"""Shared machinery of the samplers: timed model calls, argument checks, log-sum-exp helpers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from .. import _memory
from ..models.particles import Particles
from ..models.prompts import check_prompts
from ..models.protocols import (
    Policy,
    RewardModel,
    is_policy,
    is_reward_model,
    is_token_policy,
    is_twist_model,
)
from ..models.sampling import fail_prompts_without_a_law
from .result import Compute

FloatArray = npt.NDArray[np.float64]


class _HasTokenLimit(Protocol):
    max_new_tokens: Optional[int]


RunT = TypeVar("RunT", bound=_HasTokenLimit)


def check_count(value: Any, name: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be <= {maximum}, got {value}")
    return int(value)


# Bytes a row of a run (a particle, a candidate, a draw, a returned sample) takes at the least: its length in
# Particles.lengths (int64) and its log-weight or log-value (float64); its tokens, state and KV caches come on
# top. A count whose rows cannot have even this much is refused before the run starts (check_rows).
ROW_BYTES = 16


def check_rows(name: str, rows: int, prompts: Optional[Sequence[Any]], what: str) -> None:
    """Refuse ``rows`` rows per prompt (``what``: ``"1024 particles"``) for ``prompts`` (as ``prompts_list``
    returns them: None is one prompt) where their ``ROW_BYTES`` each cannot possibly be allocated
    (``tiltsmc._memory.check_fits``: more than the memory available, or than numpy's largest array):
    ValueError naming the argument ``name``, before the policy's ``start`` allocates them (numpy's
    MemoryError, or "array is too big", named nothing) and before any draw."""
    batch = 1 if prompts is None else len(prompts)
    _memory.check_fits(name, batch * rows * ROW_BYTES, f"{batch} prompt(s) x {what} ({ROW_BYTES} bytes each)")


def limited(run: RunT, max_new_tokens: Optional[int], models: Models) -> RunT:
    """``run`` with its per-trajectory token limit set (None: the policy's own), checked: an int >= 1, and
    at most the policy's own ``max_new_tokens`` where it has one, so that the engine's ``submit`` refuses it
    as the offline call does (a policy without one is checked against its buffer when the run starts)."""
    if max_new_tokens is not None:
        run.max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        capacity = getattr(models.policy, "max_new_tokens", None)
        if isinstance(capacity, int) and run.max_new_tokens > capacity:
            raise ValueError(
                f"max_new_tokens: {run.max_new_tokens} is more than the policy's limit of {capacity}"
            )
    return run


def check_models(policy: Any, reward: Any) -> None:
    """Refuse (TypeError) a ``policy`` that is not a [`Policy`][tiltsmc.models.protocols.Policy] or a
    ``reward`` that is not a [`RewardModel`][tiltsmc.models.protocols.RewardModel]; a reward model with a
    ``check_policy`` method checks the policy too (e.g. refuses one with another vocabulary)."""
    if not is_policy(policy):
        raise TypeError(f"policy: {type(policy).__name__} does not implement start() and propose()")
    if not is_reward_model(reward):
        raise TypeError(
            f"reward: {type(reward).__name__} does not implement initial_log_value() and log_value()"
        )
    check_policy = getattr(reward, "check_policy", None)
    if callable(check_policy):
        check_policy(policy)  # e.g. refuses a reward model with another vocabulary


class Models:
    """The policy and reward model of one run, with every call counted and timed into ``compute``."""

    def __init__(self, policy: Policy, reward: RewardModel, compute: Compute) -> None:
        check_models(policy, reward)
        self.policy = policy
        self.reward = reward
        self.compute = compute
        # A reward model that guarantees finite or -inf log-values (raising itself otherwise) is not checked
        # again at every step.
        self._check_log_values = getattr(reward, "log_values_checked", False) is not True

    def supports_optimal_proposal(self) -> bool:
        token_level = bool(getattr(self.policy, "token_level", True))
        return token_level and is_token_policy(self.policy) and is_twist_model(self.reward)

    def start(
        self,
        prompts: Optional[Sequence[Any]],
        num_particles: int,
        max_new_tokens: Optional[Sequence[Optional[int]]] = None,
    ) -> Particles:
        """The policy's ``start``; each prompt's token limit (``max_new_tokens``, None: the policy's own) is
        handed to a policy that takes it (``start_takes_token_limits``: its context check counts it)."""
        began = time.perf_counter()
        if max_new_tokens is not None and getattr(self.policy, "start_takes_token_limits", False) is True:
            particles = self.policy.start(prompts, num_particles, max_new_tokens=max_new_tokens)  # type: ignore[call-arg]
        else:
            particles = self.policy.start(prompts, num_particles)
        self.compute.policy_seconds += time.perf_counter() - began
        check_started(particles, 1 if prompts is None else len(prompts), num_particles)
        return particles

    def propose(self, particles: Particles, rng: np.random.Generator) -> FloatArray:
        live = particles.finished.size - int(np.count_nonzero(particles.finished))
        one_token = getattr(self.policy, "token_level", False) is True  # then a step is one token
        tokens_before = 0 if one_token else int(particles.lengths.sum())
        shape = particles.lengths.shape
        began = time.perf_counter()
        proposed = self.policy.propose(particles, rng)
        self.compute.policy_seconds += time.perf_counter() - began
        check_layout(particles, shape, "policy: propose left")
        try:
            log_p = np.asarray(proposed, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"policy: propose returned {type(proposed).__name__} {proposed!r:.60}, expected the "
                "log-probabilities of the steps drawn, shape (B, N)"
            ) from None
        self.compute.policy_calls += 1
        self.compute.policy_steps += live
        self.compute.policy_tokens += live if one_token else int(particles.lengths.sum()) - tokens_before
        return log_p

    def reorder(
        self, particles: Particles, ancestors: npt.NDArray[np.int64], *, across_prompts: bool = False
    ) -> None:
        """Resample the particles ([`Particles.reorder`][tiltsmc.models.particles.Particles.reorder]); the
        policy's deferred work
        ([`Particles.defer`][tiltsmc.models.particles.Particles.defer]) runs first and is timed as the
        policy's."""
        self.flush(particles)
        particles.reorder(ancestors, across_prompts=across_prompts)

    def flush(self, particles: Particles) -> None:
        """Run the policy's deferred work on ``particles`` now
        ([`Particles.flush`][tiltsmc.models.particles.Particles.flush]: a decoder's session run on the tokens
        it appended last), timed as the policy's."""
        began = time.perf_counter()
        particles.flush()
        self.compute.policy_seconds += time.perf_counter() - began

    def next_log_probs(self, particles: Particles) -> FloatArray:
        assert is_token_policy(self.policy)
        began = time.perf_counter()
        log_p = model_output(self.policy.next_log_probs(particles), "policy: next_log_probs")
        self.compute.policy_seconds += time.perf_counter() - began
        self.compute.policy_calls += 1
        self.compute.policy_steps += int(np.count_nonzero(~particles.finished))
        return checked_log_probs(log_p, particles, self.policy)

    def append(self, particles: Particles, tokens: npt.NDArray[np.int64]) -> None:
        assert is_token_policy(self.policy)
        tokens_before = int(particles.lengths.sum())
        shape = particles.lengths.shape
        began = time.perf_counter()
        self.policy.append(particles, tokens)
        self.compute.policy_seconds += time.perf_counter() - began
        check_layout(particles, shape, "policy: append left")
        self.compute.policy_tokens += int(particles.lengths.sum()) - tokens_before

    def initial_log_value(self, particles: Particles) -> FloatArray:
        began = time.perf_counter()
        value = model_output(self.reward.initial_log_value(particles), "reward: initial_log_value")
        self.compute.reward_seconds += time.perf_counter() - began
        if value.shape != (particles.num_prompts,):
            raise ValueError(
                f"reward: initial_log_value returned shape {value.shape}, expected ({particles.num_prompts},)"
            )
        return check_log_values(value, "initial_log_value")

    def log_value(self, particles: Particles) -> FloatArray:
        began = time.perf_counter()
        value = np.ascontiguousarray(model_output(self.reward.log_value(particles), "reward: log_value"))
        self.compute.reward_seconds += time.perf_counter() - began
        self.compute.reward_calls += 1
        self.compute.reward_evaluations += value.size
        if value.shape != particles.lengths.shape:
            raise ValueError(
                f"reward: log_value returned shape {value.shape}, expected (B, N) = {particles.lengths.shape}"
                " (do the policy and the reward model agree on the batch?)"
            )
        return check_log_values(value, "log_value") if self._check_log_values else value

    def next_log_values(self, particles: Particles) -> FloatArray:
        assert is_twist_model(self.reward)
        began = time.perf_counter()
        value = model_output(self.reward.next_log_values(particles), "reward: next_log_values")
        self.compute.reward_seconds += time.perf_counter() - began
        self.compute.reward_calls += 1
        self.compute.reward_evaluations += value.size
        check_vocabulary_axis(value, particles, self.policy, "reward: next_log_values")
        return check_log_values(value, "next_log_values")


def _describe(array: Any) -> str:
    """An array's dtype and shape (or the type of what is not an array), for the messages below."""
    if isinstance(array, np.ndarray):
        return f"{array.dtype} of shape {array.shape}"
    return type(array).__name__


def check_layout(particles: Particles, shape: tuple[int, ...], what: str) -> None:
    """After a policy call (``what``: ``"policy: propose left"``), ``particles.tokens``, ``lengths`` and
    ``finished`` are still arrays of the batch's ``(B, N)`` = ``shape``: integer ``(B, N, capacity)``, integer
    and bool ``(B, N)`` (a policy that replaced one by another kind of array is named, instead of the kernel
    that would read it). A few attribute reads: every step calls it."""
    for name, array, kinds, ndim in (
        ("tokens", particles.tokens, "iu", 3),
        ("lengths", particles.lengths, "iu", 2),
        ("finished", particles.finished, "b", 2),
    ):
        if not (
            isinstance(array, np.ndarray)
            and array.dtype.kind in kinds
            and array.ndim == ndim
            and array.shape[:2] == shape
        ):
            kind = "bools" if kinds == "b" else "integers"
            axes = "(B, N, capacity) with (B, N)" if ndim == 3 else "(B, N)"
            raise ValueError(
                f"{what} Particles.{name} {_describe(array)}, expected {kind} of shape {axes} = {shape}"
            )


def check_started(particles: Any, num_prompts: int, num_particles: int) -> None:
    """What a policy's ``start`` returned, checked before any run reads it (TypeError / ValueError naming
    ``policy: start``): a ``Particles`` of ``num_prompts`` x ``num_particles`` (``check_layout``), one entry
    of ``prompts`` (and of ``prompt_tokens``, where set) a prompt, every length in ``[0, capacity]`` and
    below it where the particle is unfinished (room for its next step), ``errors`` keyed by prompt index.
    Once per batch started, not per step."""
    what = "policy: start"
    if not isinstance(particles, Particles):
        raise TypeError(f"{what} returned {type(particles).__name__}, expected Particles")
    check_layout(particles, (num_prompts, num_particles), f"{what} returned")
    for name, listed in (("prompts", particles.prompts), ("prompt_tokens", particles.prompt_tokens)):
        if listed is not None and (not isinstance(listed, list) or len(listed) != num_prompts):
            got = f"{len(listed)} entries" if isinstance(listed, list) else type(listed).__name__
            raise ValueError(f"{what} returned Particles.{name} of {got}, expected a list of {num_prompts}")
    capacity = particles.tokens.shape[2]
    lengths, finished = particles.lengths, particles.finished
    if lengths.size and (int(lengths.min()) < 0 or int(lengths.max()) > capacity):
        raise ValueError(
            f"{what} returned Particles.lengths from {int(lengths.min())} to {int(lengths.max())}, expected "
            f"each in [0, {capacity}] (the token buffer's capacity)"
        )
    if bool((lengths[~finished] >= capacity).any()):
        raise ValueError(
            f"{what} returned unfinished particles whose token buffer (capacity {capacity}) is full: no room "
            "for their next step"
        )
    for prompt in particles.errors:
        if isinstance(prompt, (bool, np.bool_)) or not isinstance(prompt, (int, np.integer)):
            raise ValueError(f"{what} returned Particles.errors keyed by {prompt!r}, expected prompt indices")
        if not 0 <= prompt < num_prompts:
            raise ValueError(
                f"{what} returned Particles.errors for prompt {prompt}, expected prompts in "
                f"[0, {num_prompts})"
            )


def check_vocabulary_axis(values: FloatArray, particles: Particles, policy: Any, what: str) -> None:
    """A per-token output (``what``: ``"policy: next_log_probs"``, ``"reward: next_log_values"``) has shape
    ``(B, N, vocab_size)``, the policy's ``vocab_size`` (where it is an int): ValueError naming ``what``
    instead of a broadcasting error where the two are added."""
    vocab = getattr(policy, "vocab_size", None)
    batch = particles.lengths.shape
    if isinstance(vocab, (int, np.integer)) and not isinstance(vocab, (bool, np.bool_)):
        expected: tuple[Any, ...] = (*batch, int(vocab))
        if values.shape == expected:
            return
    elif values.ndim == 3 and values.shape[:2] == batch:
        return
    else:
        expected = (*batch, "vocab_size")
    raise ValueError(f"{what} returned shape {values.shape}, expected (B, N, vocab_size) = {expected}")


def prompts_list(prompts: Optional[Sequence[Any]]) -> Optional[list[Any]]:
    """The prompts as a list (None: the policy's one empty prompt); a bare string is refused, not read
    as one prompt per letter (``check_prompts``), and so is an empty sequence (ValueError: a run samples
    at least one prompt)."""
    listed = check_prompts(prompts)
    if listed is not None and not listed:
        raise ValueError("prompts: expected at least one prompt, got an empty sequence")
    return listed


def all_finished(particles: Particles) -> bool:
    """Whether every trajectory has finished (a count: between model calls, with the CPU's caches cold,
    ``np.count_nonzero`` costs about half of ``ndarray.all``)."""
    return int(np.count_nonzero(particles.finished)) == particles.finished.size


def failed_prompts(particles: Particles) -> npt.NDArray[np.bool_]:
    """Prompts the policy could not start (``particles.errors``): reported as collapsed, never run."""
    failed = np.zeros(particles.num_prompts, dtype=bool)
    if particles.errors:
        failed[list(particles.errors)] = True
    return failed


def checked_log_probs(log_p: FloatArray, particles: Particles, policy: Any) -> FloatArray:
    """A token policy's ``next_log_probs`` (``model_output``) as the samplers and ``bellman_error`` read
    them: of shape ``(B, N, vocab_size)`` (``check_vocabulary_axis``), and the prompts it cannot go on with
    failed (``fail_prompts_with_bad_log_probs``), unless the policy says ``log_probs_checked``: its
    ``next_log_probs`` never returns a row no token can be drawn from (it fails such prompts itself)."""
    check_vocabulary_axis(log_p, particles, policy, "policy: next_log_probs")
    if getattr(policy, "log_probs_checked", False) is True:
        return log_p
    return fail_prompts_with_bad_log_probs(particles, log_p)


def fail_prompts_with_bad_log_probs(particles: Particles, log_p: FloatArray) -> FloatArray:
    """A token policy's ``next_log_probs`` (``(B, N, vocab)``, ``checked_log_probs``) read for the prompts it
    cannot go on with: an unfinished particle whose row holds NaN or ``+inf``, or only ``-inf`` (no token can
    be drawn), fails its prompt as ``OnnxCausalLM`` fails one (its reason in ``particles.errors``, its
    particles finished), so that the samplers fail that prompt alone. Returns ``log_p``, its rows of no
    usable law (then all of finished particles, never drawn for) read as a uniform law; one reduction over
    ``log_p`` where every row is usable (NaN propagates through max)."""
    if not log_p.size:
        return log_p
    row_max = log_p.max(axis=-1)
    unusable = ~np.isfinite(row_max)
    if not unusable.any():
        return log_p
    fail_prompts_without_a_law(particles, row_max, ~particles.finished, "policy: next_log_probs returned")
    log_p = log_p.copy()  # not the policy's own array
    log_p[unusable] = 0.0  # rows of finished particles only, now
    return log_p


def model_output(output: Any, what: str) -> FloatArray:
    """A model's numbers (``what``: ``"reward: log_value"``, ``"policy: next_log_probs"``) as a float64
    array; an array of other than real numbers is refused (ValueError naming ``what``), not converted:
    numpy would parse strings as numbers, drop complex numbers' imaginary parts and read bools as 0 and
    1."""
    array = np.asarray(output)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{what} returned an array of dtype {array.dtype}, expected real numbers")
    return np.asarray(array, dtype=np.float64)


def check_log_values(value: FloatArray, name: str) -> FloatArray:
    """Log-values are finite or -inf (a zero value); NaN or +inf means a broken reward model."""
    if value.size and not value.max() < np.inf:  # NaN propagates through max
        what = "NaN" if np.isnan(value).any() else "+inf"
        raise ValueError(f"reward: {name} returned {what} (log-values must be finite or -inf: r >= 0)")
    return value
