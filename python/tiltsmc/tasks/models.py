"""The test-bed task as models: its Markov chain as a token policy, twist tables as a twist model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import numpy.typing as npt

from ..models.particles import Particles
from ..models.prompts import check_prompts
from ..models.sampling import sample_categorical

if TYPE_CHECKING:
    from .markov_dfa import MarkovDFATask

__all__ = ["MarkovPolicy", "TableTwist"]

FloatArray = npt.NDArray[np.float64]


def _chain_difference(a: MarkovDFATask, b: MarkovDFATask) -> Optional[str]:
    """How the Markov chain of task ``a`` differs from task ``b``'s (``vocab_size``, ``horizon``, ``init``,
    the transitions used: positions ``1..T-1``, a homogeneous chain against its rows repeated), or None
    where it is the same."""
    if a.vocab_size != b.vocab_size:
        return f"vocab_size {a.vocab_size}, not {b.vocab_size}"
    if a.horizon != b.horizon:
        return f"horizon {a.horizon}, not {b.horizon}"
    if not np.array_equal(a.init, b.init):
        return "another init"
    if a.horizon == 1:  # no transition is used
        return None
    if not (a.time_varying or b.time_varying):
        same = np.array_equal(a.trans, b.trans)
    else:
        used = (a.horizon - 1, a.vocab_size, a.vocab_size)

        def rows(task: MarkovDFATask) -> FloatArray:
            return task.trans[: a.horizon - 1] if task.time_varying else np.broadcast_to(task.trans, used)

        same = np.array_equal(rows(a), rows(b))
    return None if same else "other transitions"


def _prompts(prompts: Optional[Sequence[Any]]) -> list[Any]:
    """The prompts, each an empty sequence: the task starts from an empty prefix (None, or a None prompt, is
    the empty prompt, as for the ONNX policies). Any other prompt raises ValueError naming it
    (``prompts: prompt b: ...``; ValueError as for a prompt an ONNX policy cannot encode)."""
    checked = check_prompts(prompts)
    if checked is None:
        return [()]
    if not checked:
        raise ValueError("prompts: expected at least one prompt, got an empty sequence")
    out: list[Any] = []
    for b, prompt in enumerate(checked):
        if prompt is None:  # no prompt (a lane starting several prompt-less runs at once passes None)
            out.append(())
            continue
        try:
            length = len(prompt)
        except TypeError:
            raise ValueError(
                f"prompts: prompt {b}: the Markov test-bed task starts from an empty prefix: expected an "
                f"empty sequence, got {type(prompt).__name__} {prompt!r:.40}"
            ) from None
        if length != 0:
            raise ValueError(
                f"prompts: prompt {b}: the Markov test-bed task starts from an empty prefix: got {length} "
                "tokens (pass empty prompts, one per independent run)"
            )
        out.append(prompt)
    return out


class MarkovPolicy:
    """``p(x_0) = init``, ``p(x_i | x_{i-1}) = P_i[x_{i-1}]``; finished after ``horizon`` tokens.

    Every particle is at its own position (its length), so batches started at different times can be
    joined (the serving engine does): ``supports_engine``.

    The laws are read from the task's own arrays (its ``log_init`` and log-transitions, one ``(V, V)``
    table for a homogeneous chain, whatever the horizon): building the policy allocates nothing more.

    A trajectory has exactly ``horizon`` tokens: the task's reward (and a
    ``TableTwist``'s last level) is read there. The samplers hand
    ``start`` each run's ``max_new_tokens`` (``start_takes_token_limits``), and a limit other than the
    horizon is refused (ValueError naming ``max_new_tokens``) before anything is drawn: cut short, the
    trajectories would be scored with the twist's level at that length in place of the reward, and the
    sampler would return prefixes and another ``log Z`` than the task's.

    Args:
        task: the task whose chain this is.
        allow_token_limits: take a limit below the horizon (keyword only; default False): the
            trajectories end there, scored with the twist's level at that length, so that the sampler
            targets ``p(x_{0:t}) Vh_t(x_{0:t})``, not the task's ``pi``. For tests of the engine's
            mechanics (runs that end at different lengths), never for results checked against the task's
            exact answers.
    """

    token_level = True  # a step is one token
    supports_engine = True
    log_probs_checked = True  # the task's laws are checked distributions: a token can always be drawn
    # the samplers hand start each prompt's token limit (Models.start): any other than the horizon is refused
    start_takes_token_limits = True

    def __init__(self, task: MarkovDFATask, *, allow_token_limits: bool = False) -> None:
        if not isinstance(allow_token_limits, (bool, np.bool_)):
            raise TypeError(
                f"allow_token_limits: expected a bool, got {type(allow_token_limits).__name__} "
                f"{allow_token_limits!r:.40}"
            )
        self.task = task
        self.allow_token_limits = bool(allow_token_limits)
        self.vocab_size = task.vocab_size
        self._log_init = task.log_init  # (V,): the law of token 0
        # (V, V) for a homogeneous chain, else (T, V, V) with row [t - 1] the law of token t >= 1 given the
        # previous one (row [T - 1] is unused): the task's read-only arrays, not copies
        self._log_trans = task._log_trans_arr

    def start(
        self,
        prompts: Optional[Sequence[Any]],
        num_particles: int,
        max_new_tokens: Optional[Sequence[Optional[int]]] = None,
    ) -> Particles:
        """``num_particles`` empty trajectories per prompt; a prompt that is not empty (or None) raises
        ValueError naming it. ``max_new_tokens``: each prompt's token limit (None: the horizon), as the
        samplers pass it; a limit other than the task's ``horizon`` (or a list of another length than the
        prompts') raises ValueError naming ``max_new_tokens``, unless the policy was built with
        ``allow_token_limits`` (then the samplers end the trajectories at their limits)."""
        prompt_list = _prompts(prompts)
        if max_new_tokens is not None and not self.allow_token_limits:
            self._check_token_limits(max_new_tokens, len(prompt_list))
        return Particles.empty(prompt_list, num_particles, self.task.horizon)

    def _check_token_limits(self, max_new_tokens: Sequence[Optional[int]], num_prompts: int) -> None:
        """Refuse (ValueError naming ``max_new_tokens``) token limits other than the horizon."""
        horizon = self.task.horizon
        try:
            limits = list(max_new_tokens)
        except TypeError:
            raise ValueError(
                f"max_new_tokens: expected one limit per prompt, got {type(max_new_tokens).__name__}"
            ) from None
        if len(limits) != num_prompts:
            raise ValueError(f"max_new_tokens: expected one per prompt ({num_prompts}), got {len(limits)}")
        for limit in limits:
            if limit is None:
                continue
            if (
                isinstance(limit, (bool, np.bool_))
                or not isinstance(limit, (int, np.integer))
                or limit != horizon
            ):
                raise ValueError(
                    f"max_new_tokens: the Markov test-bed task's trajectories have exactly horizon = "
                    f"{horizon} tokens (its reward is read at the last), got a limit of {limit!r:.40}: cut "
                    "short, they would be scored with the twist's value at that length in place of the "
                    f"reward (pass max_new_tokens=None or {horizon})"
                )

    def next_log_probs(self, particles: Particles) -> FloatArray:
        """The law of each particle's next token, ``(B, N, V)``, read at the particle's own length. A
        finished particle gets an arbitrary law (never drawn from), so a batch may mix finished and
        unfinished trajectories; ValueError (naming ``particles``) for an unfinished one that already
        has ``horizon`` tokens."""
        t = particles.lengths
        if ((t >= self.task.horizon) & ~particles.finished).any():
            raise ValueError(
                "particles: an unfinished trajectory already has the full horizon "
                f"({self.task.horizon} tokens): there is no next token to draw"
            )
        t = np.minimum(t, self.task.horizon - 1)  # finished particles: any law (never drawn from)
        previous = np.take_along_axis(particles.tokens, np.maximum(t - 1, 0)[..., None], axis=-1)[..., 0]
        log_probs: FloatArray
        if self._log_trans.ndim == 3:  # time-varying: at t = 0 the unused row T - 1, replaced below
            log_probs = self._log_trans[t - 1, previous]
        else:
            log_probs = self._log_trans[previous]
        first = t == 0
        if first.any():  # the law of token 0 (the gather is a fresh array)
            log_probs[first] = self._log_init
        return log_probs

    def append(self, particles: Particles, tokens: npt.NDArray[np.int64]) -> None:
        b, i = np.nonzero(~particles.finished)
        particles.tokens[b, i, particles.lengths[b, i]] = tokens[b, i]
        particles.lengths[b, i] += 1
        particles.finished |= particles.lengths >= self.task.horizon

    def propose(self, particles: Particles, rng: np.random.Generator) -> FloatArray:
        log_probs = self.next_log_probs(particles)
        tokens = sample_categorical(log_probs, rng)
        self.append(particles, tokens)
        return np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


class TableTwist:
    """``log Vh_t(prefix) = tables[t][last token, DFA state]`` with ``tables[0] = log Vh_0``.

    ``tables`` has the layout of ``MarkovDFATask.log_v_star``, checked (and copied) at construction as
    ``MarkovDFATask.bellman_error`` checks it: ``T+1`` levels, ``tables[0]`` a real ``log Vh_0`` (finite or
    ``-inf``), ``tables[t]`` a ``(V, Q)`` array of log-values, each finite or ``-inf`` (TypeError or
    ValueError naming ``tables``). The attribute ``tables`` is a tuple ``(log Vh_0, level 1, ..., level
    T)`` of read-only arrays: they are views of the one ``(T + 1, V, Q)`` array the twist reads, so
    what ``bellman_error`` and the samplers see cannot drift apart (a changed twist is a new
    ``TableTwist``).

    The DFA state of each particle is kept in ``particles.state["dfa"]`` and follows resampling; each
    particle is read at its own length (``supports_engine``).

    The samplers call ``check_policy`` first: the twist's values are its task's, so a policy of another
    Markov chain (another task's ``MarkovPolicy``, or one whose ``vocab_size`` differs) is refused
    (ValueError naming ``reward``).
    """

    supports_engine = True

    def __init__(self, task: MarkovDFATask, tables: Sequence[Union[float, npt.ArrayLike]]) -> None:
        from .markov_dfa import MarkovDFATask

        if not isinstance(task, MarkovDFATask):
            raise TypeError(f"task: expected a tiltsmc.tasks.MarkovDFATask, got {type(task).__name__}")
        # the checks of MarkovDFATask.bellman_error: T+1 levels, a real log Vh_0 (finite or -inf), then
        # (V, Q) arrays of log-values that are finite or -inf (TypeError / ValueError naming ``tables``)
        root, levels = task._check_tables(tables)
        self.task = task
        self.vocab_size = task.vocab_size
        # (horizon + 1, V, Q): level 0 is the constant log Vh_0; read-only, and ``tables`` views of it
        self._levels = np.stack([np.full(levels[0].shape, root), *levels])
        del levels
        self._levels.setflags(write=False)
        self.tables: tuple[Union[float, FloatArray], ...] = (root, *self._levels[1:])

    def check_policy(self, policy: Any) -> None:
        """Refuse (ValueError naming ``reward``) a policy of another Markov chain than this twist's task's:
        a ``tiltsmc.tasks.models.MarkovPolicy`` (or a model whose ``task`` is a
        ``MarkovDFATask``) of a task with another ``vocab_size``, ``horizon``, ``init`` or transitions
        (the same task, or one with the same chain and another automaton or reward, is accepted); any
        other policy whose ``vocab_size`` differs from the task's. A policy that says neither (a wrapper
        of the task's own, say) is accepted."""
        from .markov_dfa import MarkovDFATask

        theirs = policy.task if isinstance(policy, MarkovPolicy) else getattr(policy, "task", None)
        if isinstance(theirs, MarkovDFATask):
            difference = None if theirs is self.task else _chain_difference(theirs, self.task)
            if difference is not None:
                raise ValueError(
                    f"reward: the twist is of {self.task!r}, the policy of {theirs!r}, another Markov chain "
                    f"({difference}): pass the twist's task's policy (task.policy())"
                )
            return
        vocab = getattr(policy, "vocab_size", None)
        if isinstance(vocab, (int, np.integer)) and not isinstance(vocab, (bool, np.bool_)):
            if vocab != self.vocab_size:
                raise ValueError(
                    f"reward: this twist's task has vocab_size {self.vocab_size}, the policy {vocab}: pass "
                    "the twist's task's policy (task.policy())"
                )

    def _states(self, particles: Particles) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """DFA state after each prefix, advanced over the tokens appended since the last call.

        Kept as one ``(B, N, 2)`` array ``[state, tokens read]`` in ``particles.state["dfa"]``: one reorder
        per resampling step instead of two.
        """
        if "dfa" not in particles.state:
            dfa = np.zeros((*particles.lengths.shape, 2), dtype=np.int32)  # 8-byte items move fastest
            dfa[..., 0] = self.task.start
            particles.state["dfa"] = dfa
        dfa = particles.state["dfa"]
        states, read = dfa[..., 0], dfa[..., 1]
        while True:
            behind = read < particles.lengths
            if not behind.any():
                return states, read
            b, i = np.nonzero(behind)
            token = particles.tokens[b, i, read[b, i]]
            states[b, i] = self.task.dfa[states[b, i], token]
            read[b, i] += 1

    def initial_log_value(self, particles: Particles) -> FloatArray:
        return np.full(particles.num_prompts, self.tables[0])

    def log_value(self, particles: Particles) -> FloatArray:
        states, read = self._states(particles)
        last = np.take_along_axis(particles.tokens, np.maximum(read - 1, 0)[..., None], axis=-1)[..., 0]
        values: FloatArray = self._levels[read, last, states]
        return values

    def next_log_values(self, particles: Particles) -> FloatArray:
        states, read = self._states(particles)
        following = self.task.dfa[states]  # (B, N, V): state after appending each token
        level = np.minimum(read + 1, self.task.horizon)[..., None]
        values: FloatArray = self._levels[level, np.arange(self.vocab_size), following]
        return values
