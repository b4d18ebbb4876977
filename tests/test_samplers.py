"""Samplers (docs/theory/samplers.md) checked against the exact answers of the Markov-DFA test bed
(docs/theory/test-bed.md).

Every statistical check states how its tolerance follows from the sample size; none is tuned to pass.
Common conventions:

* ``Z_SIGMA = 5``: a statistic must lie within 5 standard errors of its exact value. For an estimate that
  is (close to) normal this fails by chance with probability ~6e-7 per check (a few times 1e-5 for the
  t-distributed statistics with tens of degrees of freedom used below), so a failure means a bug.
* Frequencies of ``n`` independent draws of a law ``P`` over ``K`` cells (of ``0 < P < 1``) are checked
  cell by cell against exact binomial quantiles: each count must lie in the band outside which a
  ``Binomial(n, P)`` count falls with probability at most ``ALPHA_HISTOGRAM / K`` (computed from the pmf,
  not a normal approximation, which is poor where ``n P`` is of order 1 or less), so by the union bound a
  whole histogram fails by chance with probability at most ``ALPHA_HISTOGRAM = 1e-6`` (computed exactly
  for the file's eleven histograms: 5.6e-7 to 9e-7 each, 7.4e-6 in all). Cells with ``P = 0`` must be
  empty.
* Adaptive resampling is checked where it happens: a test of a threshold between 0 and 1 first asserts that
  its runs resample at some steps and not at others (``assert_resampling_exercised``), so that it cannot
  silently stop exercising the resampling scheme.
* Many independent runs come from one batched call with ``prompts=[()] * B`` (every prompt of the Markov
  task is the empty sequence and prompts are independent).
Everything is seeded, so the file is deterministic.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
import tiltsmc
from exact_counts import ALPHA_HISTOGRAM, assert_counts_match, binomial_band
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import MarkovPolicy

SCHEMES = ("multinomial", "stratified", "systematic", "residual")
Z_SIGMA = 5.0


# ----------------------------------------------------------------------------------------------------------
# helpers


def _lse(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-sum-exp; an all ``-inf`` slice gives ``-inf`` without warnings."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=axis)) + np.squeeze(m, axis=axis)


def seq_index(samples: np.ndarray, V: int) -> np.ndarray:
    """Lexicographic index of each row of an ``(n, T)`` array (the order of ``enumerate_sequences``)."""
    samples = np.asarray(samples, dtype=np.int64)
    T = samples.shape[1]
    return samples @ (V ** np.arange(T - 1, -1, -1, dtype=np.int64))


def target_probs(task: MarkovDFATask) -> np.ndarray:
    """``pi(x)`` for every sequence, in lexicographic order, by enumeration."""
    _, log_p, log_r = task.enumerate_sequences()
    with np.errstate(invalid="ignore"):
        return np.exp(log_p + log_r - task.exact_log_z())


def stacked(res: Any) -> np.ndarray:
    """The single sample of every prompt of a one-sample-per-prompt result, as an ``(B, T)`` array."""
    assert all(np.shape(s)[0] == 1 for s in res.samples)
    return np.concatenate([np.asarray(s) for s in res.samples], axis=0)


def assert_resampling_exercised(res: Any, threshold: float) -> None:
    """The resampling that ``ess_threshold = threshold`` asks for happens, on the runs that did not collapse,
    at the steps before the last (the last never resamples): at none for 0, at every one from 1 on (the core
    resamples every row then), and for a threshold in between at more than a tenth and less than nine tenths
    of them (both branches of the adaptive decision taken often; the fractions are set by the task, the
    twist and ``N``, and the cases below sit well inside these bounds)."""
    resampled = np.asarray(res.resampled)[~np.asarray(res.collapsed)][:, :-1]
    assert resampled.size > 0
    if threshold == 0.0:
        assert not resampled.any()
    elif threshold >= 1.0:
        assert resampled.all()
    else:
        assert 0.1 < resampled.mean() < 0.9, f"resampled at {resampled.mean():.3f} of the steps"


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def tv_noise_floor(probs: np.ndarray, n: int) -> float:
    """``E[TV(empirical histogram of n exact draws, probs)]`` to leading order.

    Each cell's frequency error is ~ N(0, P(1-P)/n) and ``E|N(0, s^2)| = s sqrt(2/pi)``, so
    ``E[TV] = 0.5 sum_x E|hat P(x) - P(x)| ~ sum_x sqrt(P(x) (1 - P(x)) / (2 pi n))``.
    """
    return float(np.sum(np.sqrt(probs * (1.0 - probs) / (2.0 * math.pi * n))))


def assert_unbiased(log_z: np.ndarray, exact_log_z: float, label: str, max_rel_se: float = 0.005) -> None:
    """``E[exp(log_z)] = Z``: the mean ratio ``Zh / Z`` over ``B`` independent runs is 1 within 5 se.

    se = sample sd of the ratios / sqrt(B) (CLT; the ratios have finite variance because every potential
    is bounded on these tasks). ``max_rel_se`` guards the power of the check: a relative bias ``d`` passes
    only if the noise pulls the mean back within 5 se, with probability ``Phi(5 - d / se)``, so with se <
    0.005 a bias of 3.5% (7 se) or more passes with probability below 2.3%, and one of 5% (10 se) below 3e-7.
    (The runs below have se 0.0005 - 0.0031 at ``B_UNBIASED``, 0.003 for best-of-n's 20,000.)
    """
    ratio = np.exp(np.asarray(log_z) - exact_log_z)
    assert np.all(np.isfinite(ratio)), f"{label}: non-finite Zh / Z"
    B = ratio.size
    mean, se = float(ratio.mean()), float(ratio.std(ddof=1) / math.sqrt(B))
    assert 0 < se < max_rel_se, f"{label}: se {se:.3g} (degenerate or too noisy to test)"
    assert abs(mean - 1.0) <= Z_SIGMA * se, f"{label}: mean Zh/Z = {mean:.5f}, se {se:.5f}"


def path_values(task: MarkovDFATask, tables: list[Any], seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Along each row ``x`` of ``seqs`` (n, T): ``lv[:, t] = log Vh_t(x_{1:t})`` for ``t = 0..T`` and
    ``lse[:, t-1] = log sum_s p(s | x_{1:t-1}) Vh_t(x_{1:t-1}, s)`` for ``t = 1..T`` (written from the tables
    and the raw automaton, independently of the samplers)."""
    seqs = np.asarray(seqs, dtype=np.int64)
    n, T = seqs.shape
    V = task.vocab_size
    q = np.full(n, task.start, dtype=np.int64)
    lv = np.empty((n, T + 1))
    lse = np.empty((n, T))
    lv[:, 0] = float(tables[0])
    for t in range(1, T + 1):
        if t == 1:
            logp = np.broadcast_to(task.log_init, (n, V))
        else:
            logp = task.log_trans_at(t - 1)[seqs[:, t - 2]]
        nxt = np.asarray(tables[t])[np.arange(V)[None, :], task.dfa[q]]
        lse[:, t - 1] = _lse(logp + nxt)
        q = task.dfa[q, seqs[:, t - 1]]
        lv[:, t] = np.asarray(tables[t])[seqs[:, t - 1], q]
    return lv, lse


def pool_atoms(task: MarkovDFATask, tables: list[Any], K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact law of one SP-gSMC run with a pool of ``K`` (docs/theory/samplers.md), by enumerating every
    pool draw.

    At step ``t`` draw ``K`` candidates ``s_k ~ p(.|prefix)``, keep ``k`` with probability ``G_k / sum G``
    (``G_k = Vh_t(prefix, s_k) / Vh_{t-1}(prefix)``) and multiply ``Zh`` by ``mean_k G_k``; ``Zh_0 = Vh_0``.
    Returns atoms ``(x index, log Zh, probability)``, merged over equal ``(x, Zh)`` (the MH correction
    depends on a run only through ``x`` and ``Zh``, so the merged chain is exact). Needs ``G > 0`` somewhere
    in every pool (no collapse), asserted.
    """
    V, T = task.vocab_size, task.horizon
    root = float(tables[0])
    atoms: dict[tuple[tuple[int, ...], float], list[Any]] = {((), root): [task.start, root, 1.0]}
    for t in range(1, T + 1):
        grown: dict[tuple[tuple[int, ...], float], list[Any]] = {}
        for (prefix, log_zh), (q, lv_prev, prob) in atoms.items():
            logp = task.log_init if t == 1 else task.log_trans_at(t - 1)[prefix[-1]]
            for pool in itertools.product(range(V), repeat=K):
                log_prob_pool = float(sum(logp[s] for s in pool))
                if log_prob_pool == -np.inf:
                    continue
                lv = np.array([np.asarray(tables[t])[s, task.dfa[q, s]] for s in pool])
                lg = lv - lv_prev
                total = float(_lse(lg))
                assert total > -np.inf, "pool collapse: choose a task with positive rewards"
                new_log_zh = log_zh + total - math.log(K)
                for k, s in enumerate(pool):
                    weight = prob * math.exp(log_prob_pool + lg[k] - total)
                    if weight == 0.0:
                        continue
                    key = ((*prefix, s), round(new_log_zh, 11))
                    entry = grown.setdefault(key, [int(task.dfa[q, s]), float(lv[k]), 0.0])
                    entry[2] += weight
        atoms = grown
    index = np.array([sum(x * V ** (T - 1 - i) for i, x in enumerate(prefix)) for prefix, _ in atoms])
    log_zh = np.array([lz for _, lz in atoms])
    prob = np.array([entry[2] for entry in atoms.values()])
    return index, log_zh, prob


def systematic_offspring(log_w: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
    """Exact law of systematic resampling of one row of ``N`` log-weights (``core.resample``): with one
    ``u ~ U[0, 1)``, the points ``(j + u) / N`` below the cumulative weight ``C_i`` number
    ``ceil(N C_i - u)`` (clamped to ``[0, N]``; ``N`` from the last positive particle on), a step function of
    ``u``. Returns each outcome's ancestors, arranged as ``smc`` arranges them (every survivor in its own
    slot, the extra copies into the dead slots in order), with the length of its ``u`` interval."""
    n = len(log_w)
    weights = np.exp(log_w - _lse(log_w))
    scaled = np.cumsum(weights) * n
    scaled[int(np.flatnonzero(weights > 0)[-1]) :] = n
    cuts = np.unique(np.concatenate([[0.0, 1.0], np.mod(scaled, 1.0)]))
    outcomes = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b - a < 1e-12:  # a sliver from rounding (N C_i within an ulp of an integer): no outcome
            continue
        below = np.clip(np.ceil(scaled - 0.5 * (a + b)), 0, n).astype(np.int64)
        children = np.diff(below, prepend=0)
        ascending = np.repeat(np.arange(n), children)[None, :]
        outcomes.append((tuple(_survivors_stay_reference(ascending)[0].tolist()), float(b - a)))
    return outcomes


def smc_atoms(
    task: MarkovDFATask, tables: list[Any], n: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact law of one PIMH proposal (``mh(num_particles=n)``): naive-proposal SMC with ``n`` particles,
    systematic resampling where ``ESS < threshold * n`` (never after the last step), one trajectory picked
    by its final weight; by enumerating every draw of every particle and every resampling outcome.

    Step ``t`` multiplies each weight by ``G = Vh_t / Vh_{t-1}`` and ``Zh`` by ``sum_i W_i G_i``; a resampled
    row's weights are reset to equal. Returns atoms ``(x index, log Zh, probability)`` merged over equal
    ``(x, Zh)`` (as ``pool_atoms``), and the probability that a run resamples at each step ``1..T-1``.
    """
    V, T = task.vocab_size, task.horizon
    root = float(tables[0])
    # a run's state: the particles' prefixes and log-weights (their automaton states and log Vh follow from
    # the prefixes), and log Zh
    start = (tuple(((), 0.0) for _ in range(n)), root)
    runs: dict[Any, float] = {start: 1.0}
    resampled = np.zeros(T - 1)
    for t in range(1, T + 1):
        grown: dict[Any, float] = {}
        for (particles, log_zh), prob in runs.items():
            states, log_v_prev = [], []
            for prefix, _ in particles:
                q = task.start
                for s in prefix:
                    q = int(task.dfa[q, s])
                states.append(q)
                log_v_prev.append(root if t == 1 else float(np.asarray(tables[t - 1])[prefix[-1], q]))
            log_w = np.array([lw for _, lw in particles])
            for tokens in itertools.product(range(V), repeat=n):
                log_prob = sum(
                    float(task.log_init[s] if t == 1 else task.log_trans_at(t - 1)[prefix[-1], s])
                    for (prefix, _), s in zip(particles, tokens)
                )
                if log_prob == -np.inf:
                    continue
                log_v = np.array(
                    [np.asarray(tables[t])[s, task.dfa[q, s]] for q, s in zip(states, tokens)],
                    dtype=np.float64,
                )
                new_log_w = log_w + log_v - np.array(log_v_prev)
                new_log_zh = log_zh + float(_lse(new_log_w) - _lse(log_w))
                assert new_log_zh > -np.inf, "collapse: choose a task with positive rewards"
                weights = np.exp(new_log_w - new_log_w.max())
                ess = weights.sum() ** 2 / np.square(weights).sum()
                if t < T and threshold < 1.0:  # the decision is not at the mercy of rounding
                    assert abs(ess - threshold * n) > 1e-9
                grown_prefixes = [(*prefix, s) for (prefix, _), s in zip(particles, tokens)]
                outcomes: list[tuple[Any, float]] = [(tuple(zip(grown_prefixes, new_log_w)), 1.0)]
                if t < T and (threshold >= 1.0 or ess < threshold * n):
                    resampled[t - 1] += prob * math.exp(log_prob)
                    outcomes = [
                        (tuple((grown_prefixes[a], 0.0) for a in ancestors), p_outcome)
                        for ancestors, p_outcome in systematic_offspring(new_log_w)
                    ]
                for new_particles, p_outcome in outcomes:
                    key = (tuple((x, round(float(lw), 11)) for x, lw in new_particles), round(new_log_zh, 11))
                    grown[key] = grown.get(key, 0.0) + prob * math.exp(log_prob) * p_outcome
        runs = grown
    picks = []
    for (particles, log_zh), prob in runs.items():
        log_w = np.array([lw for _, lw in particles])
        for (prefix, _), w in zip(particles, np.exp(log_w - _lse(log_w))):
            picks.append((sum(x * V ** (T - 1 - i) for i, x in enumerate(prefix)), log_zh, prob * float(w)))
    # merge equal (x, Zh): the same Zh reached along different paths differs by rounding, and rounding it to
    # a fixed number of digits can still split such a pair, so neighbours closer than 1e-9 are merged
    atoms: list[list[Any]] = []
    for x, log_zh, prob in sorted(picks):
        if atoms and atoms[-1][0] == x and log_zh - atoms[-1][1] < 1e-9:
            atoms[-1][2] += prob
        else:
            atoms.append([x, log_zh, prob])
    index = np.array([x for x, _, _ in atoms], dtype=np.int64)
    log_zh = np.array([lz for _, lz, _ in atoms])
    return index, log_zh, np.array([p for _, _, p in atoms]), resampled


def independent_mh_law(prob: np.ndarray, log_w: np.ndarray, steps: int) -> np.ndarray:
    """Law of the state of independent MH after ``steps`` moves, started from the proposal ``prob``.

    Kernel: from atom ``j`` propose ``j' ~ prob`` and move with probability ``min(1, w_j' / w_j)``.
    """
    with np.errstate(invalid="ignore"):  # -inf - -inf: both weights zero, and MH never moves between them
        ratio = np.exp(log_w[None, :] - log_w[:, None])  # [j, j']
    accept = np.where(np.isnan(ratio), 0.0, np.minimum(1.0, ratio))
    move = prob[None, :] * accept
    stay = 1.0 - move.sum(axis=1)
    law = prob.copy()
    for _ in range(steps):
        law = law @ move + law * stay
    return law


def independent_mh_acceptance(prob: np.ndarray, log_w: np.ndarray, steps: int) -> float:
    """Expected acceptance rate of independent MH (``independent_mh_law``'s chain) over ``steps`` moves,
    ``sum_h P(accept at move h) / steps``; proposing the chain's own atom counts as accepted (the ratio is
    1). Needs every weight positive."""
    assert np.all(np.isfinite(log_w))
    accept = np.minimum(1.0, np.exp(log_w[None, :] - log_w[:, None]))
    move_prob = (prob[None, :] * accept).sum(axis=1)
    law, expected = prob.copy(), 0.0
    for _ in range(steps):
        expected += float(law @ move_prob) / steps
        law = law @ (prob[None, :] * accept) + law * (1 - move_prob)
    return expected


def x_marginal(index: np.ndarray, prob: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(index, weights=prob, minlength=size)


def tilted(task: MarkovDFATask, minimum: float = 0.2) -> MarkovDFATask:
    """Assert that the target differs from the base policy (``TV(p, pi) > minimum``), so that a sampler that
    ignored the reward would fail the checks; random tiny tasks are sometimes degenerate (constant r)."""
    _, log_p, _ = task.enumerate_sequences()
    assert tv(np.exp(log_p), target_probs(task)) > minimum, f"{task}: target too close to p for a test"
    return task


# ----------------------------------------------------------------------------------------------------------
# 1. unbiasedness of Zh

# 50,000 runs a check: se of the mean Zh / Z from 0.0005 to 0.0031 (SP-gSMC on the sparse task), so a bias
# of 2.5% is 8 se or more in every case (B = 2000 gave se 0.0115 on the sparse task, and a 5% bias passed).
B_UNBIASED = 50_000


@pytest.fixture(scope="module")
def dense_task() -> MarkovDFATask:
    return MarkovDFATask.random(3, 4, 5, rng=101)


@pytest.fixture(scope="module")
def sparse_task() -> MarkovDFATask:
    """Zero transitions, zero rewards and a time-varying chain: exercises every ``-inf`` path."""
    return MarkovDFATask.random(3, 5, 4, rng=202, time_varying=True, zero_trans_fraction=0.3)


# ESS thresholds at which N = 4 runs on these tasks resample at some steps and not at others (38% and 63%
# of the naive runs' steps, 25% of the optimal proposal's, dense and sparse; 0.5 never resampled the dense
# task). Threshold 0 ignores the scheme, so it is one case.
ADAPTIVE_NAIVE, ADAPTIVE_OPTIMAL = 0.9, 0.95


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "threshold"),
    [("systematic", 0.0)] + [(scheme, t) for scheme in SCHEMES for t in (ADAPTIVE_NAIVE, 1.0)],
)
@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_smc_naive_log_z_unbiased(
    which: str, scheme: str, threshold: float, dense_task: MarkovDFATask, sparse_task: MarkovDFATask
) -> None:
    task = dense_task if which == "dense" else sparse_task
    res = tiltsmc.smc(
        task.policy(),
        task.twist(0.5, rng=7),
        prompts=[()] * B_UNBIASED,
        num_particles=4,
        resample=scheme,
        ess_threshold=threshold,
        rng=1234,
    )
    assert_resampling_exercised(res, threshold)
    assert_unbiased(res.log_z, task.exact_log_z(), f"smc {which} {scheme} {threshold}")


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0.0, ADAPTIVE_OPTIMAL, 1.0])
@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_smc_optimal_proposal_log_z_unbiased(
    which: str, threshold: float, dense_task: MarkovDFATask, sparse_task: MarkovDFATask
) -> None:
    task = dense_task if which == "dense" else sparse_task
    res = tiltsmc.smc(
        task.policy(),
        task.twist(0.5, rng=8),
        prompts=[()] * B_UNBIASED,
        num_particles=4,
        ess_threshold=threshold,
        proposal="optimal",
        rng=99,
    )
    assert_resampling_exercised(res, threshold)
    assert_unbiased(res.log_z, task.exact_log_z(), f"smc optimal {which} {threshold}")


@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_smc_unguided_log_z_unbiased(
    which: str, dense_task: MarkovDFATask, sparse_task: MarkovDFATask
) -> None:
    task = dense_task if which == "dense" else sparse_task
    res = tiltsmc.smc(task.policy(), task.unguided(), prompts=[()] * B_UNBIASED, num_particles=4, rng=5)
    assert_unbiased(res.log_z, task.exact_log_z(), f"smc unguided {which}")


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["noisy", "unguided"])
@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_sp_gsmc_pool_log_z_unbiased(
    which: str, reward: str, dense_task: MarkovDFATask, sparse_task: MarkovDFATask
) -> None:
    task = dense_task if which == "dense" else sparse_task
    model = task.twist(0.5, rng=9) if reward == "noisy" else task.unguided()
    res = tiltsmc.sp_gsmc(task.policy(), model, prompts=[()] * B_UNBIASED, pool_size=3, rng=77)
    assert_unbiased(res.log_z, task.exact_log_z(), f"sp_gsmc {which} {reward}")


@pytest.mark.slow
def test_mh_log_z_is_mean_of_unbiased_estimates(dense_task: MarkovDFATask) -> None:
    """``mh``'s log_z is the log-mean of its ``steps + 1`` independent, unbiased run estimates: the identity
    with the proposals' own estimates (to rounding), then the unbiasedness of the mean."""
    steps = 3
    res = tiltsmc.mh(
        dense_task.policy(),
        dense_task.twist(0.5, rng=9),
        prompts=[()] * B_UNBIASED,
        pool_size=3,
        steps=steps,
        rng=4,
    )
    assert res.proposal_log_z.shape == (B_UNBIASED, steps + 1)
    # the proposals differ (independent runs), so no single one's estimate satisfies the identity
    assert np.mean(np.ptp(res.proposal_log_z, axis=1) > 1e-6) > 0.5
    np.testing.assert_allclose(res.log_z, _lse(res.proposal_log_z) - math.log(steps + 1), rtol=0, atol=1e-12)
    assert_unbiased(res.log_z, dense_task.exact_log_z(), "mh log_z")


# ----------------------------------------------------------------------------------------------------------
# 2. weighted samples of SMC against the exact target


def _replicate_estimates(res: Any, functional: Any) -> np.ndarray:
    """Per replicate (prompt) ``b``, the self-normalised estimate ``sum_i W_i f(x_i)``."""
    return np.stack(
        [np.einsum("n,n...->...", np.exp(lw), functional(s)) for s, lw in zip(res.samples, res.log_weights)]
    )


def _assert_replicates_match(estimates: np.ndarray, exact: np.ndarray, particles: int, label: str) -> None:
    """Mean of ``R`` replicate estimates vs the exact value within 5 se.

    se = sample sd over the R independent replicates / sqrt(R) (a t-statistic with R-1 = 31 degrees of
    freedom: P(|t| > 5) ~ 2e-5 per cell). Cells where every replicate agrees (e.g. a rare token never drawn)
    have a sample sd of 0; for them the se of ``R * particles`` exact iid draws, sqrt(P(1-P)/(R N)), is used
    as a floor. The self-normalisation/resampling bias is O(1/N) = O(1e-4), far below 5 se.
    """
    R = estimates.shape[0]
    mean = estimates.mean(axis=0)
    se = np.maximum(
        estimates.std(axis=0, ddof=1) / math.sqrt(R), np.sqrt(exact * (1 - exact) / (R * particles))
    )
    bad = np.abs(mean - exact) > Z_SIGMA * se
    bad |= (exact == 0) & (mean != 0)
    assert not bad.any(), f"{label}: {mean[bad]} vs exact {exact[bad]} (se {se[bad]})"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("reward", "proposal", "scheme", "threshold"),
    [
        # 0.9: on this task and twist the runs resample at step 3 and at about a third of steps 1 and 2
        # (0.5 never resampled: ESS / N >= 0.6 before the last step)
        ("noisy", "naive", "systematic", 0.9),
        ("noisy", "naive", "stratified", 0.9),
        ("noisy", "naive", "multinomial", 1.0),
        ("noisy", "naive", "residual", 1.0),
        # the unguided potentials are 1 before the last step: ESS = N there, so no threshold below 1
        # resamples; this is importance sampling with the terminal reward, whatever the scheme
        ("unguided", "naive", "systematic", 0.0),
        ("noisy", "optimal", "stratified", 1.0),
    ],
)
def test_smc_weighted_marginals(reward: str, proposal: str, scheme: str, threshold: float) -> None:
    task = tilted(MarkovDFATask.random(3, 4, 5, rng=3))
    R, N = 32, 5000
    model = task.twist(0.5, rng=10) if reward == "noisy" else task.unguided()
    res = tiltsmc.smc(
        task.policy(),
        model,
        prompts=[()] * R,
        num_particles=N,
        resample=scheme,
        ess_threshold=threshold,
        proposal=proposal,
        rng=11,
    )
    assert_resampling_exercised(res, threshold)
    V = task.vocab_size
    estimates = _replicate_estimates(res, lambda s: np.eye(V)[s])  # (R, T, V)
    label = f"marginals {reward} {proposal} {scheme} {threshold}"
    _assert_replicates_match(estimates, task.exact_marginals(), N, label)


@pytest.mark.parametrize(("scheme", "threshold"), [("systematic", 0.8), ("multinomial", 1.0)])
def test_smc_weighted_sequence_law(scheme: str, threshold: float) -> None:
    """Full-sequence law (not just marginals) of the weighted particles, time-varying sparse task. At 0.8 the
    runs resample at steps 1 - 3 and not at step 0 (0.5 never resampled: ESS / N >= 0.54 before the last
    step)."""
    task = tilted(MarkovDFATask.random(2, 4, 5, rng=6, time_varying=True, zero_trans_fraction=0.2))
    R, N = 32, 4000
    res = tiltsmc.smc(
        task.policy(),
        task.twist(0.7, rng=12),
        prompts=[()] * R,
        num_particles=N,
        resample=scheme,
        ess_threshold=threshold,
        rng=13,
    )
    assert_resampling_exercised(res, threshold)
    size = 2**task.horizon
    estimates = _replicate_estimates(res, lambda s: np.eye(size)[seq_index(s, 2)])
    _assert_replicates_match(estimates, target_probs(task), N, f"sequence law {scheme} {threshold}")


@pytest.mark.parametrize("noisy", [False, True])
def test_smc_without_resampling_is_importance_sampling(noisy: bool, dense_task: MarkovDFATask) -> None:
    """With ``ess_threshold=0`` nothing is resampled and the potentials telescope exactly: each naive
    particle's weight is ``r(x) / Vh_0``, so the normalised log-weights are ``log r`` normalised and
    ``log_z = log mean_i r(x_i)`` (deterministic identities, to rounding)."""
    task = dense_task
    model = task.twist(0.5, rng=14) if noisy else task.unguided()
    res = tiltsmc.smc(task.policy(), model, prompts=[()] * 6, num_particles=50, ess_threshold=0.0, rng=15)
    assert not res.resampled.any()
    for b in range(6):
        log_r = task.sequence_log_reward(res.samples[b])
        expected = log_r - _lse(log_r)
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(np.isfinite(res.log_weights[b]), finite)
        np.testing.assert_allclose(res.log_weights[b][finite], expected[finite], rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.log_z[b], _lse(log_r) - math.log(50), rtol=0, atol=1e-9)


def test_smc_optimal_proposal_weights_without_resampling(dense_task: MarkovDFATask) -> None:
    """Optimal proposal, no resampling: ``log w(x) = sum_t [log sum_s p(s|.) Vh_t(., s) - log Vh_{t-1}]``
    along the path, and ``log_z = log Vh_0 + log mean_i w_i`` (deterministic, to rounding)."""
    task = dense_task
    twist = task.twist(0.5, rng=16)
    res = tiltsmc.smc(
        task.policy(),
        twist,
        prompts=[()] * 4,
        num_particles=40,
        ess_threshold=0.0,
        proposal="optimal",
        rng=17,
    )
    for b in range(4):
        lv, lse = path_values(task, twist.tables, res.samples[b])
        log_w = np.sum(lse - lv[:, :-1], axis=1)
        np.testing.assert_allclose(res.log_weights[b], log_w - _lse(log_w), rtol=0, atol=1e-9)
        np.testing.assert_allclose(
            res.log_z[b], twist.tables[0] + _lse(log_w) - math.log(40), rtol=0, atol=1e-9
        )


# ----------------------------------------------------------------------------------------------------------
# 3. the exact twist


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("which", ["dense", "sparse", "needle"])
def test_exact_twist_optimal_proposal_is_perfect(
    which: str, threshold: float, dense_task: MarkovDFATask, sparse_task: MarkovDFATask
) -> None:
    task = {"dense": dense_task, "sparse": sparse_task, "needle": MarkovDFATask.needle(3, 7, rng=1)}[which]
    B, N = 5, 16
    res = tiltsmc.smc(
        task.policy(),
        task.twist(),
        prompts=[()] * B,
        num_particles=N,
        ess_threshold=threshold,
        proposal="optimal",
        rng=18,
    )
    log_z = task.exact_log_z()
    assert not res.collapsed.any()
    for b in range(B):
        assert np.ptp(res.log_weights[b]) < 1e-9
        assert np.all(task.sequence_log_reward(res.samples[b]) > -np.inf)
    np.testing.assert_allclose(res.log_z, log_z, rtol=0, atol=1e-9 * max(1.0, abs(log_z)))
    np.testing.assert_allclose(res.ess, N, rtol=1e-9)

    sp = tiltsmc.sp_gsmc(task.policy(), task.twist(), prompts=[()] * B, pool_size=None, rng=19)
    np.testing.assert_allclose(sp.log_z, log_z, rtol=0, atol=1e-9 * max(1.0, abs(log_z)))


def test_sp_gsmc_exact_twist_draws_exact_samples() -> None:
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=7))
    B = 20000
    res = tiltsmc.sp_gsmc(task.policy(), task.twist(), prompts=[()] * B, pool_size=None, rng=20)
    log_z = task.exact_log_z()
    np.testing.assert_allclose(res.log_z, log_z, rtol=0, atol=1e-9 * max(1.0, abs(log_z)))
    counts = np.bincount(seq_index(stacked(res), 2), minlength=16)
    assert_counts_match(counts, target_probs(task), "sp_gsmc exact twist")


def test_sp_gsmc_exact_form_with_noisy_twist() -> None:
    """Exact form with an approximate twist: ``x ~ prod_t p Vh_t / sum_s p Vh_t`` and the deterministic
    ``log Zh(x) = log Vh_0 + sum_t [log sum_s p Vh_t - log Vh_{t-1}]``; both enumerated from the tables."""
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=16))
    twist = task.twist(0.8, rng=21)
    B = 20000
    res = tiltsmc.sp_gsmc(task.policy(), twist, prompts=[()] * B, pool_size=None, rng=22)
    samples = stacked(res)
    lv, lse = path_values(task, twist.tables, samples)
    np.testing.assert_allclose(res.log_z, lv[:, 0] + np.sum(lse - lv[:, :-1], axis=1), rtol=0, atol=1e-9)

    seqs, log_p, _ = task.enumerate_sequences()
    lv_all, lse_all = path_values(task, twist.tables, seqs)
    with np.errstate(invalid="ignore"):
        log_q = log_p + np.sum(lv_all[:, 1:] - lse_all, axis=1)
    q = np.where(np.isnan(log_q), 0.0, np.exp(log_q))
    assert tv(q, target_probs(task)) > 0.02  # the twist is far enough off for the check to mean something
    assert_counts_match(
        np.bincount(seq_index(samples, 2), minlength=16), q, "sp_gsmc exact form, noisy twist"
    )


# ----------------------------------------------------------------------------------------------------------
# 4. the Metropolis-Hastings correction


@pytest.fixture(scope="module")
def mh_setup() -> dict[str, Any]:
    """A tiny task (V=2, T=4), a deliberately bad twist (noise 1.0) and the exact laws of pool SP-gSMC
    (K = 2) and of its MH correction after 0 and 20 steps, by enumeration of every pool draw."""
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=19, zero_reward_fraction=0.0))
    twist = task.twist(1.0, rng=23)
    index, log_zh, prob = pool_atoms(task, twist.tables, K=2)
    pi = target_probs(task)
    return {
        "task": task,
        "twist": twist,
        "pi": pi,
        "atoms": (index, log_zh, prob),
        "law0": x_marginal(index, prob, 16),
        "law20": x_marginal(index, independent_mh_law(prob, log_zh, 20), 16),
    }


def test_pool_enumeration_is_consistent(mh_setup: dict[str, Any]) -> None:
    """Self-check of the reference: the pool run is a proper law, ``E[Zh] = Z`` and the law tilted by
    ``Zh / Z`` (the stationary law of independent MH) has ``x``-marginal exactly ``pi``."""
    assert_proper_and_tilted_to_pi(mh_setup["atoms"], mh_setup["task"], mh_setup["pi"])


def assert_proper_and_tilted_to_pi(atoms: Any, task: MarkovDFATask, pi: np.ndarray) -> None:
    """An enumerated law of ``(x, log Zh)`` atoms is a proper law, ``E[Zh] = Z``, and tilted by ``Zh / Z``
    its ``x``-marginal is exactly ``pi``."""
    index, log_zh, prob = atoms
    assert math.isclose(prob.sum(), 1.0, rel_tol=1e-12)
    z_ratio = np.exp(log_zh - task.exact_log_z())
    assert math.isclose(float(np.sum(prob * z_ratio)), 1.0, rel_tol=1e-10)
    # atoms are merged on log Zh rounded to 1e-11, hence the 1e-10 allowance
    np.testing.assert_allclose(x_marginal(index, prob * z_ratio, 16), pi, rtol=0, atol=1e-10)


def test_sp_gsmc_pool_joint_law_of_sample_and_estimate(mh_setup: dict[str, Any]) -> None:
    """Every ``(x, log Zh)`` returned by ``sp_gsmc(pool_size=2)`` is an atom of the enumerated law, and the
    atoms' frequencies over B independent runs match their probabilities (per-cell binomial)."""
    task, twist = mh_setup["task"], mh_setup["twist"]
    index, log_zh, prob = mh_setup["atoms"]
    B = 20000
    res = tiltsmc.sp_gsmc(task.policy(), twist, prompts=[()] * B, pool_size=2, rng=24)
    x = seq_index(stacked(res), 2)
    distance = np.where(index[None, :] == x[:, None], np.abs(log_zh[None, :] - res.log_z[:, None]), np.inf)
    which = np.argmin(distance, axis=1)
    assert distance[np.arange(B), which].max() < 1e-9, "a (sample, log_z) pair that no pool draw can give"
    assert_counts_match(np.bincount(which, minlength=index.size), prob, "sp_gsmc pool joint law")


@pytest.mark.slow
def test_mh_corrects_pool_bias(mh_setup: dict[str, Any]) -> None:
    task, twist, pi = mh_setup["task"], mh_setup["twist"], mh_setup["pi"]
    B = 20000
    floor = tv_noise_floor(pi, B)
    # Preconditions that give the TV checks their meaning (exact, from the enumeration): the uncorrected
    # sampler is off by many noise floors, and 20 MH steps bring the exact law within a fraction of one.
    assert tv(mh_setup["law0"], pi) > 6 * floor
    assert tv(mh_setup["law20"], pi) < 0.25 * floor
    # The noise floor formula against a simulation with exact draws of the same size.
    simulated = np.bincount(seq_index(task.sample_exact(B, rng=25), 2), minlength=16) / B
    assert tv(simulated, pi) < 3 * floor

    hists = {}
    for steps in (0, 20):
        res = tiltsmc.mh(task.policy(), twist, prompts=[()] * B, pool_size=2, steps=steps, rng=26 + steps)
        counts = np.bincount(seq_index(stacked(res), 2), minlength=16)
        hists[steps] = counts / B
        assert res.acceptance_rate is not None and res.acceptance_rate.shape == (B,)
        if steps == 0:
            assert np.isnan(res.acceptance_rate).all()
        else:
            assert np.all((res.acceptance_rate >= 0) & (res.acceptance_rate <= 1))
            assert 0.0 < float(res.acceptance_rate.mean()) < 1.0
        # Exact law of the chain after `steps` moves, per cell (binomial over B independent chains).
        assert_counts_match(counts, mh_setup[f"law{steps}"], f"mh steps={steps}")
    assert tv(hists[0], pi) > 3 * floor, "the uncorrected draw should be visibly biased"
    assert tv(hists[20], pi) < 3 * floor, "20 MH steps should remove the bias down to the noise floor"


def test_mh_leaves_zero_weight_states() -> None:
    """A pool of one under the unguided model is independent MH with proposal ``p`` and weight ``Zh = r(x)``,
    zero on part of the space: a chain starting at a zero-weight draw moves at its first positive proposal
    and never moves to a zero-weight one. Its exact law after H steps, per cell, over B chains."""
    task = tilted(MarkovDFATask.random(2, 5, 4, rng=5, zero_reward_fraction=0.5))
    seqs, log_p, log_r = task.enumerate_sequences()
    assert float(np.exp(log_p)[log_r == -np.inf].sum()) > 0.2  # many chains start at a zero-weight state
    B, H = 20000, 3
    law = independent_mh_law(np.exp(log_p), log_r, H)
    assert tv(law, target_probs(task)) > 0.02  # H = 3 is not yet mixed: the check sees the transient too
    res = tiltsmc.mh(task.policy(), task.unguided(), prompts=[()] * B, pool_size=1, steps=H, rng=45)
    counts = np.bincount(seq_index(stacked(res), 2), minlength=seqs.shape[0])
    assert_counts_match(counts, law, "mh from zero-weight states")
    stuck = law[log_r == -np.inf].sum()  # P(still at a zero-weight state): binomial over B chains
    assert abs(res.collapsed.mean() - stuck) <= Z_SIGMA * math.sqrt(stuck * (1 - stuck) / B) + 1 / B
    np.testing.assert_array_equal(res.collapsed, task.sequence_log_reward(stacked(res)) == -np.inf)


def test_mh_acceptance_rate_matches_exact_chain(mh_setup: dict[str, Any]) -> None:
    """Mean acceptance rate over B chains vs its exact value ``sum_h P(accept at step h) / H``.

    Per chain the rate is a mean of H Bernoullis, bounded in [0, 1]; se = sample sd / sqrt(B)."""
    task, twist = mh_setup["task"], mh_setup["twist"]
    _, log_w, prob = mh_setup["atoms"]
    H, B = 5, 10000
    expected = independent_mh_acceptance(prob, log_w, H)  # all weights positive here
    res = tiltsmc.mh(task.policy(), twist, prompts=[()] * B, pool_size=2, steps=H, rng=27)
    rate = res.acceptance_rate
    assert rate is not None
    se = float(rate.std(ddof=1)) / math.sqrt(B)
    assert abs(float(rate.mean()) - expected) <= Z_SIGMA * se


PIMH_PARTICLES, PIMH_THRESHOLD, PIMH_STEPS = 2, 0.9, 5


@pytest.fixture(scope="module")
def pimh_setup(mh_setup: dict[str, Any]) -> dict[str, Any]:
    """The exact law of a PIMH proposal on ``mh_setup``'s task and twist: SMC with 2 particles, systematic
    resampling below ESS = 0.9 N, by enumeration (``smc_atoms``), and of the chain after 0 and
    ``PIMH_STEPS`` moves. Two particles keep the enumeration small (128 atoms, 0.05 s) and the bias of the
    uncorrected draw large: with the 4 particles used before, TV(law0, pi) was 2.4 noise floors at B = 8000
    and the uncorrected sampler passed the old check in 20 of 20 seeds."""
    task, twist = mh_setup["task"], mh_setup["twist"]
    index, log_zh, prob, resampled = smc_atoms(task, twist.tables, PIMH_PARTICLES, PIMH_THRESHOLD)
    return {
        "atoms": (index, log_zh, prob),
        "resampled": resampled,
        "law": independent_mh_law(prob, log_zh, PIMH_STEPS),
        "x_law0": x_marginal(index, prob, 16),
        "x_law": x_marginal(index, independent_mh_law(prob, log_zh, PIMH_STEPS), 16),
    }


def test_smc_enumeration_is_consistent(mh_setup: dict[str, Any], pimh_setup: dict[str, Any]) -> None:
    """Self-check of the PIMH reference, as for the pool: a proper law, ``E[Zh] = Z``, the ``Zh / Z``-tilted
    ``x``-marginal exactly ``pi`` (PIMH's stationary law); and the runs resample at some steps and not at
    others (the systematic scheme and the adaptive decision are both in the law)."""
    assert_proper_and_tilted_to_pi(pimh_setup["atoms"], mh_setup["task"], mh_setup["pi"])
    resampled = pimh_setup["resampled"]  # P(a run resamples at step t), t = 1..T-1
    assert resampled.max() > 0.2 and resampled.min() < 0.8, resampled


@pytest.mark.slow
def test_pimh_corrects_smc_bias(mh_setup: dict[str, Any], pimh_setup: dict[str, Any]) -> None:
    """PIMH with 2-particle SMC proposals (pool_size ignored): the joint law of the returned trajectory and
    the chain's ``Zh`` after 0 and ``PIMH_STEPS`` moves, per atom and per sequence, against the enumerated
    chain; the acceptance rate against its exact mean; ``log_z`` the log-mean of the proposals' ``Zh``."""
    task, twist, pi = mh_setup["task"], mh_setup["twist"], mh_setup["pi"]
    index, log_zh, prob = pimh_setup["atoms"]
    B, H = 20000, PIMH_STEPS
    floor = tv_noise_floor(pi, B)
    # Power, exact: the uncorrected draw (steps = 0) is off by many noise floors, and H moves bring the law
    # within a fraction of one; per sequence, law0's expected counts lie far outside the band of the law
    # after H moves (its largest distance to the band is 35 sd of a law0 count: an uncorrected sampler, or a
    # chain that never moves, fails with certainty).
    assert tv(pimh_setup["x_law0"], pi) > 6 * floor
    assert tv(pimh_setup["x_law"], pi) < 0.25 * floor
    lo, hi = binomial_band(B, pimh_setup["x_law"], ALPHA_HISTOGRAM / 16)
    expected0 = B * pimh_setup["x_law0"]
    outside = np.maximum(lo - expected0, expected0 - hi) / np.sqrt(expected0 * (1 - pimh_setup["x_law0"]))
    assert outside.max() > 10

    def chain_atoms(res: Any) -> np.ndarray:
        """The atom of each chain's final state: its trajectory and the ``Zh`` of the proposal it last
        accepted (the first run's where it accepted none)."""
        accepted = np.asarray(res.mh_accepted)
        steps = accepted.shape[1]
        last = np.zeros(B, dtype=np.int64)
        if steps:
            last = np.where(accepted.any(axis=1), steps - np.argmax(accepted[:, ::-1], axis=1), 0)
        state_log_z = res.proposal_log_z[np.arange(B), last]
        x = seq_index(stacked(res), 2)
        distance = np.where(
            index[None, :] == x[:, None], np.abs(log_zh[None, :] - state_log_z[:, None]), np.inf
        )
        which = np.argmin(distance, axis=1)
        assert distance[np.arange(B), which].max() < 1e-9, "a (sample, Zh) pair that no SMC run can give"
        return which

    options = {"pool_size": 2, "num_particles": PIMH_PARTICLES, "resample": "systematic"}
    res0 = tiltsmc.mh(
        task.policy(), twist, prompts=[()] * B, steps=0, ess_threshold=PIMH_THRESHOLD, rng=29, **options
    )
    assert np.isnan(res0.acceptance_rate).all()
    assert_counts_match(np.bincount(chain_atoms(res0), minlength=index.size), prob, "pimh steps=0 atoms")

    res = tiltsmc.mh(
        task.policy(), twist, prompts=[()] * B, steps=H, ess_threshold=PIMH_THRESHOLD, rng=28, **options
    )
    np.testing.assert_allclose(res.log_z, _lse(res.proposal_log_z) - math.log(H + 1), rtol=0, atol=1e-12)
    assert_counts_match(
        np.bincount(chain_atoms(res), minlength=index.size), pimh_setup["law"], f"pimh steps={H} atoms"
    )
    counts = np.bincount(seq_index(stacked(res), 2), minlength=16)
    assert_counts_match(counts, pimh_setup["x_law"], f"pimh steps={H} sequences")
    # Acceptance rate: per chain a mean of H Bernoullis in [0, 1]; se = sample sd / sqrt(B), 5 se.
    rate = res.acceptance_rate
    assert rate is not None and np.all((rate >= 0) & (rate <= 1))
    expected = independent_mh_acceptance(prob, log_zh, H)
    assert abs(float(rate.mean()) - expected) <= Z_SIGMA * float(rate.std(ddof=1)) / math.sqrt(B)


# ----------------------------------------------------------------------------------------------------------
# 5. rejection sampling


def test_rejection_is_exact() -> None:
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=18))
    n, batch = 20000, 1024
    bound = float(task.accept_reward.max())
    res = tiltsmc.rejection(
        task.policy(), task.unguided(), bound=bound, num_samples=n, rng=30, batch_size=batch
    )
    samples = np.asarray(res.samples[0])
    assert samples.shape == (n, task.horizon)
    assert_counts_match(np.bincount(seq_index(samples, 2), minlength=16), target_probs(task), "rejection")
    np.testing.assert_allclose(res.log_weights[0], -math.log(n))
    assert not res.collapsed[0]

    # tries: draws until the n-th acceptance are negative binomial with acceptance a = Z / C, mean n / a,
    # sd sqrt(n (1 - a)) / a; draws go in whole batches, so up to one batch more.
    a = math.exp(task.exact_log_z()) / bound
    assert res.tries is not None
    tries = int(res.tries[0])
    assert tries % batch == 0
    assert abs(tries - n / a) <= Z_SIGMA * math.sqrt(n * (1 - a)) / a + batch

    # log_z = log of the mean reward over the `tries - batch` draws before the last batch's (several ran):
    # se = sd_p(r) / sqrt(tries - batch) (delta method to the log scale: se / Z).
    _, log_p, log_r = task.enumerate_sequences()
    p, r = np.exp(log_p), np.exp(log_r)
    z = float(np.sum(p * r))
    sd = math.sqrt(float(np.sum(p * (r - z) ** 2)))
    assert tries > batch
    assert abs(math.exp(res.log_z[0]) - z) <= Z_SIGMA * sd / math.sqrt(tries - batch)


def test_rejection_batched_prompts_and_max_tries() -> None:
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=21))
    bound = float(task.accept_reward.max())
    res = tiltsmc.rejection(
        task.policy(), task.unguided(), prompts=[()] * 3, bound=bound, num_samples=5, rng=31
    )
    assert res.num_prompts == 3
    assert all(np.shape(s) == (5, task.horizon) for s in res.samples)
    assert res.tries is not None and np.all(res.tries >= 5)
    for s in res.samples:
        assert np.all(task.sequence_log_reward(s) > -np.inf)  # a zero-reward draw is never accepted

    needle = MarkovDFATask.needle(4, 10, rng=2)  # Z = 4**-10: nothing is accepted in 500 tries
    res = tiltsmc.rejection(
        needle.policy(), needle.unguided(), bound=1.0, num_samples=1, max_tries=500, rng=32
    )
    assert res.tries is not None and int(res.tries[0]) == 500
    assert len(res.samples[0]) == 0
    assert res.collapsed[0] and res.log_z[0] == -np.inf


@pytest.mark.slow
@pytest.mark.parametrize(("task", "batch_size"), [("needle", 2), ("needle", 8), ("tilted", 1)])
def test_rejection_log_z_is_unbiased_when_rounds_stop_on_what_they_draw(task: str, batch_size: int) -> None:
    """``exp(log_z)`` averages to ``Z`` over many prompts (independent runs) with rounds of a few draws,
    the number of rounds set by the acceptances (``num_samples = 2``): within ``Z_SIGMA`` standard errors
    of its mean, the standard error taken from the estimates' own spread. (The mean reward over every
    draw, which the last round's acceptances end, was 1.3 - 1.8x ``Z`` here.)"""
    if task == "needle":
        exact = MarkovDFATask.needle(2, 5, rng=3)  # Z = 1/32, rewards 0 or 1
        bound = 1.0
    else:
        exact = tilted(MarkovDFATask.random(2, 4, 4, rng=18))
        bound = float(exact.accept_reward.max())
    runs = 4000
    res = tiltsmc.rejection(
        exact.policy(), exact.unguided(), prompts=[()] * runs, bound=bound, num_samples=2,
        batch_size=batch_size, rng=40 + batch_size,
    )  # fmt: skip
    assert res.tries is not None and res.tries.max() > 4 * batch_size  # many runs took several rounds
    estimates = np.exp(res.log_z)
    z = math.exp(exact.exact_log_z())
    se = float(estimates.std(ddof=1)) / math.sqrt(runs)
    assert abs(float(estimates.mean()) - z) <= Z_SIGMA * se, (float(estimates.mean()) / z, se / z)


def test_rejection_bound_too_small_raises() -> None:
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=18))
    _, log_p, log_r = task.enumerate_sequences()
    bound = 0.5 * float(np.exp(log_r).max())
    # P(one draw of p has r > bound) = mass; 20000 draws all miss with probability (1 - mass)^20000 < e^-50
    mass = float(np.exp(log_p)[np.exp(log_r) > bound].sum())
    assert 20000 * mass > 50
    with pytest.raises(ValueError, match="bound"):
        tiltsmc.rejection(task.policy(), task.unguided(), bound=bound, num_samples=20000, rng=33)


def test_rejection_bound_far_below_the_rewards_is_reported_without_overflow() -> None:
    """A reward more than 1e308 times the bound is reported in log space: the ratio overflowed to "inf x
    the bound", with numpy's RuntimeWarning (an error under this suite's warning filter)."""
    task = MarkovDFATask.random(3, 3, 4, rng=0)
    policy, twist = task.policy(), task.twist(noise=0.3, rng=1)
    with pytest.raises(
        ValueError,
        match=r"^bound: observed a reward exp\(7\d\d\.\d+\) x the bound C = 9\.99989e-321; rejection "
        r"sampling needs C >= sup r$",
    ):
        tiltsmc.rejection(policy, twist, bound=1e-320, max_tries=64, rng=0)
    with pytest.raises(
        ValueError, match=r"^bound: observed a reward \d(\.\d+)?e\+\d+ x the bound C = 1e-300;"
    ):
        tiltsmc.rejection(policy, twist, bound=1e-300, max_tries=64, rng=0)


# ----------------------------------------------------------------------------------------------------------
# 6. best-of-n


def best_of_n_law(task: MarkovDFATask, n: int) -> np.ndarray:
    """Law of the returned sequence: the first of ``n`` iid draws of ``p`` with the largest reward.

    ``x`` is returned iff some draw ``k`` equals ``x``, the draws before it have ``r < r(x)`` and those after
    ``r <= r(x)``: ``P(x) = p(x) sum_{k=1..n} F_<(r(x))^(k-1) F_<=(r(x))^(n-k)``.
    """
    _, log_p, log_r = task.enumerate_sequences()
    p = np.exp(log_p)
    below = np.array([p[log_r < lr].sum() for lr in log_r])
    at_most = np.array([p[log_r <= lr].sum() for lr in log_r])
    return p * sum(below ** (k - 1) * at_most ** (n - k) for k in range(1, n + 1))


def test_best_of_n_law_and_estimate() -> None:
    task = tilted(MarkovDFATask.random(2, 4, 4, rng=808))
    B, n = 20000, 4
    res = tiltsmc.best_of_n(task.policy(), task.unguided(), prompts=[()] * B, n=n, rng=34)
    samples = stacked(res)
    assert samples.shape == (B, task.horizon)
    assert np.all(task.sequence_log_prob(samples) > -np.inf)
    law = best_of_n_law(task, n)
    assert math.isclose(law.sum(), 1.0, rel_tol=1e-12)
    assert_counts_match(np.bincount(seq_index(samples, 2), minlength=16), law, "best_of_n")
    # log_z: log of the mean reward of the n draws, unbiased for Z in the natural scale.
    assert_unbiased(res.log_z, task.exact_log_z(), "best_of_n log_z")
    # every sample's reward is at least the mean reward of its own n draws
    assert np.all(task.sequence_log_reward(samples) >= res.log_z - 1e-12)
    # best of 4 beats best of 1 (plain draws of p) on average: reward sd is at most max r, 5 se apart
    one = stacked(tiltsmc.best_of_n(task.policy(), task.unguided(), prompts=[()] * B, n=1, rng=35))
    r4, r1 = np.exp(task.sequence_log_reward(samples)), np.exp(task.sequence_log_reward(one))
    gap = float(np.sum(law * np.exp(task.enumerate_sequences()[2]))) - math.exp(task.exact_log_z())
    assert gap > 10 * math.sqrt(2.0 / B)  # a real gap (the bound on the se of the difference below)
    assert r4.mean() - r1.mean() > gap - Z_SIGMA * math.sqrt((r4.var() + r1.var()) / B)


# ----------------------------------------------------------------------------------------------------------
# 7. needle


def test_needle_unguided_collapses_exact_twist_finds_it() -> None:
    task = MarkovDFATask.needle(4, 10, rng=3)  # one accepted string among 4**10 ~ 1e6
    B, N = 8, 16
    res = tiltsmc.smc(task.policy(), task.unguided(), prompts=[()] * B, num_particles=N, rng=36)
    # P(any of the B * N = 128 particles hits the needle) = 128 / 4**10 ~ 1e-4
    assert res.collapsed.all()
    assert np.all(res.log_z == -np.inf)
    assert np.all(res.ess[:, -1] == 0)
    assert res.collapse_warnings() and len(res.collapse_warnings()) == B
    json.loads(res.to_json())

    for sampler in ("smc", "sp_gsmc"):
        if sampler == "smc":
            good = tiltsmc.smc(
                task.policy(), task.twist(), prompts=[()] * B, num_particles=N, proposal="optimal", rng=37
            )
        else:
            good = tiltsmc.sp_gsmc(task.policy(), task.twist(), prompts=[()] * B, pool_size=None, rng=38)
        assert not good.collapsed.any()
        for b in range(B):
            assert np.all(task.sequence_log_reward(good.samples[b]) == 0.0)  # r = 1 on the needle only
        np.testing.assert_allclose(good.log_z, -10 * math.log(4), rtol=1e-12)

    pool = tiltsmc.sp_gsmc(task.policy(), task.unguided(), prompts=[()] * B, pool_size=4, rng=39)
    assert pool.collapsed.all() and np.all(pool.log_z == -np.inf)
    best = tiltsmc.best_of_n(task.policy(), task.unguided(), prompts=[()] * B, n=N, rng=40)
    assert best.collapsed.all() and np.all(best.log_z == -np.inf)
    chain = tiltsmc.mh(task.policy(), task.unguided(), prompts=[()] * B, pool_size=4, steps=3, rng=41)
    assert chain.collapsed.all() and np.all(chain.log_z == -np.inf)
    assert chain.acceptance_rate is not None and np.all(chain.acceptance_rate == 0)


# ----------------------------------------------------------------------------------------------------------
# 8. bad input


class RewardOnly:
    """A reward model without a twist head (no ``next_log_values``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def initial_log_value(self, particles: Any) -> Any:
        return self.inner.initial_log_value(particles)

    def log_value(self, particles: Any) -> Any:
        return self.inner.log_value(particles)


class Broken(RewardOnly):
    """A reward model that returns ``bad`` values or shapes from ``log_value`` (or ``initial_log_value``)."""

    def __init__(self, inner: Any, mode: str) -> None:
        super().__init__(inner)
        self.mode = mode

    def initial_log_value(self, particles: Any) -> Any:
        value = np.asarray(self.inner.initial_log_value(particles))
        if self.mode == "initial_shape":
            return value[:, None]
        if self.mode == "initial_nan":
            return np.full_like(value, np.nan)
        return value

    def log_value(self, particles: Any) -> Any:
        value = np.array(self.inner.log_value(particles))
        if self.mode == "nan":
            value[0, 0] = np.nan
        elif self.mode == "posinf":
            value[-1, -1] = np.inf
        elif self.mode == "shape":
            value = value[:, :-1]
        elif self.mode == "flat":
            value = value.ravel()
        return value


@pytest.fixture(scope="module")
def small_task() -> MarkovDFATask:
    return MarkovDFATask.random(3, 3, 3, rng=909)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_particles": 0}, ValueError, "num_particles"),
        ({"num_particles": -3}, ValueError, "num_particles"),
        ({"num_particles": 2.5}, TypeError, "num_particles"),
        ({"num_particles": "8"}, TypeError, "num_particles"),
        ({"num_particles": True}, TypeError, "num_particles"),
        ({"resample": "bogus"}, ValueError, "resample"),
        ({"resample": None}, ValueError, "resample"),
        ({"proposal": "greedy"}, ValueError, "proposal"),
        ({"ess_threshold": -0.1}, ValueError, "ess_threshold"),
        ({"ess_threshold": 1.5}, ValueError, "ess_threshold"),
        ({"ess_threshold": float("nan")}, ValueError, "ess_threshold"),
        ({"rng": True}, TypeError, "rng"),
    ],
)
def test_smc_rejects_bad_arguments(
    small_task: MarkovDFATask, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tiltsmc.smc(small_task.policy(), small_task.twist(), **kwargs)


def test_optimal_proposal_needs_twist_head(small_task: MarkovDFATask) -> None:
    reward_only = RewardOnly(small_task.twist())
    with pytest.raises(ValueError, match="optimal"):
        tiltsmc.smc(small_task.policy(), reward_only, proposal="optimal")
    with pytest.raises(ValueError, match="optimal"):
        tiltsmc.sp_gsmc(small_task.policy(), reward_only, pool_size=None)
    with pytest.raises(ValueError, match="optimal"):
        tiltsmc.mh(small_task.policy(), reward_only, pool_size=None)
    # the naive proposal only needs a RewardModel
    res = tiltsmc.smc(small_task.policy(), reward_only, prompts=[()] * 2, num_particles=8, rng=0)
    assert res.log_z.shape == (2,)


class Forwarding:
    """A user's wrapper (logging, say) that forwards every member to the model it wraps through
    ``__getattr__``: it implements whatever that model implements."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    "sampler", [("smc", {"proposal": "optimal"}), ("smc", {}), ("sp_gsmc", {"pool_size": None})]
)
def test_a_wrapper_that_forwards_through_getattr_is_the_model_it_wraps(
    small_task: MarkovDFATask, sampler: tuple[str, dict[str, Any]]
) -> None:
    """On every Python: from 3.12 on, ``isinstance`` against a runtime-checkable protocol misses members a
    wrapper forwards (it looks them up statically), and the samplers refused such a policy and reward
    model that Python 3.11 accepted. The result is the wrapped models' own, bitwise."""
    name, options = sampler
    run = getattr(tiltsmc, name)
    wrapped = run(Forwarding(small_task.policy()), Forwarding(small_task.twist()), rng=5, **options)
    direct = run(small_task.policy(), small_task.twist(), rng=5, **options)
    np.testing.assert_array_equal(wrapped.log_z, direct.log_z)
    np.testing.assert_array_equal(wrapped.samples[0], direct.samples[0])
    np.testing.assert_array_equal(wrapped.log_weights[0], direct.log_weights[0])
    with pytest.raises(ValueError, match="optimal"):  # what the wrapped reward model lacks, it lacks too
        tiltsmc.smc(
            Forwarding(small_task.policy()), Forwarding(RewardOnly(small_task.twist())), proposal="optimal"
        )


@pytest.mark.parametrize("protocol", ["Policy", "TokenPolicy", "RewardModel", "TwistModel"])
def test_each_protocol_check_asks_for_the_protocols_members(protocol: str) -> None:
    """``is_policy`` and the other checks the samplers use in place of ``isinstance`` ask for exactly the
    members the protocol declares: a class with all of them passes both, one without any one fails both."""
    from tiltsmc.models import protocols

    cls = getattr(protocols, protocol)
    check = getattr(protocols, "is_" + "".join("_" + c.lower() if c.isupper() else c for c in protocol)[1:])
    methods = {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}
    attributes = {name for base in cls.__mro__ for name in getattr(base, "__annotations__", {})}
    assert methods and methods.isdisjoint(attributes)

    def made(leaving_out: str = "") -> Any:
        members: dict[str, Any] = {name: (lambda self, *args: None) for name in methods - {leaving_out}}
        members.update({name: 0 for name in attributes - {leaving_out}})
        return type("Made", (), members)()

    assert check(made()) and isinstance(made(), cls)
    for name in sorted(methods | attributes):
        assert not check(made(name)) and not isinstance(made(name), cls), name


def test_pool_size_none_without_a_twist_head_is_refused_naming_pool_size(small_task: MarkovDFATask) -> None:
    # neither sp_gsmc nor mh has a proposal argument: the message names the option that asked for it
    reward_only = RewardOnly(small_task.twist())
    match = r"^pool_size: None \(the exact form: each token drawn from the optimal proposal.*twist head"
    with pytest.raises(ValueError, match=match):
        tiltsmc.sp_gsmc(small_task.policy(), reward_only, pool_size=None)
    with pytest.raises(ValueError, match=match):
        tiltsmc.mh(small_task.policy(), reward_only, pool_size=None)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_particles": 1, "resample": "bad"}, ValueError, "^resample:"),
        ({"num_particles": 1, "ess_threshold": 5}, ValueError, "^ess_threshold:"),
        ({"num_particles": 1, "ess_threshold": "0.5"}, TypeError, "^ess_threshold:"),
        ({"num_particles": 4, "pool_size": -3}, ValueError, "^pool_size:"),
        ({"num_particles": 4, "pool_size": 2.5}, TypeError, "^pool_size:"),
    ],
)
def test_mh_checks_every_option_whichever_proposal_it_runs(
    small_task: MarkovDFATask, kwargs: dict[str, Any], error: type, match: str
) -> None:
    generator = np.random.default_rng(0)
    state = generator.bit_generator.state
    with pytest.raises(error, match=match):
        tiltsmc.mh(small_task.policy(), small_task.twist(), steps=1, rng=generator, **kwargs)
    assert generator.bit_generator.state == state  # refused before any draw


def test_every_sampler_refuses_an_empty_prompt_list_and_reads_none_as_one_promptless_run(
    small_task: MarkovDFATask,
) -> None:
    seen: list[Any] = []

    class Recording(MarkovPolicy):
        def start(self, prompts: Any, num_particles: int) -> Any:
            seen.append(prompts)
            return super().start(prompts, num_particles)

    policy, twist = Recording(small_task), small_task.twist()
    samplers = (tiltsmc.smc, tiltsmc.sp_gsmc, tiltsmc.mh, tiltsmc.best_of_n, tiltsmc.rejection)
    for sampler in samplers:
        generator = np.random.default_rng(0)
        state = generator.bit_generator.state
        with pytest.raises(ValueError, match=r"^prompts: expected at least one prompt"):
            sampler(policy, twist, prompts=[], rng=generator)
        assert generator.bit_generator.state == state and not seen  # refused before the policy starts
    for sampler in samplers:
        seen.clear()
        result = sampler(policy, twist, rng=0)
        assert result.num_prompts == 1 and seen and all(prompts is None for prompts in seen), sampler


def test_a_markov_prompt_that_is_not_an_empty_sequence_is_refused_naming_it(
    small_task: MarkovDFATask,
) -> None:
    policy, twist = small_task.policy(), small_task.twist()
    with pytest.raises(ValueError, match=r"^prompts: prompt 1: .*expected an empty sequence, got float64"):
        tiltsmc.smc(policy, twist, prompts=[(), np.float64(2.0)], num_particles=4, rng=0)
    with pytest.raises(ValueError, match=r"^prompts: prompt 2: .*got 1 tokens"):
        tiltsmc.smc(policy, twist, prompts=[None, (), [3]], num_particles=4, rng=0)
    with tiltsmc.Engine(policy, twist) as engine:  # a request's prompt is prompt 0 of its run
        futures = {p: engine.submit(p, "smc", num_particles=4, rng=1) for p in (5, 1.5, None, ())}
        for bad in (5, 1.5):
            with pytest.raises(ValueError, match=r"^prompts: prompt 0: .*expected an empty sequence, got"):
                futures[bad].result(timeout=30)
        # a None prompt is the empty prompt, as for the ONNX policies
        empty, none = futures[()].result(timeout=30), futures[None].result(timeout=30)
    np.testing.assert_array_equal(none.samples[0], empty.samples[0])
    offline = [tiltsmc.smc(policy, twist, prompts=[p], num_particles=4, rng=0) for p in (None, ())]
    np.testing.assert_array_equal(offline[0].samples[0], offline[1].samples[0])


def test_non_models_rejected(small_task: MarkovDFATask) -> None:
    with pytest.raises(TypeError, match="policy"):
        tiltsmc.smc(object(), small_task.twist())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reward"):
        tiltsmc.smc(small_task.policy(), object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sampler", "mode"),
    [
        (sampler, mode)
        for sampler in ("smc", "sp_gsmc", "mh", "best_of_n", "rejection")
        for mode in ("nan", "posinf", "shape", "flat", "initial_shape", "initial_nan")
        # best_of_n and rejection never ask for Vh_0: they score finished trajectories only
        if not (sampler in ("best_of_n", "rejection") and mode.startswith("initial"))
    ],
)
def test_broken_reward_model_raises(small_task: MarkovDFATask, sampler: str, mode: str) -> None:
    policy, broken = small_task.policy(), Broken(small_task.twist(), mode)
    prompts = [()] * 3
    with pytest.raises(ValueError, match="reward"):
        if sampler == "smc":
            tiltsmc.smc(policy, broken, prompts=prompts, num_particles=4, rng=0)
        elif sampler == "sp_gsmc":
            tiltsmc.sp_gsmc(policy, broken, prompts=prompts, pool_size=4, rng=0)
        elif sampler == "mh":
            tiltsmc.mh(policy, broken, prompts=prompts, pool_size=4, steps=2, rng=0)
        elif sampler == "best_of_n":
            tiltsmc.best_of_n(policy, broken, prompts=prompts, n=4, rng=0)
        else:
            tiltsmc.rejection(policy, broken, prompts=prompts, bound=10.0, rng=0)


def test_other_samplers_reject_bad_arguments(small_task: MarkovDFATask) -> None:
    policy, twist = small_task.policy(), small_task.twist()
    with pytest.raises(ValueError, match="steps"):
        tiltsmc.mh(policy, twist, steps=-1)
    with pytest.raises(TypeError, match="steps"):
        tiltsmc.mh(policy, twist, steps=2.0)
    with pytest.raises(ValueError, match="pool_size"):
        tiltsmc.mh(policy, twist, pool_size=0)
    with pytest.raises(ValueError, match="num_particles"):
        tiltsmc.mh(policy, twist, num_particles=0)
    with pytest.raises(ValueError, match="resample"):
        tiltsmc.mh(policy, twist, num_particles=4, resample="bogus")
    with pytest.raises(ValueError, match="pool_size"):
        tiltsmc.sp_gsmc(policy, twist, pool_size=0)
    with pytest.raises(TypeError, match="pool_size"):
        tiltsmc.sp_gsmc(policy, twist, pool_size=1.5)
    for bound in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bound"):
            tiltsmc.rejection(policy, twist, bound=bound)
    with pytest.raises(ValueError, match="num_samples"):
        tiltsmc.rejection(policy, twist, bound=1.0, num_samples=0)
    with pytest.raises(ValueError, match="max_tries"):
        tiltsmc.rejection(policy, twist, bound=1.0, max_tries=0)
    with pytest.raises(ValueError, match=r"^n:"):
        tiltsmc.best_of_n(policy, twist, n=0)
    with pytest.raises(ValueError, match="prompts"):
        tiltsmc.smc(policy, twist, prompts=[])
    with pytest.raises(ValueError, match="prompts"):
        tiltsmc.smc(policy, twist, prompts=[(1, 2)])


# numpy's allocator met these: "array is too big" (2**62) or a MemoryError naming nothing (2**40), at the
# policy's start or, for final_resample, after the whole run
HUGE_SIZES = [
    ("smc", {"num_particles": 2**40}, "num_particles", "particles"),
    ("smc", {"num_particles": 2**62}, "num_particles", "particles"),
    ("smc", {"num_particles": 4, "final_resample": 2**62}, "final_resample", "samples"),
    ("sp_gsmc", {"pool_size": 2**62}, "pool_size", "candidates"),
    ("mh", {"pool_size": 2**62, "steps": 1}, "pool_size", "candidates"),
    ("mh", {"num_particles": 2**62, "steps": 1}, "num_particles", "particles"),
    ("best_of_n", {"n": 2**62}, "n", "draws"),
    ("rejection", {"bound": 1.0, "batch_size": 2**40, "max_tries": 2**41}, "batch_size", "draws a round"),
    ("rejection", {"bound": 1.0, "batch_size": 2**41, "max_tries": 2**40}, "max_tries", "draws a round"),
]


@pytest.mark.parametrize(("sampler", "kwargs", "name", "rows"), HUGE_SIZES)
def test_sizes_that_cannot_be_allocated_are_refused_before_any_draw(
    small_task: MarkovDFATask, sampler: str, kwargs: dict[str, Any], name: str, rows: str
) -> None:
    generator = np.random.default_rng(0)
    state = generator.bit_generator.state
    match = rf"^{name}: 2 prompt\(s\) x \d+ {rows} \(16 bytes each\) need at least \S+ bytes of memory, more "
    with pytest.raises(ValueError, match=match):
        getattr(tiltsmc, sampler)(
            small_task.policy(), small_task.twist(), prompts=[(), ()], rng=generator, **kwargs
        )
    assert generator.bit_generator.state == state


def test_the_size_bound_is_the_memory_available(small_task: MarkovDFATask, monkeypatch: Any) -> None:
    """Refused where the rows' least memory (16 bytes each) is more than ``available_memory`` reads, or than
    numpy's largest array where that cannot be read; smaller sizes run."""
    from tiltsmc import _memory

    policy, twist = small_task.policy(), small_task.twist()
    monkeypatch.setattr(_memory, "available_memory", lambda: 2**20)
    refused = r"^num_particles: 2 prompt\(s\) x 65536 particles .* 2\.1e\+06 bytes of memory, more than the "
    with pytest.raises(ValueError, match=refused + r"1e\+06 available$"):
        tiltsmc.smc(policy, twist, prompts=[(), ()], num_particles=2**16, rng=0)
    assert tiltsmc.smc(policy, twist, prompts=[(), ()], num_particles=8, rng=0).log_z.shape == (2,)
    monkeypatch.setattr(_memory, "available_memory", lambda: None)
    with pytest.raises(ValueError, match=r"^n: .* more than any array can hold \(9\.2e\+18\)$"):
        tiltsmc.best_of_n(policy, twist, n=2**62, rng=0)


# ----------------------------------------------------------------------------------------------------------
# 9. determinism and serialisation


def _run_all(task: MarkovDFATask, rng: Any) -> list[Any]:
    policy, twist = task.policy(), task.twist(0.5, rng=1)
    prompts = [()] * 3
    return [
        tiltsmc.smc(policy, twist, prompts=prompts, num_particles=8, rng=rng),
        tiltsmc.smc(policy, twist, prompts=prompts, num_particles=8, proposal="optimal", rng=rng),
        tiltsmc.sp_gsmc(policy, twist, prompts=prompts, pool_size=3, rng=rng),
        tiltsmc.sp_gsmc(policy, twist, prompts=prompts, pool_size=None, rng=rng),
        tiltsmc.mh(policy, twist, prompts=prompts, pool_size=3, steps=4, rng=rng),
        tiltsmc.mh(policy, twist, prompts=prompts, steps=4, num_particles=4, rng=rng),
        tiltsmc.rejection(policy, twist, prompts=prompts, bound=1.0, num_samples=3, rng=rng),
        tiltsmc.best_of_n(policy, twist, prompts=prompts, n=4, rng=rng),
    ]


def _same(a: Any, b: Any) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.samples, b.samples)) and np.array_equal(
        a.log_z, b.log_z
    )


def test_determinism(small_task: MarkovDFATask) -> None:
    first, second = _run_all(small_task, 2024), _run_all(small_task, 2024)
    for a, b in zip(first, second):
        assert _same(a, b), a.sampler
        assert all(np.array_equal(x, y) for x, y in zip(a.log_weights, b.log_weights))
    # a Generator in the same state gives the same run as the int seed it came from
    from_gen = _run_all(small_task, np.random.default_rng(2024))
    again = _run_all(small_task, np.random.default_rng(2024))
    assert all(_same(a, b) for a, b in zip(from_gen, again))
    other = _run_all(small_task, 2025)
    assert not all(_same(a, b) for a, b in zip(first, other))


def test_to_json(small_task: MarkovDFATask) -> None:
    keys = {
        "sampler",
        "samples",
        "log_weights",
        "log_z",
        "ess",
        "resampled",
        "unique_ancestors",
        "log_z_increments",
        "collapsed",
        "compute",
    }
    for res in _run_all(small_task, 5):
        record = json.loads(res.to_json())
        assert keys <= set(record), res.sampler
        assert record == json.loads(json.dumps(res.to_dict()))
        assert record["sampler"] == res.sampler
        assert len(record["samples"]) == res.num_prompts
        assert record["log_z"] == pytest.approx(res.log_z.tolist())
        assert {"policy_steps", "total_seconds"} <= set(record["compute"])
        if res.sampler == "mh":
            assert "acceptance_rate" in record
        if res.sampler == "rejection":
            assert record["tries"] == res.tries.tolist()

    # strict JSON: -inf (a zero weight, a collapsed run) and NaN acceptance rates are null, never strings
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in strict JSON")

    needle = MarkovDFATask.needle(4, 8, rng=4)
    res = tiltsmc.smc(needle.policy(), needle.unguided(), prompts=[()] * 2, num_particles=4, rng=6)
    record = json.loads(res.to_json(), parse_constant=refuse)
    assert record["log_z"] == [None, None] and res.collapsed.all()
    assert all(w is None for weights in record["log_weights"] for w in weights)
    res = tiltsmc.mh(small_task.policy(), small_task.twist(), prompts=[()] * 2, pool_size=2, steps=0, rng=6)
    assert json.loads(res.to_json(), parse_constant=refuse)["acceptance_rate"] == [None, None]


# ----------------------------------------------------------------------------------------------------------
# 10. diagnostics


@pytest.mark.parametrize("proposal", ["naive", "optimal"])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_smc_diagnostics(sparse_task: MarkovDFATask, threshold: float, proposal: str) -> None:
    task = sparse_task
    B, N, T = 50, 6, task.horizon
    twist = task.twist(0.8, rng=40)
    res = tiltsmc.smc(
        task.policy(),
        twist,
        prompts=[()] * B,
        num_particles=N,
        ess_threshold=threshold,
        proposal=proposal,
        rng=41,
        record_ancestry=True,
    )
    assert res.sampler == "smc" and res.num_prompts == B
    for name in ("ess", "resampled", "unique_ancestors", "log_z_increments"):
        assert getattr(res, name).shape == (B, T), name
    assert res.log_z.shape == (B,) and res.collapsed.shape == (B,)
    assert all(np.shape(s) == (N, T) for s in res.samples)
    assert all(lw.shape == (N,) for lw in res.log_weights)

    live = ~res.collapsed
    ess = res.ess
    ok = ((ess >= 1 - 1e-9) & (ess <= N + 1e-9)) | (ess == 0)
    assert ok.all()
    # a run's ESS is 0 from the step it collapses on, and only then
    assert np.all(ess[live] > 0)
    assert np.all(res.collapsed == (ess[:, -1] == 0))
    # normalised weights of the runs that did not collapse
    for b in np.flatnonzero(live):
        assert abs(float(_lse(res.log_weights[b]))) < 1e-12
    # log_z = log Vh_0 + sum of the per-step increments
    np.testing.assert_allclose(
        res.log_z[live], twist.tables[0] + res.log_z_increments[live].sum(axis=1), atol=1e-9
    )
    assert np.all(res.log_z[res.collapsed] == -np.inf)

    if threshold == 1.0:
        assert np.all(res.resampled[live][:, :-1])
    elif threshold == 0.0:
        assert not res.resampled.any()
    else:
        np.testing.assert_array_equal(res.resampled[live][:, :-1], (ess < threshold * N)[live][:, :-1])
    assert not res.resampled[:, -1].any()  # never after the last step
    assert np.all(res.resampled[res.ess == 0] == False)  # noqa: E712
    uniq = res.unique_ancestors
    assert np.all(uniq[~res.resampled] == N)
    assert np.all((uniq[res.resampled] >= 1) & (uniq[res.resampled] <= N))
    assert res.ancestry is not None and res.ancestry.shape == (B, T, N)
    assert np.all((res.ancestry >= 0) & (res.ancestry < N))
    identity = np.arange(N)
    assert np.all(res.ancestry[~res.resampled] == identity)
    distinct = np.array([[len(np.unique(row)) for row in rows] for rows in res.ancestry])
    np.testing.assert_array_equal(uniq, distinct)
    # Survivors keep their own slot: wherever i is an ancestor, slot i holds i.
    for rows in res.ancestry:
        for row in rows:
            np.testing.assert_array_equal(row[np.unique(row)], np.unique(row))

    c = res.compute
    assert c.policy_steps == B * N * T
    assert c.policy_calls == T and c.reward_calls == T
    if proposal == "naive":
        assert c.reward_evaluations == B * N * T
    else:
        assert c.reward_evaluations == B * N * T * task.vocab_size
    assert c.total_seconds > 0 and c.policy_seconds >= 0 and c.reward_seconds >= 0
    assert 0 <= c.bookkeeping_seconds <= c.total_seconds


def test_other_sampler_diagnostics(small_task: MarkovDFATask) -> None:
    task = small_task
    B, T, K = 7, task.horizon, 5
    res = tiltsmc.sp_gsmc(task.policy(), task.twist(0.3, rng=1), prompts=[()] * B, pool_size=K, rng=42)
    assert all(np.shape(s) == (1, T) for s in res.samples)
    assert res.ess.shape == (B, T) and np.all((res.ess >= 1 - 1e-9) & (res.ess <= K + 1e-9))
    assert res.resampled.all() and np.all(res.unique_ancestors == 1)
    assert res.compute.policy_steps == B * K * T

    res = tiltsmc.mh(task.policy(), task.twist(0.3, rng=1), prompts=[()] * B, pool_size=K, steps=3, rng=43)
    assert all(np.shape(s) == (1, T) for s in res.samples)
    assert res.compute.policy_steps == 4 * B * K * T  # the initial run and one per step

    res = tiltsmc.best_of_n(task.policy(), task.unguided(), prompts=[()] * B, n=K, rng=44)
    assert all(np.shape(s) == (1, T) for s in res.samples)
    assert res.compute.policy_steps == B * K * T and res.compute.reward_evaluations == B * K


def _survivors_stay_reference(ancestors: np.ndarray) -> np.ndarray:
    """keep_survivors in numpy: survivors in their slots, extra copies into the dead slots, in order."""
    batch, count = ancestors.shape
    row_starts = np.arange(0, batch * count, count, dtype=np.int64)[:, None]
    children = np.bincount((ancestors + row_starts).ravel(), minlength=batch * count)
    slots = np.arange(batch * count, dtype=np.int64)
    slots[children == 0] = np.repeat(slots, np.maximum(children - 1, 0))
    return slots.reshape(batch, count) - row_starts


def test_keep_survivors_keeps_offspring_counts() -> None:
    """Same children per particle as the ancestors (ascending or shuffled), every survivor in its own
    slot, the dead slots filled in order; equal to the numpy reference; the input left as it was."""
    rng = np.random.default_rng(17)
    for _ in range(300):
        n, rows = int(rng.integers(1, 13)), int(rng.integers(1, 4))
        weights = rng.integers(0, 6, size=(rows, n)).astype(np.float64)
        weights[:, rng.integers(0, n)] += 1.0  # a positive weight in every row
        with np.errstate(divide="ignore"):
            ancestors = tiltsmc.core.resample(np.log(weights), rng=rng)
        if rng.random() < 0.5:
            ancestors = rng.permuted(ancestors, axis=1)
        before_call = ancestors.copy()
        arranged = tiltsmc.core.keep_survivors(ancestors)
        np.testing.assert_array_equal(ancestors, before_call)
        np.testing.assert_array_equal(arranged, _survivors_stay_reference(ancestors))
        for before, after in zip(ancestors, arranged):
            np.testing.assert_array_equal(np.bincount(after, minlength=n), np.bincount(before, minlength=n))
            survivors = np.unique(before)
            np.testing.assert_array_equal(after[survivors], survivors)
            dead = np.setdiff1d(np.arange(n), survivors)
            assert np.all(np.diff(after[dead]) >= 0)  # extra copies in ascending parent order


@pytest.mark.parametrize("value", [np.complex128(0.5 + 1j), np.complex64(0.5)])
def test_complex_numbers_are_not_real_options(value: Any) -> None:
    """``rejection``'s ``bound`` and SMC's ``ess_threshold`` refuse a numpy complex (its imaginary part was
    dropped with a ComplexWarning, the run went on)."""
    task = MarkovDFATask.random(2, 2, 2, rng=0)
    with pytest.raises(TypeError, match="bound: expected a finite bound"):
        tiltsmc.rejection(task.policy(), task.twist(), bound=value, rng=0)
    with pytest.raises(TypeError, match="ess_threshold: expected a fraction"):
        tiltsmc.smc(task.policy(), task.twist(), ess_threshold=value, rng=0)
