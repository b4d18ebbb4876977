r"""The samplers as resumable runs: one sampler call's state between steps, advanced by a ``Lane``.

A run holds what one sampler call keeps from step to step (log-weights, the ``log Zh`` estimate, the
trace) for its prompts, its own generator and its own [`Compute`][tiltsmc.samplers.result.Compute]. It never
calls a model: a ``Lane`` makes the model calls for every run it holds at once (one
``propose``, one ``log_value`` per step) and hands each run its rows, so the offline functions
([`tiltsmc.smc`][tiltsmc.smc] and the others: one run in a lane of its own) and the serving engine (many runs
in one lane) share this code. A lane calls, in order:

* ``Run.wants`` -> ``(prompts, count)`` when the run needs a fresh batch of particles, then
  ``Run.begin`` with ``log Vh_0`` of its prompts;
* every step, ``Run.before_step``, the model calls, then the run's own update: ``Run.reweigh``
  (``kind == "guided"``: SMC with the naive proposal, SP-gSMC with a pool), ``Run.choose`` and
  ``Run.after_append`` (``"twist"``: the optimal proposal), or ``Run.end_rollout``
  (``"rollout"``: best-of-N and rejection, scored once at the end);
* ``Run.end`` once its particles have all finished. ``result`` is then set, unless the run wants
  another batch (the MH correction's next proposal, rejection's next round).

A prompt can fail on its own during the run (a model's output for its particles alone is unusable: policy
logits no token can be drawn from, a reward model that fails on its prefixes): the lane finishes its
particles and calls ``Run.fail_prompt``, and the run reports it as it reports a prompt the policy could not
start (in ``errors``, collapsed, every weight zero, ``log Zh = -inf``) while its other prompts go on
exactly as they would have had its particles ended there with weight zero.

Each run draws from its own generator in the same order as the sampler alone would, so a run with a seed
gives the same result in a lane of its own or batched with others (the models' arithmetic aside: a
batched session call may round differently).
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any, ClassVar, Optional, Union

import numpy as np
import numpy.typing as npt

from .. import core
from .._numeric import logsumexp
from .._rng import RowStreams
from ..models.particles import Particles
from ..models.sampling import sample_categorical
from ._engine import FloatArray, all_finished
from .result import Compute, SamplerResult

LOG_V_PREV = "smc.log_value"  # Particles.state key of each particle's log Vh_{t-1}
_LOG_DOUBLE_MAX = math.log(sys.float_info.max)  # exp of anything below is a finite double

Ancestors = Optional[npt.NDArray[np.int64]]


def safe_increment(log_new: FloatArray, log_old: FloatArray) -> FloatArray:
    """``log_new - log_old`` with ``-inf - -inf`` (a particle already of weight zero) read as ``-inf``."""
    old_zero = log_old == -np.inf
    if not old_zero.any():
        return np.subtract(log_new, log_old)
    difference = np.subtract(log_new, np.where(old_zero, 0.0, log_old))
    difference[np.broadcast_to(old_zero, difference.shape)] = -np.inf
    return difference


def samples_of(particles: Particles, rows: Optional[npt.NDArray[np.int64]] = None) -> list[Any]:
    """Per prompt, an ``(N, T)`` int array when every trajectory has the same length, else a list."""
    if rows is None and particles.lengths.size and (particles.lengths == particles.lengths.flat[0]).all():
        # one copy for all prompts: a lane writes a newcomer's tokens over the rows of a run that ended
        return list(particles.tokens[:, :, : particles.lengths.flat[0]].copy())
    out: list[Any] = []
    for b in range(particles.num_prompts):
        lengths = particles.lengths[b] if rows is None else particles.lengths[b, rows[b]]
        tokens = particles.tokens[b] if rows is None else particles.tokens[b, rows[b]]
        if np.all(lengths == lengths[0]):
            out.append(tokens[:, : lengths[0]].copy())
        else:
            out.append([tokens[i, : lengths[i]].copy() for i in range(len(lengths))])
    return out


def decode_texts(policy: Any, samples: list[Any]) -> Optional[list[list[str]]]:
    """Each sample decoded to text where the policy has a tokenizer (``policy.decode``), else None."""
    if getattr(policy, "tokenizer", None) is None or not callable(getattr(policy, "decode", None)):
        return None
    return [[policy.decode(sequence) for sequence in per_prompt] for per_prompt in samples]


def _empty_trace(batch: int) -> dict[str, Any]:
    return {
        "ess": np.zeros((batch, 0)),
        "resampled": np.zeros((batch, 0), dtype=bool),
        "unique_ancestors": np.zeros((batch, 0), dtype=np.int64),
        "log_z_increments": np.zeros((batch, 0)),
        "log_z_increment_se": np.zeros((batch, 0)),
    }


def increment_standard_error(
    log_w_prev: FloatArray, log_total: FloatArray, log_g: FloatArray, increment: FloatArray
) -> FloatArray:
    r"""Standard error of a log Z increment ``l_t = log sum_i W_{t-1,i} G_{t,i}`` (delta method), per row.

    Given the particles before step ``t``, ``sum_i W_i G_i`` is an unbiased estimate of
    ``m_t = sum_i W_i E_p[G_t | prefix_i]`` with variance ``sum_i W_i^2 Var_p(G_t | prefix_i)``, estimated by
    ``sum_i W_i^2 (G_i - e^l)^2`` (each particle's one draw against the weighted mean, an overestimate by
    the spread of the ``E_p[G_t | prefix_i]``); relative to ``e^l`` that is
    ``sd(l_t) ~ sqrt(sum_i (W_i G_i / e^l - W_i)^2)``, the distance between the normalised weights before
    and after the step. ``inf`` where the increment is ``-inf`` (every potential 0: no reading).
    """
    finite = increment > -np.inf
    out = np.full(increment.shape, np.inf)
    if finite.any():
        log_before = log_w_prev[finite] - log_total[finite, None]  # log W_i (log_total > -inf on these rows)
        log_after = log_before + log_g[finite] - increment[finite, None]  # log (W_i G_i / e^l) <= 0
        out[finite] = np.sqrt(np.sum(np.square(np.exp(log_after) - np.exp(log_before)), axis=1))
    return out


class Trace:
    """Per-step diagnostics: for each step, the arrays of the call that stepped the run (``ess``,
    ``resampled``, ``unique_ancestors``, ``log_z_increments``, ``log_z_increment_se``, each ``(rows,)``) and
    the run's rows of them. A call that steps several runs at once (``reweigh_together``) is recorded by
    reference, one entry a run; the run's rows are read out every ``CHUNK`` steps (a long run in a busy
    engine otherwise kept every step's arrays of all the runs beside it alive: 165 times its own rows'
    worth with 200 in flight) and at the end, by ``stacked``."""

    FIELDS = (
        ("ess", np.float64),
        ("resampled", np.bool_),
        ("unique_ancestors", np.int64),
        ("log_z_increments", np.float64),
        ("log_z_increment_se", np.float64),
    )
    CHUNK = 64  # steps held by reference before the run's rows of them are read out

    def __init__(self) -> None:
        self.steps: list[tuple[tuple[np.ndarray, ...], int, int]] = []  # held by reference
        self._read: list[list[np.ndarray]] = []  # per read-out, each field's (steps, rows) array
        self.ancestry: list[npt.NDArray[np.int64]] = []

    def record(self, outputs: tuple[np.ndarray, ...], start: int, stop: int) -> None:
        """A step: ``outputs`` by ``FIELDS`` (never written afterwards), the run's rows ``start:stop``."""
        self.steps.append((outputs, start, stop))
        if len(self.steps) >= self.CHUNK:
            self._read.append(self._read_out())
            self.steps = []

    def _read_out(self) -> list[np.ndarray]:
        """Each field's ``(steps, rows)`` array of the steps held by reference."""
        steps = self.steps
        if all(stop - start == 1 for _, start, stop in steps):  # one row: its entries, half the time
            return [
                np.array([outputs[k][start] for outputs, start, _ in steps], dtype)[:, None]
                for k, (_, dtype) in enumerate(self.FIELDS)
            ]
        return [
            np.array([outputs[k][start:stop] for outputs, start, stop in steps], dtype=dtype)
            for k, (_, dtype) in enumerate(self.FIELDS)
        ]

    def stacked(self, batch: int) -> dict[str, Any]:
        """Each of ``FIELDS`` as a ``(batch, steps)`` array."""
        parts = self._read + ([self._read_out()] if self.steps else [])
        if not parts:
            return {name: np.zeros((batch, 0), dtype=dtype) for name, dtype in self.FIELDS}
        stacked: dict[str, np.ndarray] = {}
        for k, (name, _) in enumerate(self.FIELDS):
            rows = parts[0][k] if len(parts) == 1 else np.concatenate([part[k] for part in parts])
            stacked[name] = np.ascontiguousarray(rows.T)  # (steps, B) transposed
        return stacked


class Run:
    """One sampler call, resumable between steps (see the module docstring)."""

    kind: ClassVar[str] = "guided"
    sampler: ClassVar[str] = ""

    def __init__(self, prompts: Optional[list[Any]], generator: np.random.Generator, max_steps: int) -> None:
        self.prompts = prompts
        self.generator = generator
        self.max_steps = max_steps
        self.compute = Compute()
        self.result: Optional[SamplerResult] = None
        self.policy: Any = None  # set by the lane: decodes texts for the result
        self.steps = 0
        self.report = True  # False: a proposal of an MH run, whose result is never read
        # False: the result's texts are left None, for whoever reads it to decode (the serving engine's
        # future decodes them on its first read, on the reader's thread instead of the engine's worker)
        self.decodes_texts = True
        self.max_new_tokens: Optional[int] = None  # None: the policy's own limit
        self.errors: dict[int, str] = {}  # by the run's prompt: why it failed ("prompt k: reason")

    @property
    def rows_per_prompt(self) -> int:
        """The most particles the run holds at once for each of its prompts."""
        raise NotImplementedError

    @property
    def num_prompts(self) -> int:
        """The run's prompts (None: the policy's one empty prompt)."""
        return 1 if self.prompts is None else len(self.prompts)

    def prompt_index(self, prompt: int) -> int:
        """The run's own index of prompt ``prompt`` of its current batch (the same but for rejection's
        later rounds, whose batch holds the prompts still waiting)."""
        return prompt

    def has_failed(self, prompt: int) -> bool:
        """Whether prompt ``prompt`` of the current batch has failed (at its start, or since)."""
        return self.prompt_index(prompt) in self.errors

    def fail_prompt(self, prompt: int, message: str) -> None:
        """Prompt ``prompt`` of the current batch failed during the run (``message``: ``prompt k: reason``,
        ``k`` the run's own index); the lane has finished its particles. It ends as a prompt the policy could
        not start does: in ``errors`` (the first reason kept), collapsed, every weight zero, ``log Zh =
        -inf``, never resampled or drawn again. The run's other prompts are not touched: they get exactly
        what they would have got had its particles ended there with weight zero."""
        raise NotImplementedError

    def _stop_live(self, prompt: int) -> None:
        """Prompt ``prompt``'s particles are not extended by the step under way (``before_step``'s
        ``live``, in place)."""
        live = getattr(self, "live", None)
        if live is not None:
            live[prompt] = False

    def texts_of(self, samples: list[Any]) -> Optional[list[list[str]]]:
        """The result's ``texts`` for ``samples`` (``decode_texts``); None where ``decodes_texts`` is off."""
        return decode_texts(self.policy, samples) if self.decodes_texts else None

    def wants(self) -> Optional[tuple[Optional[list[Any]], int]]:
        """``(prompts, particles per prompt)`` of the batch the run needs next, or None."""
        raise NotImplementedError

    def begin(self, log_v0: FloatArray, failed: npt.NDArray[np.bool_], errors: dict[int, str]) -> FloatArray:
        """Start on a new batch: ``log Vh_0`` and the prompts the policy could not start (``errors``, by
        prompt). Returns every particle's initial ``log Vh_{t-1}`` (``(B, N)``, perhaps a read-only view)."""
        raise NotImplementedError

    def before_step(self, particles: Particles) -> None:
        self.live = ~particles.finished

    def reweigh(self, particles: Particles, log_v: FloatArray) -> Ancestors:
        raise NotImplementedError(f"{type(self).__name__} does not take guided steps")

    def choose(
        self, particles: Particles, log_p: FloatArray, next_log_values: FloatArray
    ) -> npt.NDArray[np.int64]:
        raise NotImplementedError(f"{type(self).__name__} does not take twisted steps")

    def after_append(self, particles: Particles) -> Ancestors:
        raise NotImplementedError(f"{type(self).__name__} does not take twisted steps")

    def end_rollout(self, particles: Particles, log_r: FloatArray) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not roll out")

    def end(self, particles: Particles) -> None:
        """Every particle has finished: build ``result`` (or get ready for the next batch)."""
        raise NotImplementedError

    def check_steps(self, particles: Particles) -> None:
        """Count a step; refuse to go past ``max_steps`` with trajectories unfinished."""
        self.count_step(all_finished(particles))

    def count_step(self, done: bool) -> None:
        """``check_steps`` given whether every trajectory has finished (``done``)."""
        self.steps += 1
        if self.steps >= self.max_steps and not done:
            raise RuntimeError(f"max_steps: trajectories still unfinished after {self.max_steps} steps")

    def smc_reweighing(self) -> Optional[SMCRun]:
        """The ``SMCRun`` whose SMC step ``reweigh`` (or ``after_append``) is, so that the lane can step it
        with others in one core call ([`reweigh_together`][tiltsmc.samplers.runs.reweigh_together]); or
        None."""
        return None

    def pool_reweighing(self) -> Optional[PoolRun]:
        """The ``PoolRun`` whose pool step ``reweigh`` is, so that the lane can draw its pools with others' in
        one core call ([`pool_together`][tiltsmc.samplers.runs.pool_together]); or None."""
        return None


class SMCRun(Run):
    r"""SMC with the ratio potentials ``G_t = Vh_t / Vh_{t-1}`` (see [`tiltsmc.smc`][tiltsmc.smc]).

    Step ``t`` multiplies each live particle's weight by ``G_t`` (naive proposal), or by
    ``sum_s p(s|.) Vh_t(., s) / Vh_{t-1}`` after drawing ``s_t ~ q ∝ p Vh_t`` (optimal proposal), and
    ``log Zh += log sum_i W_{t-1,i} G_{t,i}``; prompts resample when ``ESS < ess_threshold * N``, never
    after the last step.
    """

    sampler = "smc"

    def __init__(
        self,
        prompts: Optional[list[Any]],
        num_particles: int,
        resample: str,
        ess_threshold: float,
        proposal: str,
        generator: np.random.Generator,
        max_steps: int,
        record_ancestry: bool = False,
        final_resample: Optional[int] = None,
    ) -> None:
        super().__init__(prompts, generator, max_steps)
        self.num_particles = num_particles
        self.scheme = resample
        self.ess_threshold = ess_threshold
        self.proposal = proposal
        self.record_ancestry = record_ancestry
        self.final_resample = final_resample
        self.started = False
        self.trace = Trace()

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "guided" if self.proposal == "naive" else "twist"

    @property
    def rows_per_prompt(self) -> int:
        # final_resample = M draws M trajectories by weight at the end: M rows of tokens held at once
        return max(self.num_particles, self.final_resample or 0)

    def wants(self) -> Optional[tuple[Optional[list[Any]], int]]:
        return None if self.started else (self.prompts, self.num_particles)

    def begin(self, log_v0: FloatArray, failed: npt.NDArray[np.bool_], errors: dict[int, str]) -> FloatArray:
        self.started = True
        self.errors = dict(errors)
        batch, count = len(log_v0), self.num_particles
        self.log_z = log_v0.copy()
        self.collapsed = (log_v0 == -np.inf) | failed
        self.log_w = np.zeros((batch, count))
        self.log_total = np.full(batch, math.log(count))  # logsumexp of each row of log_w
        if self.collapsed.any():
            self.log_w[self.collapsed] = -np.inf  # weight zero: reported by the core, never resampled
            self.log_total[self.collapsed] = -np.inf
        return np.broadcast_to(log_v0[:, None], (batch, count))

    def reweigh(self, particles: Particles, log_v: FloatArray) -> Ancestors:
        return self._reweigh(particles, log_v, self.live)

    def smc_reweighing(self) -> Optional[SMCRun]:
        return self

    def fail_prompt(self, prompt: int, message: str) -> None:
        self.errors.setdefault(prompt, message)
        # in place: the arrays may be views of a SharedStep's, which the next shared step reads
        self.collapsed[prompt] = True
        self.log_w[prompt] = -np.inf
        self.log_total[prompt] = -np.inf
        self._stop_live(prompt)

    def choose(
        self, particles: Particles, log_p: FloatArray, next_log_values: FloatArray
    ) -> npt.NDArray[np.int64]:
        joint = log_p + next_log_values
        log_sum = logsumexp(joint)
        dead = log_sum == -np.inf  # q is undefined; the particle's weight becomes zero anyway
        joint[dead] = 0.0
        tokens = sample_categorical(joint, self.generator)
        self._drawn = (next_log_values, tokens, log_sum)
        return tokens

    def after_append(self, particles: Particles) -> Ancestors:
        log_v = self.optimal_weights(particles)
        return self._reweigh(particles, log_v, np.zeros_like(self.live))

    def optimal_weights(self, particles: Particles) -> FloatArray:
        """The optimal proposal's weight update for the tokens ``choose`` drew, applied to ``log_w`` and
        ``log Vh_{t-1}``: ``log_w += log sum_s p(s|.) Vh_t(., s) - log Vh_{t-1}`` on live particles. Returns
        ``log Vh_t`` of the drawn tokens; the SMC step that follows applies no potential (it only
        resamples)."""
        next_log_values, tokens, log_sum = self._drawn
        log_v = np.take_along_axis(next_log_values, tokens[..., None], -1)[..., 0]
        log_v_prev = particles.state[LOG_V_PREV]
        live = self.live
        self.log_w += np.where(live, safe_increment(log_sum, log_v_prev), 0.0)
        log_v_prev[live] = log_v[live]
        return log_v

    def _reweigh(
        self, particles: Particles, log_v: FloatArray, reweighted: npt.NDArray[np.bool_]
    ) -> Ancestors:
        # One core call: the potentials, ESS, the adaptive decision, resampling (survivors stay in their
        # slots, so that the in-place reorder moves only the dead), the reset of resampled rows' weights
        # and log Zh += log sum_i W_{t-1,i} G_{t,i}; never resampling a prompt after its last step: its final
        # sample stays weighted.
        done = all_finished(particles)
        rows_done: Optional[npt.NDArray[np.bool_]] = None
        if not done and len(self.log_z) > 1:
            rows_done = np.all(particles.finished, axis=1)
        return self._step(log_v, particles.state[LOG_V_PREV], reweighted, done, self.generator, rows_done)

    def _step(
        self,
        log_v: FloatArray,
        log_v_prev: FloatArray,
        reweighted: npt.NDArray[np.bool_],
        done: bool,
        rng: Union[np.random.Generator, RowStreams],
        rows_done: Optional[npt.NDArray[np.bool_]] = None,
    ) -> Ancestors:
        """``_reweigh`` on the run's arrays, ``done`` saying whether every trajectory has finished and
        ``rows_done`` (where given) whether each prompt's have."""
        threshold: Any = 0.0 if done else self.ess_threshold
        if rows_done is not None and not done and rows_done.any():
            threshold = np.where(rows_done, 0.0, self.ess_threshold)
        # the increment's standard error from the core too (0 where no potential was applied: the optimal
        # proposal's increment log sum_i W_i E_p[G | prefix_i] is exact given the prefixes)
        increment_se = np.empty(len(self.log_z))
        stepped = core.smc_reweight(
            self.log_w,
            log_v,
            log_v_prev,
            reweighted,
            self.log_total,
            self.log_z,
            self.collapsed,
            threshold,
            self.scheme,  # type: ignore[arg-type]  # a scheme name, checked by the sampler's arguments
            rng,
            increment_se=increment_se,
        )
        return self._record((*stepped, increment_se), 0, len(self.log_z), done)

    def _record(
        self,
        stepped: tuple[np.ndarray, ...],
        start: int,
        stop: int,
        done: bool,
        resampled: Optional[bool] = None,
    ) -> Ancestors:
        """A step's outputs (``core.smc_reweight``'s, then the increments' standard errors), of which rows
        ``start:stop`` are the run's, into the trace; the step counted; the run's ancestors where one of its
        prompts resampled (``resampled``: whether one did, where the caller knows)."""
        ancestors, resample_rows, ess, unique, increment, increment_se = stepped
        self.trace.record((ess, resample_rows, unique, increment, increment_se), start, stop)
        if self.record_ancestry:
            self.trace.ancestry.append(np.array(ancestors[start:stop]))
        self.count_step(done)
        if resampled is None:
            resampled = bool(resample_rows[start:stop].any())
        return ancestors[start:stop] if resampled else None

    def end(self, particles: Particles) -> None:
        self.log_z = np.where(self.collapsed, -np.inf, self.log_z)
        if not self.report or type(self) is not SMCRun:
            return
        normalised, _, _ = core.log_normalize(self.log_w, zero_rows="report")
        if self.final_resample is None:
            samples = samples_of(particles)
            log_weights = list(normalised)
        else:
            samples, log_weights = self._final_resample(particles)
        trace = self.trace
        self.result = SamplerResult(
            sampler="smc",
            samples=samples,
            texts=self.texts_of(samples),
            errors=self.errors,
            log_weights=log_weights,
            log_z=self.log_z,
            collapsed=self.collapsed,
            compute=self.compute,
            ancestry=np.stack(trace.ancestry, axis=1) if self.record_ancestry and trace.ancestry else None,
            **trace.stacked(len(self.log_z)),
        )

    def _final_resample(self, particles: Particles) -> tuple[list[Any], list[FloatArray]]:
        """``final_resample = M`` particles per prompt drawn by weight with the run's scheme (``M = 1``: one
        particle with probability ``W_i``, Theorem 5.1's output rule), each of weight ``1/M``. A collapsed
        prompt keeps its first ``M`` slots (cycling), every weight 0."""
        count = int(self.final_resample or 1)
        batch = len(self.log_z)
        rows = np.tile(np.arange(count, dtype=np.int64) % self.num_particles, (batch, 1))
        alive = ~self.collapsed
        if alive.any():
            scheme: Any = self.scheme  # a scheme name, checked by the sampler's arguments
            rows[alive] = core.resample(self.log_w[alive], scheme, count, rng=self.generator)
        log_weights = [
            np.full(count, -np.inf if self.collapsed[b] else -math.log(count)) for b in range(batch)
        ]
        return samples_of(particles, rows), log_weights


def run_streams(runs: list[SMCRun]) -> RowStreams:
    """The streams of runs stepped together by ``reweigh_together``: each run's generator for its prompts,
    one after the other (no key drawn yet)."""
    bounds = [0, *itertools.accumulate(len(run.log_z) for run in runs)]
    return RowStreams([run.generator for run in runs], bounds)


_SMC_ARRAYS = ("log_w", "log_total", "log_z", "collapsed")  # an SMCRun's arrays that the core steps


class SharedStep:
    """Runs that [`reweigh_together`][tiltsmc.samplers.runs.reweigh_together] steps together, step after
    step, and what carries over from one of their steps to the next: their streams (``run_streams``; keys
    drawn at each step), their thresholds and schemes as the core takes them, and their SMC arrays
    (``log_w``, ``log_total``, ``log_z``, ``collapsed``) one after the other. After a step each run holds
    views of those arrays, so the next step starts from them instead of copying the runs' arrays together
    again, unless a run's arrays were replaced meanwhile (checked by identity)."""

    def __init__(self, runs: list[SMCRun]) -> None:
        self.runs = runs
        self.streams = run_streams(runs)
        _, self.sizes, _ = self.streams.row_counters(self.streams.bounds[-1])
        self.by_run = [run.ess_threshold for run in runs]
        self.thresholds = _per_row(self.by_run, self.sizes)
        names = [run.scheme for run in runs]
        self.schemes: Any = (
            names[0] if names.count(names[0]) == len(names) else np.repeat(names, self.sizes).tolist()
        )
        self._arrays: Optional[tuple[np.ndarray, ...]] = None  # the arrays the runs hold views of
        self._views: list[tuple[np.ndarray, ...]] = []

    def of(self, runs: list[SMCRun]) -> bool:
        """Whether ``runs`` are this step's runs, in order (by identity: the step holds them)."""
        return len(runs) == len(self.runs) and all(a is b for a, b in zip(runs, self.runs))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The runs' ``_SMC_ARRAYS``, one after the other: those of the last step where the runs still hold
        its views, else copied together."""
        if self._arrays is not None and all(
            run.log_w is w and run.log_total is t and run.log_z is z and run.collapsed is c
            for run, (w, t, z, c) in zip(self.runs, self._views)
        ):
            return self._arrays
        return tuple(np.concatenate([getattr(run, name) for run in self.runs]) for name in _SMC_ARRAYS)

    def hand_out(self, arrays: tuple[np.ndarray, ...]) -> None:
        """Each run's rows of ``arrays`` (a step's, updated in place by the core) as its own arrays."""
        bounds = self.streams.bounds
        views = []
        for run, start, stop in zip(self.runs, bounds[:-1], bounds[1:]):
            run.log_w, run.log_total, run.log_z, run.collapsed = held = tuple(a[start:stop] for a in arrays)
            views.append(held)
        self._arrays, self._views = arrays, views


def _per_row(by_run: list[float], sizes: npt.NDArray[np.int64]) -> Any:
    """One value for every row where the runs agree (most often), else each run's repeated on its rows."""
    return by_run[0] if by_run.count(by_run[0]) == len(by_run) else np.repeat(by_run, sizes)


def reweigh_together(
    runs: list[SMCRun],
    log_v: FloatArray,
    log_v_prev: FloatArray,
    live: npt.NDArray[np.bool_],
    done: list[bool],
    shared: Optional[SharedStep] = None,
    rows_done: Optional[npt.NDArray[np.bool_]] = None,
) -> list[Union[Ancestors, Exception]]:
    """``SMCRun.reweigh`` of several runs with the same particle count ``N`` in one core call.

    ``log_v``, ``log_v_prev`` (updated in place) and ``live`` hold the runs' ``(B_k, N)`` rows one after the
    other; ``done[k]``: run ``k``'s trajectories have all finished; ``rows_done`` (needed only where a run
    has several prompts): whether each row's have (such a row never resamples again). Each run keeps its
    own scheme, ESS threshold and generator (one key drawn from it, its prompts numbered from 0: a
    ``RowStreams``), so each steps exactly as its own call would. Per run, what ``reweigh`` returns, or the
    exception it raises: where the call is refused (one run's overflow, which the core reports before
    writing anything), each run steps alone with the key it drew, and only the runs at fault fail.
    ``shared``: a ``SharedStep`` of these runs, kept for runs stepped together at every step (its streams'
    keys are drawn here).
    """
    if shared is None:
        shared = SharedStep(runs)
    elif not shared.of(runs):
        raise ValueError("shared: a SharedStep of other runs")
    streams = shared.streams
    streams.keys = None
    streams.keys = streams.run_keys()  # drawn once: a repeat run by run draws the same
    bounds, sizes = streams.bounds, shared.sizes
    arrays = shared.arrays()
    log_w, log_total, log_z, collapsed = arrays
    # a run whose trajectories have all finished never resamples (its final sample stays weighted)
    thresholds = shared.thresholds
    if rows_done is not None and rows_done.any():
        thresholds = np.where(rows_done, 0.0, np.repeat(shared.by_run, sizes))
    elif any(done):
        thresholds = _per_row([0.0 if d else t for t, d in zip(shared.by_run, done)], sizes)
    increment_se = np.empty(len(log_z))
    try:  # the schemes are names the samplers' arguments checked
        stepped = core.smc_reweight(
            log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, thresholds, shared.schemes, streams,
            increment_se=increment_se,
        )  # fmt: skip
    except ValueError:
        return [
            _alone(run, k, streams, log_v, log_v_prev, live, done[k], rows_done) for k, run in enumerate(runs)
        ]
    shared.hand_out(arrays)
    outputs = (*stepped, increment_se)
    # whether any prompt of each run resampled (reduceat reads a run of no prompts as its next row's)
    resampled: list[Optional[bool]]
    if len(runs) == len(log_z):  # a prompt each
        resampled = stepped[1].tolist()
    else:
        resampled = (
            np.logical_or.reduceat(stepped[1], bounds[:-1]).tolist() if sizes.all() else [None] * len(runs)
        )
    outcomes: list[Union[Ancestors, Exception]] = []
    for k, run in enumerate(runs):
        try:
            outcomes.append(run._record(outputs, bounds[k], bounds[k + 1], done[k], resampled[k]))
        except Exception as error:
            outcomes.append(error)
    return outcomes


def _alone(
    run: SMCRun,
    k: int,
    streams: RowStreams,
    log_v: FloatArray,
    log_v_prev: FloatArray,
    live: npt.NDArray[np.bool_],
    done: bool,
    rows_done: Optional[npt.NDArray[np.bool_]],
) -> Union[Ancestors, Exception]:
    """Run ``k`` of a refused ``reweigh_together`` stepped alone, with the key it drew."""
    rows = slice(streams.bounds[k], streams.bounds[k + 1])
    alone = RowStreams([run.generator], [0, rows.stop - rows.start], [streams.run_keys()[k]])
    own = None if rows_done is None else rows_done[rows]
    try:  # views: updated in place
        return run._step(log_v[rows], log_v_prev[rows], live[rows], done, alone, own)
    except Exception as error:
        return error


def pool_together(
    runs: list[PoolRun], log_v: FloatArray, live: npt.NDArray[np.bool_], done: list[bool]
) -> list[Union[Ancestors, Exception]]:
    """``PoolRun.reweigh`` of several runs with the same pool size ``K`` in one ``pool_select`` call.

    ``log_v`` and ``live`` hold the runs' ``(B_k, K)`` rows one after the other; ``done[k]``: run ``k``'s
    trajectories have all finished. A run with a live pool draws one key from its generator, its live
    prompts numbered from 0, as its own call would (a run with none draws nothing); where the call is
    refused (a potential of ``+inf``), each run draws alone with the key it drew.
    """
    bounds = np.cumsum([0, *(len(run.log_z) for run in runs)]).tolist()
    weighed = [run.pool_weights(log_v[a:b], live[a:b]) for run, a, b in zip(runs, bounds[:-1], bounds[1:])]
    drawing = [k for k, (_, alive) in enumerate(weighed) if alive.any()]
    drawn: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.floating[Any]]]] = {}
    failed: dict[int, Exception] = {}
    if drawing:
        pools = [weighed[k][0][weighed[k][1]] for k in drawing]
        starts = np.cumsum([0, *(len(pool) for pool in pools)]).tolist()
        streams = RowStreams([runs[k].generator for k in drawing], starts)
        streams.keys = streams.run_keys()  # drawn once: a repeat run by run draws the same
        try:
            index, log_mean = core.pool_select(np.concatenate(pools), rng=streams)
            drawn = {k: (index[a:b], log_mean[a:b]) for k, a, b in zip(drawing, starts[:-1], starts[1:])}
        except ValueError:
            for g, (k, pool) in enumerate(zip(drawing, pools)):
                alone = RowStreams([runs[k].generator], [0, len(pool)], [streams.keys[g]])
                try:
                    drawn[k] = core.pool_select(pool, rng=alone)
                except ValueError as error:  # this run's own values
                    failed[k] = error
    outcomes: list[Union[Ancestors, Exception]] = []
    for k, (run, (potentials, alive)) in enumerate(zip(runs, weighed)):
        if k in failed:
            outcomes.append(failed[k])
            continue
        rows = slice(bounds[k], bounds[k + 1])
        try:
            outcomes.append(run.pool_step(log_v[rows], potentials, alive, drawn.get(k), done[k]))
        except Exception as error:
            outcomes.append(error)
    return outcomes


class ExactSPRun(SMCRun):
    """SP-gSMC in its exact form: one trajectory per prompt, each token drawn from ``p Vh_t / sum p Vh_t``
    (the optimal proposal with one particle)."""

    sampler = "sp_gsmc"

    def __init__(self, prompts: Optional[list[Any]], generator: np.random.Generator, max_steps: int) -> None:
        super().__init__(prompts, 1, "systematic", 0.0, "optimal", generator, max_steps)

    def end(self, particles: Particles) -> None:
        super().end(particles)
        if self.report:
            self.result = _single_trajectory_result(self, particles, self.log_z, self.collapsed)


class PoolRun(Run):
    """SP-gSMC with a resampling pool: ``K`` candidates from ``p``, one kept with probability ``∝ G``,
    ``Zh`` multiplied by ``mean_k G_t^(k)`` (see [`tiltsmc.sp_gsmc`][tiltsmc.sp_gsmc])."""

    sampler = "sp_gsmc"

    def __init__(
        self, prompts: Optional[list[Any]], pool_size: int, generator: np.random.Generator, max_steps: int
    ) -> None:
        super().__init__(prompts, generator, max_steps)
        self.pool_size = pool_size
        self.started = False
        self.trace = Trace()

    @property
    def rows_per_prompt(self) -> int:
        return self.pool_size

    def wants(self) -> Optional[tuple[Optional[list[Any]], int]]:
        return None if self.started else (self.prompts, self.pool_size)

    def begin(self, log_v0: FloatArray, failed: npt.NDArray[np.bool_], errors: dict[int, str]) -> FloatArray:
        self.started = True
        self.errors = dict(errors)
        self.log_v_prev = log_v0.copy()
        self.log_z = log_v0.copy()
        self.collapsed = (log_v0 == -np.inf) | failed
        return np.repeat(log_v0[:, None], self.pool_size, axis=1)

    def reweigh(self, particles: Particles, log_v: FloatArray) -> Ancestors:
        potentials, alive = self.pool_weights(log_v, self.live)
        drawn = core.pool_select(potentials[alive], rng=self.generator) if alive.any() else None
        return self.pool_step(log_v, potentials, alive, drawn, all_finished(particles))

    def pool_reweighing(self) -> Optional[PoolRun]:
        return self

    def fail_prompt(self, prompt: int, message: str) -> None:
        self.errors.setdefault(prompt, message)
        self.collapsed[prompt] = True  # no pool of it is drawn from again
        self.log_z[prompt] = -np.inf
        self._stop_live(prompt)

    def pool_weights(
        self, log_v: FloatArray, live: npt.NDArray[np.bool_]
    ) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """Each pool's potentials ``G = Vh_t / Vh_{t-1}`` (1 where not extended), and the prompts whose pool
        has a candidate of weight > 0 (the others collapse)."""
        potentials = np.where(live, safe_increment(log_v, self.log_v_prev[:, None]), 0.0)
        return potentials, ~self.collapsed & np.any(potentials > -np.inf, axis=1)

    def pool_step(
        self,
        log_v: FloatArray,
        potentials: FloatArray,
        alive: npt.NDArray[np.bool_],
        drawn: Optional[tuple[npt.NDArray[np.int64], npt.NDArray[np.floating[Any]]]],
        done: bool,
    ) -> Ancestors:
        """The step given ``pool_select``'s draw on the live prompts' pools (``drawn``, None where none is
        live): ``Zh`` times the pool's mean potential, the chosen candidate's offspring fill the pool."""
        batch = len(self.log_z)
        chosen = np.zeros(batch, dtype=np.int64)
        log_mean = np.full(batch, -np.inf)
        if drawn is not None:
            chosen[alive], log_mean[alive] = drawn
        self.collapsed |= ~alive
        self.log_z = self.log_z + log_mean
        _, ess = core.row_statistics(potentials)  # ESS of the pool (no normalised copy needed)
        self.log_v_prev = log_v[np.arange(batch), chosen]
        increment_se = increment_standard_error(
            np.zeros_like(potentials), np.full(batch, math.log(self.pool_size)), potentials, log_mean
        )
        ones = np.ones(batch, dtype=np.int64)
        self.trace.record((np.asarray(ess, dtype=np.float64), ones, ones, log_mean, increment_se), 0, batch)
        self.count_step(done)
        return np.repeat(chosen[:, None], self.pool_size, axis=1)

    def end(self, particles: Particles) -> None:
        self.log_z = np.where(self.collapsed, -np.inf, self.log_z)
        if self.report:
            self.result = _single_trajectory_result(self, particles, self.log_z, self.collapsed)


def one_sample_log_weights(collapsed: npt.NDArray[np.bool_]) -> list[FloatArray]:
    """The log-weights of a sampler that returns one sample per prompt (``sp_gsmc``, ``mh``, ``best_of_n``):
    0 (weight 1), or ``-inf`` where the prompt collapsed or failed (no sample of positive weight, as ``smc``
    reports it)."""
    return [np.full(1, -np.inf if gone else 0.0) for gone in np.asarray(collapsed, dtype=bool).tolist()]


def _single_trajectory_result(
    run: Union[SMCRun, PoolRun], particles: Particles, log_z: FloatArray, collapsed: npt.NDArray[np.bool_]
) -> SamplerResult:
    batch = particles.num_prompts
    samples = samples_of(particles, np.zeros((batch, 1), dtype=np.int64))
    return SamplerResult(
        sampler="sp_gsmc",
        samples=samples,
        texts=run.texts_of(samples),
        errors=run.errors,
        log_weights=one_sample_log_weights(collapsed),
        log_z=log_z,
        collapsed=collapsed,
        compute=run.compute,
        **run.trace.stacked(batch),
    )


class BestOfNRun(Run):
    """``n`` trajectories per prompt drawn from ``p`` to the end; the highest-reward one is returned
    (see [`tiltsmc.best_of_n`][tiltsmc.best_of_n])."""

    kind = "rollout"
    sampler = "best_of_n"

    def __init__(
        self, prompts: Optional[list[Any]], n: int, generator: np.random.Generator, max_steps: int
    ) -> None:
        super().__init__(prompts, generator, max_steps)
        self.n = n
        self.started = False

    @property
    def rows_per_prompt(self) -> int:
        return self.n

    def wants(self) -> Optional[tuple[Optional[list[Any]], int]]:
        return None if self.started else (self.prompts, self.n)

    def begin(self, log_v0: FloatArray, failed: npt.NDArray[np.bool_], errors: dict[int, str]) -> FloatArray:
        self.started = True
        self.errors = dict(errors)
        self.failed = failed.copy()
        return np.zeros((len(failed), self.n))

    def fail_prompt(self, prompt: int, message: str) -> None:
        self.errors.setdefault(prompt, message)
        self.failed[prompt] = True  # its draws read as reward zero

    def end_rollout(self, particles: Particles, log_r: FloatArray) -> None:
        log_r[self.failed] = -np.inf  # prompts that failed (at their start, or since) draw nothing
        best = np.argmax(log_r, axis=1)
        collapsed = np.all(log_r == -np.inf, axis=1)  # failed prompts too
        batch = particles.num_prompts
        samples = [
            particles.tokens[b, best[b], : particles.lengths[b, best[b]]][None, :].copy()
            for b in range(batch)
        ]
        self.result = SamplerResult(
            sampler="best_of_n",
            samples=samples,
            texts=self.texts_of(samples),
            errors=self.errors,
            log_weights=one_sample_log_weights(collapsed),
            log_z=logsumexp(log_r) - np.log(self.n),
            collapsed=collapsed,
            compute=self.compute,
            log_rewards=np.array(log_r, dtype=np.float64),
            **_empty_trace(batch),
        )


def _stack(trajectories: list[np.ndarray]) -> Any:
    if trajectories and all(len(t) == len(trajectories[0]) for t in trajectories):
        return np.stack(trajectories)
    return trajectories


class RejectionRun(Run):
    """Exact samples of ``pi``: rounds of draws ``x ~ p`` (``batch_size`` per waiting prompt), each accepted
    with probability ``r(x) / bound`` (see [`tiltsmc.rejection`][tiltsmc.rejection])."""

    kind = "rollout"
    sampler = "rejection"

    def __init__(
        self,
        prompts: Optional[list[Any]],
        bound: float,
        num_samples: int,
        max_tries: int,
        batch_size: int,
        generator: np.random.Generator,
        max_steps: int,
    ) -> None:
        super().__init__(prompts, generator, max_steps)
        # None (one prompt-less prompt) goes to the policy as None, as the other samplers pass it
        self.prompt_list: list[Any] = [None] if prompts is None else list(prompts)
        self.bound = bound
        self.log_bound = math.log(bound)
        self.num_samples = num_samples
        self.max_tries = max_tries
        self.batch_size = batch_size
        batch = len(self.prompt_list)
        self.accepted: list[list[np.ndarray]] = [[] for _ in range(batch)]
        self.tries = np.zeros(batch, dtype=np.int64)
        self.log_r_sums = np.full(batch, -np.inf)
        # the sums before each prompt's latest round, for log_z (_finish)
        self.log_r_sums_before = np.full(batch, -np.inf)
        self.tries_before = np.zeros(batch, dtype=np.int64)
        self.hits = np.zeros(batch, dtype=np.int64)  # accepted draws, counting those past num_samples
        self.errors: dict[int, str] = {}
        self.waiting: list[int] = []

    @property
    def rows_per_prompt(self) -> int:
        return min(self.batch_size, self.max_tries)

    def wants(self) -> Optional[tuple[Optional[list[Any]], int]]:
        self.waiting = [
            b
            for b in range(len(self.prompt_list))
            if len(self.accepted[b]) < self.num_samples
            and self.tries[b] < self.max_tries
            and b not in self.errors
        ]
        if not self.waiting:
            self._finish()
            return None
        self.count = int(min(self.batch_size, self.max_tries - self.tries[self.waiting].max()))
        self.steps = 0
        if self.prompts is None:  # the one prompt is waiting
            return None, self.count
        return [self.prompt_list[b] for b in self.waiting], self.count

    def begin(self, log_v0: FloatArray, failed: npt.NDArray[np.bool_], errors: dict[int, str]) -> FloatArray:
        self.errors.update({self.waiting[row]: message for row, message in errors.items()})
        self.failed = failed.copy()  # grows as prompts fail during the round (fail_prompt)
        # prompts that failed before the round started: it draws nothing for them (no try counted)
        self.not_started = failed.copy()
        return np.zeros((len(failed), self.count))

    def prompt_index(self, prompt: int) -> int:
        return self.waiting[prompt]

    def fail_prompt(self, prompt: int, message: str) -> None:
        self.errors.setdefault(self.waiting[prompt], message)  # never drawn for again (wants)
        self.failed[prompt] = True  # this round's draws read as reward zero: none accepted

    def end_rollout(self, particles: Particles, log_r: FloatArray) -> None:
        log_r[self.failed] = -np.inf  # prompts that failed (at their start, or since) draw nothing
        over = log_r > self.log_bound + 1e-12
        if over.any():
            log_ratio = float(log_r[over].max() - self.log_bound)
            # a ratio beyond the doubles (a bound near the smallest ones) in log space: exp would overflow
            worst = f"{math.exp(log_ratio):.6g}" if log_ratio < _LOG_DOUBLE_MAX else f"exp({log_ratio:.6g})"
            raise ValueError(
                f"bound: observed a reward {worst} x the bound C = {self.bound:g}; rejection sampling "
                "needs C >= sup r"
            )
        keep = np.log1p(-self.generator.random(log_r.shape)) < log_r - self.log_bound
        for row, b in enumerate(self.waiting):
            if self.not_started[row]:  # never drawn from: its tries stay 0, its acceptance rate NaN
                continue
            self.tries_before[b], self.log_r_sums_before[b] = self.tries[b], self.log_r_sums[b]
            self.tries[b] += self.count
            self.log_r_sums[b] = np.logaddexp(self.log_r_sums[b], logsumexp(log_r[row]))
            self.hits[b] += int(np.count_nonzero(keep[row]))
            for i in np.flatnonzero(keep[row])[: self.num_samples - len(self.accepted[b])]:
                self.accepted[b].append(particles.tokens[row, i, : particles.lengths[row, i]].copy())

    def _log_z(self) -> FloatArray:
        """``log Z^`` of each prompt: the log of the mean reward over the draws of every round but its
        last, or of its one round. Unbiased for ``Z`` before the log, although the rounds stop on what they
        draw: the mean over the first round, a fixed number of draws, is unbiased, and given the number
        of rounds ``k >= 2`` and what they drew, the first is equally likely any of the first ``k - 1``,
        all full and exchangeable, since the stop after round ``k`` asks only that those together fell short
        of ``num_samples`` (the mean over all rounds, which the last one's acceptances end, is biased up:
        5x for one draw a round where ``Z = 1/200``)."""
        several = self.tries_before > 0
        log_sums = np.where(several, self.log_r_sums_before, self.log_r_sums)
        draws = np.where(several, self.tries_before, self.tries)
        log_z: FloatArray = log_sums - np.log(np.maximum(draws, 1))
        return log_z

    def _finish(self) -> None:
        accepted = self.accepted
        samples = [_stack(found) for found in accepted]
        # a prompt that failed in a later round keeps the draws it had accepted, each of weight zero
        failed = np.zeros(len(accepted), dtype=bool)
        failed[list(self.errors)] = True
        self.result = SamplerResult(
            sampler="rejection",
            samples=samples,
            texts=self.texts_of(samples),
            errors=self.errors,
            log_weights=[
                np.full(len(found), -np.inf if gone else -np.log(len(found))) if found else np.zeros(0)
                for found, gone in zip(accepted, failed.tolist())
            ],
            log_z=np.where(failed, -np.inf, self._log_z()),
            collapsed=np.array([not found for found in accepted]) | failed,
            compute=self.compute,
            tries=self.tries,
            acceptance_rate=np.where(self.tries > 0, self.hits / np.maximum(self.tries, 1), np.nan),
            **_empty_trace(len(accepted)),
        )


class MHRun(Run):
    """The resampling-pool MH / PIMH correction (see [`tiltsmc.mh`][tiltsmc.mh]): ``steps + 1`` independent
    runs (SP-gSMC with a pool, its exact form, or ``N``-particle SMC), each after the first accepted with
    probability ``min(1, Zh' / Zh)``; each proposal is a new batch of the same lane."""

    sampler = "mh"

    def __init__(
        self,
        prompts: Optional[list[Any]],
        pool_size: Optional[int],
        steps: int,
        num_particles: int,
        resample: str,
        ess_threshold: float,
        generator: np.random.Generator,
        max_steps: int,
    ) -> None:
        super().__init__(prompts, generator, max_steps)
        self.pool_size = pool_size
        self.mh_steps = steps
        self.num_particles = num_particles
        self.resample = resample
        self.ess_threshold = ess_threshold
        self.errors: dict[int, str] = {}
        self.state: Optional[list[np.ndarray]] = None
        self.estimates: list[FloatArray] = []
        self.increments: list[tuple[FloatArray, FloatArray]] = []  # each proposal's (increments, their se)
        self.accepted = np.zeros(len(prompts) if prompts is not None else 1)
        self.accepts: list[npt.NDArray[np.bool_]] = []  # each move's decision, per prompt
        self.current = self._proposal()

    def _proposal(self) -> Union[SMCRun, PoolRun]:
        proposal: Union[SMCRun, PoolRun]
        if self.num_particles > 1:
            proposal = SMCRun(
                self.prompts, self.num_particles, self.resample, self.ess_threshold, "naive", self.generator,
                self.max_steps,
            )  # fmt: skip
        elif self.pool_size is None:
            proposal = ExactSPRun(self.prompts, self.generator, self.max_steps)
        else:
            proposal = PoolRun(self.prompts, self.pool_size, self.generator, self.max_steps)
        proposal.report = False
        return proposal

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.current.kind

    @property
    def rows_per_prompt(self) -> int:
        return self.current.rows_per_prompt

    def wants(self) -> Optional[tuple[Optional[list[Any]], int]]:
        return None if self.result is not None else self.current.wants()

    def begin(self, log_v0: FloatArray, failed: npt.NDArray[np.bool_], errors: dict[int, str]) -> FloatArray:
        self.current.policy = self.policy
        for prompt, message in errors.items():
            self.errors.setdefault(prompt, message)
        return self.current.begin(log_v0, failed, errors)

    def has_failed(self, prompt: int) -> bool:
        return self.current.has_failed(prompt)  # in the current proposal (a new batch for each)

    def fail_prompt(self, prompt: int, message: str) -> None:
        """The prompt fails in the current proposal and for good: every proposal's ``Zh`` of it reads 0
        (one that failed in a later proposal drops the state an earlier one gave it)."""
        self.errors.setdefault(prompt, message)
        self.current.fail_prompt(prompt, message)

    def before_step(self, particles: Particles) -> None:
        self.current.before_step(particles)

    def reweigh(self, particles: Particles, log_v: FloatArray) -> Ancestors:
        return self.current.reweigh(particles, log_v)

    def smc_reweighing(self) -> Optional[SMCRun]:
        return self.current.smc_reweighing()

    def pool_reweighing(self) -> Optional[PoolRun]:
        return self.current.pool_reweighing()

    def choose(
        self, particles: Particles, log_p: FloatArray, next_log_values: FloatArray
    ) -> npt.NDArray[np.int64]:
        return self.current.choose(particles, log_p, next_log_values)

    def after_append(self, particles: Particles) -> Ancestors:
        return self.current.after_append(particles)

    def end(self, particles: Particles) -> None:
        proposal = self.current
        proposal.end(particles)
        batch = particles.num_prompts
        pick = np.zeros(batch, dtype=np.int64)
        if isinstance(proposal, SMCRun) and not isinstance(proposal, ExactSPRun):
            if (~proposal.collapsed).any():
                pick[~proposal.collapsed], _ = core.pool_select(
                    proposal.log_w[~proposal.collapsed], rng=self.generator
                )
        trajectories = [
            particles.tokens[b, pick[b], : particles.lengths[b, pick[b]]].copy() for b in range(batch)
        ]
        for prompt, message in proposal.errors.items():
            self.errors.setdefault(prompt, message)
        failed = np.zeros(batch, dtype=bool)
        failed[list(self.errors)] = True
        log_z = np.where(failed, -np.inf, proposal.log_z)
        self.estimates.append(log_z)
        trace = proposal.trace.stacked(batch)
        self.increments.append((trace["log_z_increments"], trace["log_z_increment_se"]))
        if self.state is None:
            self.state, self.log_z_state = trajectories, log_z
        else:
            both_zero = (self.log_z_state == -np.inf) & (log_z == -np.inf)
            accept = core.mh_accept(self.log_z_state, log_z, rng=self.generator) & ~both_zero
            for b in np.flatnonzero(accept):
                self.state[b] = trajectories[b]
            self.log_z_state = np.where(accept, log_z, self.log_z_state)
            self.accepted += accept
            self.accepts.append(np.asarray(accept, dtype=bool))
        if len(self.estimates) <= self.mh_steps:
            self.current = self._proposal()
            return
        # a prompt that failed in a later proposal reads Zh = 0 in the earlier ones too
        all_estimates = np.where(failed[:, None], -np.inf, np.stack(self.estimates, axis=1))
        samples = [trajectory[None, :] for trajectory in self.state]
        steps = self.mh_steps
        increments, increment_se = _mean_increments(self.increments, batch)
        # no proposal of positive weight, or a prompt that failed (in any proposal)
        collapsed = (self.log_z_state == -np.inf) | failed
        self.result = SamplerResult(
            sampler="mh",
            samples=samples,
            texts=self.texts_of(samples),
            errors=self.errors,
            log_weights=one_sample_log_weights(collapsed),
            log_z=logsumexp(all_estimates) - np.log(all_estimates.shape[1]),
            ess=np.ones((batch, 0)),
            resampled=np.zeros((batch, 0), dtype=bool),
            unique_ancestors=np.zeros((batch, 0), dtype=np.int64),
            log_z_increments=increments,
            log_z_increment_se=increment_se,
            collapsed=collapsed,
            compute=self.compute,
            acceptance_rate=self.accepted / steps if steps else np.full(batch, np.nan),
            mh_accepted=np.stack(self.accepts, axis=1) if self.accepts else np.zeros((batch, 0), dtype=bool),
            proposal_log_z=all_estimates,
        )


def _mean_increments(
    increments: list[tuple[FloatArray, FloatArray]], batch: int
) -> tuple[FloatArray, FloatArray]:
    """The MH result's per-step log Z increments: at each step the mean over the proposals whose increment
    is finite there (a proposal that finished earlier reads 0, as a finished particle's potential is 1),
    with the root mean square of their standard errors (``sqrt(sum se^2 / count)``, one proposal's, not
    the mean's ``sqrt(sum se^2) / count``: each increment, a log of a mean, is biased low by about
    ``se^2 / 2``, which the mean keeps however many proposals it averages, so a margin shrinking with
    them read an exact twist as in error); ``-inf`` and ``inf`` where every proposal collapsed."""
    steps = max((values.shape[1] for values, _ in increments), default=0)
    values = np.zeros((len(increments), batch, steps))
    errors = np.zeros((len(increments), batch, steps))
    for h, (value, error) in enumerate(increments):
        values[h, :, : value.shape[1]] = value
        errors[h, :, : error.shape[1]] = error
    finite = values > -np.inf
    count = finite.sum(axis=0)
    some = count > 0
    mean = np.full((batch, steps), -np.inf)
    se = np.full((batch, steps), np.inf)
    mean[some] = np.where(finite, values, 0.0).sum(axis=0)[some] / count[some]
    variance = np.where(finite, np.square(errors), 0.0).sum(axis=0)
    se[some] = np.sqrt(variance[some] / count[some])
    return mean, se
