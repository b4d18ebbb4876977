"""What every sampler returns: samples, normalised log-weights, the log Z estimate and diagnostics."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from .. import _memory

__all__ = [
    "Compute",
    "SamplerResult",
    "failed_result",
    "finite_or_none",
    "plain",
    "prompt_error",
    "prompt_error_parts",
    "prompt_reason",
]


@dataclass
class Compute:
    """Compute spent, on one basis for every sampler (so samplers compare at equal budgets)."""

    policy_calls: int = 0
    policy_steps: int = 0  # particle-steps proposed (one step of one particle counts once)
    policy_tokens: int = 0  # tokens those steps appended (more than the steps where a step spans tokens)
    reward_calls: int = 0
    reward_evaluations: int = 0  # prefixes scored
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def bookkeeping_seconds(self) -> float:
        """Weights, resampling, reordering and Python glue: everything but the models."""
        return max(self.total_seconds - self.policy_seconds - self.reward_seconds, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy_calls": self.policy_calls,
            "policy_steps": self.policy_steps,
            "policy_tokens": self.policy_tokens,
            "reward_calls": self.reward_calls,
            "reward_evaluations": self.reward_evaluations,
            "policy_seconds": self.policy_seconds,
            "reward_seconds": self.reward_seconds,
            "bookkeeping_seconds": self.bookkeeping_seconds,
            "total_seconds": self.total_seconds,
        }


class Timer:
    """Accumulates wall time into a Compute field: ``with timer("policy"): ...``."""

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        self._start = time.perf_counter()

    def finish(self) -> None:
        self.compute.total_seconds += time.perf_counter() - self._start


@dataclass
class SamplerResult:
    """Per prompt ``b``: ``samples[b]`` (``(N, T)`` for fixed-horizon tasks, else a list of sequences),
    ``log_weights[b]`` (``(N,)``, ``logsumexp = 0``), ``log_z[b]`` (estimate of ``log Z``), and diagnostics.

    Per step (arrays ``(B, steps)``): ``ess``, ``resampled``, ``unique_ancestors``, ``log_z_increments``
    (``log sum_i W_{t-1,i} G_{t,i}``; for ``mh`` the mean over its proposals) and ``log_z_increment_se``
    (their Monte Carlo standard errors, 0 where the increment is exact given the prefixes, ``inf`` where it
    is ``-inf``; for ``mh`` the root mean square of its proposals'): an online reading of the reward
    model's Bellman error, see
    [`tiltsmc.diagnostics.online_bellman`][tiltsmc.diagnostics.online_bellman]. Samplers that take no guided
    steps (best-of-N, rejection) have no steps.
    ``collapsed[b]`` is True where every weight of prompt ``b`` became zero (then ``log_z[b] = -inf``), and
    for a prompt that failed (``errors[b]``: the policy could not start it, or a model's output for it was
    unusable during the run): every sampler then gives each of its samples (if any) the log-weight ``-inf``
    (``null`` in ``to_dict``), and ``weights``, ``posterior``, ``best`` and ``weight_histogram`` read such a
    prompt as one with no sample of positive weight whatever its ``log_weights`` hold.
    ``ancestry`` (``(B, steps, N)``, when recorded) holds each step's ancestor indices.

    The samplers without guided steps have diagnostics of their own instead (their per-step arrays are
    ``(B, 0)``, but for ``mh``'s ``log_z_increments`` and ``log_z_increment_se``, ``(B, T)``: the mean over
    its proposals' runs, read by ``online_bellman`` as any SMC run's):

    * ``mh``: ``acceptance_rate[b]`` (accepted moves / ``steps``; NaN when ``steps = 0``),
      ``mh_accepted`` (``(B, steps)``: whether move ``h`` was accepted) and ``proposal_log_z``
      (``(B, steps + 1)``: each proposal's ``log Zh``, whose ratios set the acceptance probabilities
      ``min(1, Zh' / Zh)``);
    * ``rejection``: ``tries[b]`` (draws from ``p``) and ``acceptance_rate[b]`` (draws that passed the test,
      those past ``num_samples`` included, / ``tries``: the fraction accepted, biased up as an estimate of
      ``Z / C`` where several batches ran, since the last batch's acceptances stop the draws; ``log_z`` is
      the unbiased estimate; NaN with no draw);
    * ``best_of_n``: ``log_rewards`` (``(B, n)``: ``log r`` of every draw; the returned sample is the
      argmax, and the spread of the rewards says how much the choice mattered).

    ``best``, ``best_texts`` and ``posterior`` read the weighted sample;
    ``summary`` (the repr) is a few lines whatever the size.
    """

    sampler: str
    samples: list[Any]
    log_weights: list[npt.NDArray[np.float64]]
    log_z: npt.NDArray[np.float64]
    ess: npt.NDArray[np.float64]
    resampled: npt.NDArray[np.bool_]
    unique_ancestors: npt.NDArray[np.int64]
    log_z_increments: npt.NDArray[np.float64]
    collapsed: npt.NDArray[np.bool_]
    compute: Compute = field(default_factory=Compute)
    acceptance_rate: Optional[npt.NDArray[np.float64]] = None
    tries: Optional[npt.NDArray[np.int64]] = None
    ancestry: Optional[npt.NDArray[np.int64]] = None
    texts: Optional[list[list[str]]] = None
    errors: dict[int, str] = field(default_factory=dict)
    log_z_increment_se: Optional[npt.NDArray[np.float64]] = None
    mh_accepted: Optional[npt.NDArray[np.bool_]] = None
    proposal_log_z: Optional[npt.NDArray[np.float64]] = None
    log_rewards: Optional[npt.NDArray[np.float64]] = None

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    def _prompt_index(self, prompt: Any) -> int:
        """``prompt`` as the index of a prompt in ``[0, B)``: an int (not a bool) in ``[-B, B)``, negative
        counting from the end as for a list (normalised here, so that ``errors``, keyed by ``[0, B)``, is
        read for it); TypeError or ValueError, naming ``prompt``, otherwise."""
        from ._engine import check_count  # _engine imports this module

        count = self.num_prompts
        index = check_count(prompt, "prompt", minimum=-count)
        if index >= count:
            raise ValueError(f"prompt: must be < {count} (the result holds {count} prompt(s)), got {index}")
        return index + count if index < 0 else index

    def _has_no_weight(self, prompt: int) -> bool:
        """Whether prompt ``prompt`` (an index, checked) is collapsed or failed: no sample of positive
        weight, whatever its ``log_weights`` hold."""
        return bool(self.collapsed[prompt]) or prompt in self.errors

    def _log_weights_of(self, prompt: int) -> npt.NDArray[np.float64]:
        """Prompt ``prompt``'s (an index, checked) log-weights as every reader reads them: all ``-inf`` where
        it is collapsed or failed (``_has_no_weight``)."""
        log_weights = np.asarray(self.log_weights[prompt], dtype=np.float64)
        if self._has_no_weight(prompt) and np.any(log_weights > -np.inf):
            return np.full(log_weights.shape, -np.inf)
        return log_weights

    def weights(self, prompt: int) -> npt.NDArray[np.float64]:
        """Normalised weights of one prompt's samples (``prompt``: an int index in ``[-B, B)``, checked);
        all zero where the prompt is collapsed or failed."""
        return np.exp(self._log_weights_of(self._prompt_index(prompt)))

    def best(self, prompt: int) -> Optional[int]:
        """Index of prompt ``prompt``'s highest-weight sample (the first on ties), or None where it has no
        sample of positive weight (collapsed, failed, or rejection with no acceptance). ``prompt``: an int
        index in ``[-B, B)`` (negative from the end), checked: TypeError or ValueError otherwise."""
        prompt = self._prompt_index(prompt)
        log_weights = self._log_weights_of(prompt)
        if log_weights.size == 0 or not np.any(log_weights > -np.inf):
            return None
        return int(np.argmax(log_weights))

    def best_texts(self) -> list[Optional[str]]:
        """Per prompt, the text of its highest-weight sample (``best``), None where there is none
        (or no tokenizer decoded the samples)."""
        out: list[Optional[str]] = []
        for b in range(self.num_prompts):
            index = self.best(b)
            out.append(None if index is None or self.texts is None else self.texts[b][index])
        return out

    def posterior(self, prompt: int) -> dict[Any, float]:
        r"""The weighted posterior over prompt ``prompt``'s distinct outputs, duplicates merged:
        ``P(y) = sum_i W_i [x_i = y]`` with ``W_i`` the normalised weights, sorted by decreasing
        probability (first occurrence on ties).

        Keys are the decoded texts where there are texts, else the token sequences as tuples (two token
        sequences decoding to one text merge into it). Empty where every weight is zero, the prompt
        collapsed or failed (whichever sampler: as ``best`` is None). For a sampler of ``pi`` (``smc``,
        ``rejection``) this is the particle approximation of ``pi``'s marginal over outputs; ``mh``,
        ``sp_gsmc`` and ``best_of_n`` give one sample, of probability 1 (none where the prompt collapsed or
        failed). ``prompt``: an int index in ``[-B, B)`` (negative from the end), checked: TypeError or
        ValueError otherwise.
        """
        prompt = self._prompt_index(prompt)
        log_weights = self._log_weights_of(prompt)
        if log_weights.size == 0 or not np.any(log_weights > -np.inf):
            return {}
        weights = np.exp(log_weights - np.max(log_weights))
        weights /= weights.sum()  # log_weights are normalised already; this only removes rounding
        if self.texts is not None:
            keys: list[Any] = list(self.texts[prompt])
        else:
            keys = [tuple(int(t) for t in sample) for sample in self.samples[prompt]]
        merged: dict[Any, float] = {}
        for key, weight in zip(keys, weights):
            if weight > 0.0:
                merged[key] = merged.get(key, 0.0) + float(weight)
        return dict(sorted(merged.items(), key=lambda item: -item[1]))

    def summary(self) -> str:
        """A few lines whatever the size: the sampler, the batch, log Z, the compute and, for the first
        prompts, the best sample and its weight."""
        finite = self.log_z[np.isfinite(self.log_z)]
        counts = sorted({len(w) for w in self.log_weights})
        lines = [
            f"SamplerResult({self.sampler}: {self.num_prompts} prompt(s) x "
            f"{'/'.join(str(c) for c in counts) or 0} sample(s), {self.log_z_increments.shape[1]} step(s), "
            f"{int(np.count_nonzero(self.collapsed))} collapsed, {len(self.errors)} failed)",
            "  log_z: " + (f"mean {finite.mean():.4g}, range [{finite.min():.4g}, {finite.max():.4g}]"
                           if finite.size else "no finite estimate"),
            f"  compute: {self.compute.policy_steps} policy steps, {self.compute.reward_evaluations} "
            f"reward evaluations, {self.compute.total_seconds:.3g}s",
        ]  # fmt: skip
        extra = []
        if self.acceptance_rate is not None:
            extra.append(f"acceptance rate {_mean_text(self.acceptance_rate)}")
        if self.tries is not None:
            extra.append(f"tries {int(np.sum(self.tries))}")
        if self.log_rewards is not None and self.log_rewards.size:
            extra.append(f"log r of the draws {_spread_text(self.log_rewards)}")
        if self.ess.size:
            extra.append(f"final ESS {_mean_text(self.ess[:, -1])}")
        if extra:
            lines.append("  " + "; ".join(extra))
        shown = min(self.num_prompts, 3)
        for b in range(shown):
            index = self.best(b)
            if index is None:
                lines.append(f"  [{b}] no sample" + (f" ({self.errors[b]})" if b in self.errors else ""))
                continue
            weight = float(np.exp(self.log_weights[b][index]))
            if self.texts is not None:
                what = repr(_shorten(self.texts[b][index]))
            else:
                what = f"{len(self.samples[b][index])} tokens"
            lines.append(f"  [{b}] best: {what} (weight {weight:.3g})")
        if self.num_prompts > shown:
            lines.append(f"  ... {self.num_prompts - shown} more prompt(s)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def weight_histogram(
        self, prompt: int, bins: int = 20
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Histogram of one prompt's normalised weights (``weights``: all zero where it collapsed or failed)
        on ``[0, 1]``, as ``numpy.histogram`` returns it (counts, edges). ``prompt``: an int index in
        ``[-B, B)``; ``bins``: the number of equal bins, an int >= 1 (not a bool), whose histogram fits in the
        memory available (``numpy.histogram`` takes about 32 bytes a bin); both checked: TypeError or
        ValueError, naming the argument, otherwise."""
        from ._engine import check_count  # _engine imports this module

        index = self._prompt_index(prompt)
        bins = check_count(bins, "bins")
        need, available = 32 * (bins + 1), _memory.available_memory()  # measured: 32 bytes a bin, at the peak
        if available is not None and need > available:
            raise ValueError(
                f"bins: {bins} bins need about {need:.2g} bytes of memory, more than the {available:.2g} "
                "available"
            )
        counts, edges = np.histogram(np.exp(self._log_weights_of(index)), bins=bins, range=(0.0, 1.0))
        return counts.astype(np.int64), edges

    def collapse_warnings(self) -> list[str]:
        return [
            f"prompt {b}: every particle weight became zero (particle collapse); log_z = -inf"
            for b in np.flatnonzero(self.collapsed)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps`` (strict JSON: a number that is not finite is
        None, see ``finite_or_none`` for what it stands for in each field)."""

        record: dict[str, Any] = {
            "sampler": self.sampler,
            "samples": plain(self.samples),
            "log_weights": plain(self.log_weights),
            "log_z": plain(self.log_z),
            "ess": plain(self.ess),
            "resampled": plain(self.resampled),
            "unique_ancestors": plain(self.unique_ancestors),
            "log_z_increments": plain(self.log_z_increments),
            "collapsed": plain(self.collapsed),
            "compute": self.compute.to_dict(),
        }
        for name in (
            "log_z_increment_se",
            "acceptance_rate",
            "tries",
            "mh_accepted",
            "proposal_log_z",
            "log_rewards",
            "ancestry",
            "texts",
        ):
            value = getattr(self, name)
            if value is not None:
                record[name] = plain(value)
        if self.errors:
            record["errors"] = {str(b): message for b, message in self.errors.items()}
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


# "prompt k: reason" (a prompt that failed; errors[k]), "prompts: ..." (the prompts argument)
_PROMPT_ERROR = re.compile(r"(prompts?)(?: (\d+))?:")


def prompt_error_parts(message: str) -> Optional[tuple[Optional[int], str]]:
    """A message of the samplers that concerns a prompt, ``prompt k: reason`` (as ``errors[k]`` holds them)
    or ``prompt: ...`` / ``prompts: ...`` (the argument): ``(k, reason)``, ``k`` None where it names no
    prompt; None for any other message. The one reading of that prefix (the CLI renumbers it, the server
    names the request's field from it)."""
    match = _PROMPT_ERROR.match(message)
    if match is None:
        return None
    index = match.group(2)
    return (None if index is None else int(index)), message[match.end() :].lstrip()


def prompt_error(index: int, message: str) -> str:
    """``message`` as prompt ``index``'s error, ``prompt {index}: reason``: a ``prompt k:`` prefix it has
    (another batch's numbering of the prompt) replaced, a ``prompts:`` one kept as part of the reason."""
    return f"prompt {index}: {prompt_reason(message)}"


def prompt_reason(message: str) -> str:
    """``message`` without its ``prompt k:`` prefix, where it has one."""
    parts = prompt_error_parts(message)
    return parts[1] if parts is not None and parts[0] is not None else message


def failed_result(sampler: str, errors: dict[int, str], compute: Optional[Compute] = None) -> SamplerResult:
    """The result of a run that failed as a whole (the exception that ended it, as ``errors[b]`` for each of
    its prompts ``b``): no sample, ``log_z = -inf``, every prompt collapsed and no step, so that its prompts
    read as prompts that failed alone do (``tiltsmc run`` writes each one's line with its error)."""
    batch = len(errors)
    return SamplerResult(
        sampler=sampler,
        samples=[[] for _ in range(batch)],
        texts=None,
        errors=dict(errors),
        log_weights=[np.zeros(0) for _ in range(batch)],
        log_z=np.full(batch, -np.inf),
        ess=np.zeros((batch, 0)),
        resampled=np.zeros((batch, 0), dtype=bool),
        unique_ancestors=np.zeros((batch, 0), dtype=np.int64),
        log_z_increments=np.zeros((batch, 0)),
        log_z_increment_se=np.zeros((batch, 0)),
        collapsed=np.ones(batch, dtype=bool),
        compute=Compute() if compute is None else compute,
    )


def plain(value: Any) -> Any:
    """``value`` (numpy arrays and scalars, lists and tuples of them) in plain Python types for strict JSON,
    as [`SamplerResult.to_dict`][tiltsmc.samplers.result.SamplerResult.to_dict] writes its fields: arrays
    as (nested) lists, numbers that are not finite as None (``finite_or_none``). An array of integers,
    booleans or finite floats is listed at once, not element by element (a server's answers are mostly
    token arrays)."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [plain(v) for v in value]
        listed = value.tolist()
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return finite_or_none(listed)
        return listed
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return finite_or_none(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def finite_or_none(value: Any) -> Any:
    """Strict JSON has no infinities or NaN: a float that is not finite becomes None (``null``), in lists
    and dict values too; numbers stay numbers.

    What ``null`` stands for is fixed by the field (the output schema, ``tiltsmc/run.schema.json``,
    says it for each): ``-inf`` in log-quantities (``log_z``, ``log_weights``, ``log_z_increments``,
    ``proposal_log_z``, ``log_rewards``: a weight, estimate or reward of zero), ``+inf`` in standard errors
    (``log_z_increment_se``: no reading) and NaN in rates (``acceptance_rate`` with no move: undefined).
    """
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean_text(values: npt.NDArray[Any]) -> str:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return f"{finite.mean():.3g}" if finite.size else "n/a"


def _spread_text(values: npt.NDArray[np.float64]) -> str:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return "all -inf"
    return f"min {finite.min():.3g}, mean {finite.mean():.3g}, max {finite.max():.3g}"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
