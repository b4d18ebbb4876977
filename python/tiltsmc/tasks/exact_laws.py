"""Exact laws on enumerable tasks: what the samplers draw and what they target, by enumeration.

The references of the paper's theorems as tests (``tests/test_fidelity.py``) and as an experiment
(``bench/exp_theorems.py``): everything is computed from the raw parameters of a
[`MarkovDFATask`][tiltsmc.tasks.markov_dfa.MarkovDFATask] (initial law, transitions, DFA, rewards) and the
twist's tables, never through the samplers. Laws are dicts from sequences (tuples of token ids) to
probabilities.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from .markov_dfa import MarkovDFATask

__all__ = [
    "positive_reward_task",
    "prefix_value",
    "smc_output_law",
    "sp_gsmc_laws",
    "step_probs",
    "target_law",
    "theorem_5_1_bound",
    "total_variation",
]


def prefix_value(task: MarkovDFATask, tables: list[Any], prefix: tuple[int, ...]) -> float:
    """``Vh_t(prefix)`` in the natural scale from the raw DFA (``t = len(prefix)``)."""
    if not prefix:
        return math.exp(float(tables[0]))
    q = task.start
    for v in prefix:
        q = int(task.dfa[q, v])
    return math.exp(float(np.asarray(tables[len(prefix)])[prefix[-1], q]))


def step_probs(task: MarkovDFATask, prefix: tuple[int, ...]) -> np.ndarray:
    """``p(. | prefix)`` from the raw parameters."""
    if not prefix:
        return np.asarray(task.init, dtype=float)
    trans = np.asarray(task.trans)
    return np.asarray((trans if trans.ndim == 2 else trans[len(prefix) - 1])[prefix[-1]], dtype=float)


def total_variation(first: dict[Any, float], second: dict[Any, float]) -> float:
    """``0.5 sum_x |first(x) - second(x)|`` over the union of the two supports."""
    return 0.5 * sum(abs(first.get(k, 0.0) - second.get(k, 0.0)) for k in set(first) | set(second))


def sp_gsmc_laws(task: MarkovDFATask, tables: list[Any]) -> list[tuple[dict[Any, float], dict[Any, float]]]:
    """Per step t: (law of exact SP-gSMC's prefix, pi_t ∝ p Vh_t), both over every prefix of length t."""
    out = []
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for t in range(1, task.horizon + 1):
        nxt: dict[tuple[int, ...], float] = {}
        for prefix, mass in law.items():
            probs = step_probs(task, prefix)
            joint = np.array(
                [probs[w] * prefix_value(task, tables, (*prefix, w)) for w in range(task.vocab_size)]
            )
            for w in np.flatnonzero(joint > 0):
                nxt[(*prefix, int(w))] = mass * joint[w] / joint.sum()
        law = nxt
        target = {
            s: math.prod(step_probs(task, s[:k])[s[k]] for k in range(t)) * prefix_value(task, tables, s)
            for s in itertools.product(range(task.vocab_size), repeat=t)
        }
        total = sum(target.values())
        out.append((law, {s: v / total for s, v in target.items()}))
    return out


def smc_output_law(task: MarkovDFATask, tables: list[Any], N: int) -> dict[tuple[int, ...], float]:
    """Exact law of Theorem 5.1's algorithm (multinomial resampling of N at every step t < T, one particle
    drawn by weight at T), by enumeration of the particle system as multisets."""
    T = task.horizon
    states: dict[tuple[tuple[int, ...], ...], float] = {((),) * N: 1.0}
    output: dict[tuple[int, ...], float] = {}
    for t in range(1, T + 1):
        nxt: dict[tuple[tuple[int, ...], ...], float] = {}
        for particles, mass in states.items():
            options = []
            for prefix in particles:
                probs = step_probs(task, prefix)
                options.append([(int(w), float(probs[w])) for w in np.flatnonzero(probs > 0)])
            for choice in itertools.product(*options):
                prob = mass * math.prod(p for _, p in choice)
                children = [(*prefix, w) for prefix, (w, _) in zip(particles, choice)]
                weights = np.array(
                    [prefix_value(task, tables, c) / prefix_value(task, tables, c[:-1]) for c in children]
                )
                share: dict[tuple[int, ...], float] = {}  # each distinct child's normalised weight
                for child, weight in zip(children, weights / weights.sum()):
                    share[child] = share.get(child, 0.0) + float(weight)
                if t == T:
                    for child, w in share.items():
                        output[child] = output.get(child, 0.0) + prob * w
                    continue
                distinct = list(share)
                for counts in itertools.product(range(N + 1), repeat=len(distinct)):
                    if sum(counts) != N:
                        continue
                    ways = math.factorial(N) / math.prod(math.factorial(c) for c in counts)
                    p_counts = ways * math.prod(share[d] ** c for d, c in zip(distinct, counts))
                    key = tuple(sorted(d for d, c in zip(distinct, counts) for _ in range(c)))
                    nxt[key] = nxt.get(key, 0.0) + prob * p_counts
        states = nxt
    return output


def target_law(task: MarkovDFATask) -> dict[tuple[int, ...], float]:
    """``pi(x) = p(x) r(x) / Z`` of every sequence of positive mass."""
    sequences, log_p, log_r = task.enumerate_sequences()
    mass = np.exp(log_p + log_r - task.exact_log_z())
    return {tuple(int(v) for v in s): float(m) for s, m in zip(sequences, mass) if m > 0}


def theorem_5_1_bound(L: float, eps: float, T: int, N: int) -> float:
    """``L^6 T (1+eps)^(6(T-1)) / (2N)``: Theorem 5.1's bound on the TV of the output particle to ``pi``
    (``inf`` where it exceeds the doubles)."""
    try:
        return float(L**6 * T * (1 + eps) ** (6 * (T - 1)) / (2 * N))
    except OverflowError:  # a float power beyond the doubles raises (a product gives inf)
        return math.inf


def positive_reward_task(
    seed: int, V: int, T: int, reward_low: float, concentration: float = 30.0
) -> MarkovDFATask:
    """A random task (3 DFA states) with every reward in ``[reward_low, 1]``, so that ``L`` is finite."""
    gen = np.random.default_rng(seed)
    task = MarkovDFATask.random(V, 3, T, rng=gen, concentration=concentration, zero_reward_fraction=0.0)
    reward = reward_low + (1 - reward_low) * gen.random(3)
    return MarkovDFATask(task.init, task.trans, task.dfa, task.start, reward, T)
