"""A token-level twist head in the policy's graph (tiltsmc.models.twist.PolicyTwist) on gpt2-twist-tiny:
consistency of its values, and the optimal proposal and exact SP-gSMC against the target enumerated by
running the ONNX graph itself (no cache, full sequences)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnxruntime as ort
import pytest
import tiltsmc
from exact_counts import assert_counts_match
from tiltsmc.models import OnnxCausalLM, PolicyTwist, PolicyValue

MODELS = Path(__file__).parent / "fixtures" / "models"
TWIST = MODELS / "gpt2-twist-tiny"
VALUE = MODELS / "gpt2-value-tiny"
PROMPT = "10"  # pi / q <= 6 on every sequence (both rewards): the estimators' variance is modest
TOP_K, HORIZON = 3, 3  # at most 3^3 = 27 sequences: every cell of the target is well populated
Z_SIGMA = 5.0


def twist_policy(**options: Any) -> OnnxCausalLM:
    settings: dict[str, Any] = {"max_new_tokens": HORIZON, "top_k": TOP_K}
    settings.update(options)
    return OnnxCausalLM(TWIST, value_output="twist", **settings)


def log_sigmoid(s: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -np.asarray(s, dtype=np.float64))


class Graph:
    """The fixture's graph run on whole sequences from an empty cache: the logits and twist row at the
    last token of a prefix, independently of OnnxCausalLM's cached decoding."""

    def __init__(self) -> None:
        self.session = ort.InferenceSession(str(TWIST / "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = [node.name for node in self.session.get_inputs()]

    def last_rows(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.array([ids], dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        for name in self.inputs:
            if name.startswith("past_key_values"):
                feeds[name] = np.zeros((1, 2, 0, 16), dtype=np.float32)
        logits, twist = self.session.run(["logits", "twist"], feeds)
        return logits[0, -1].astype(np.float64), twist[0, -1].astype(np.float64)


def filtered_log_probs(logits: np.ndarray) -> np.ndarray:
    """``log p(v | prefix)`` of the policy's sampled law: softmax, then top-k, renormalised."""
    log_p = logits - np.logaddexp.reduce(logits)
    kth = np.sort(log_p)[-TOP_K]
    kept = np.where(log_p >= kth, log_p, -np.inf)
    result: np.ndarray = kept - np.logaddexp.reduce(kept[kept > -np.inf])
    return result


class Enumerated:
    """Every sequence ``x`` of the policy (top-k, EOS or ``HORIZON`` tokens) with ``log p(x)``, ``log r(x)``
    (the twist at the last token, or the verifier's), and the exact-SP-gSMC law ``q(x) = prod_t p Vh_t /
    sum_s p Vh_t`` with its deterministic ``log Zh(x) = log Vh_0 + sum_t [log sum_s p Vh_t - log Vh_{t-1}]``
    where ``log Vh_0 = log sum_s p(s | prompt) Vh_1(s)``."""

    def __init__(
        self, prompt_ids: list[int], verifier: Optional[Callable[[Any, str], float]], tokenizer: Any
    ):
        self.graph = Graph()
        self.prompt_ids = prompt_ids
        self.verifier = verifier
        self.tokenizer = tokenizer
        self.log_p: dict[tuple[int, ...], float] = {}
        self.log_r: dict[tuple[int, ...], float] = {}
        self.log_q: dict[tuple[int, ...], float] = {}
        self.log_zh: dict[tuple[int, ...], float] = {}
        self.log_v0 = 0.0
        self._walk((), 0.0, 0.0, 0.0, 0.0)
        keys = list(self.log_p)
        self.keys = keys
        joint = np.array([self.log_p[k] + self.log_r[k] for k in keys])
        self.log_z = float(np.logaddexp.reduce(joint))
        self.pi = np.exp(joint - self.log_z)
        self.q = np.exp(np.array([self.log_q[k] for k in keys]))

    def _log_values(self, prefix: tuple[int, ...], row: np.ndarray) -> np.ndarray:
        values = log_sigmoid(row)
        if self.verifier is None:
            return values
        for v in range(len(values)):
            if v == 0 or len(prefix) + 1 == HORIZON:
                text = self.tokenizer.decode(np.array([*prefix, v], dtype=np.int64))
                reward = self.verifier(PROMPT, text)
                values[v] = math.log(reward) if reward > 0 else -math.inf
        return values

    def _walk(
        self, prefix: tuple[int, ...], log_p: float, log_q: float, log_zh: float, parent_lv: float
    ) -> None:
        logits, row = self.graph.last_rows(self.prompt_ids + list(prefix))
        lp = filtered_log_probs(logits)
        lv = self._log_values(prefix, row)
        lse = float(np.logaddexp.reduce((lp + lv)[lp > -np.inf]))
        if not prefix:  # the prompt: log Vh_0 = lse, so the first increment lse - log Vh_0 is 0
            self.log_v0 = log_zh = parent_lv = lse
        for v in np.flatnonzero(lp > -np.inf):
            x = (*prefix, int(v))
            step_p, step_q = log_p + lp[v], log_q + lp[v] + lv[v] - lse
            step_zh = log_zh + lse - parent_lv
            if v == 0 or len(x) == HORIZON:
                self.log_p[x], self.log_r[x], self.log_q[x], self.log_zh[x] = step_p, lv[v], step_q, step_zh
            else:
                self._walk(x, step_p, step_q, step_zh, float(lv[v]))


def sequences(res: Any, b: int) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in np.asarray(x)) for x in res.samples[b]]


def assert_measure_matches(res: Any, target: Enumerated, label: str) -> None:
    """``E[Zh sum_i W_i 1{x_i = x}] = Z pi(x)`` for every sequence ``x`` (SMC's unnormalised measure is
    unbiased at any ``N``): over ``B`` independent runs each cell's mean of ``Zh / Z * sum_i W_i 1{x_i = x}``
    is ``pi(x)`` within ``Z_SIGMA`` standard errors (the sample's, floored at the binomial one of one draw
    a run, ``sqrt(pi (1 - pi) / B)``, so that an unvisited cell with ``B pi >~ 25`` fails); and
    ``E[Zh] = Z`` within ``Z_SIGMA`` standard errors of the ratio, which must be < 0.05 (power)."""
    index = {k: j for j, k in enumerate(target.keys)}
    B = len(res.samples)
    cells = np.zeros((B, len(index)))
    ratio = np.exp(np.asarray(res.log_z) - target.log_z)
    for b in range(B):
        weights = np.exp(np.asarray(res.log_weights[b]) - np.logaddexp.reduce(res.log_weights[b]))
        for x, w in zip(sequences(res, b), weights):
            assert x in index, f"{label}: sample {x} is outside the target's support"
            cells[b, index[x]] += ratio[b] * w
    mean = cells.mean(axis=0)
    se = np.maximum(cells.std(axis=0, ddof=1), np.sqrt(target.pi * (1 - target.pi))) / math.sqrt(B)
    bad = np.abs(mean - target.pi) > Z_SIGMA * se
    assert not bad.any(), (
        f"{label}: cells {np.flatnonzero(bad)}: {mean[bad]} vs {target.pi[bad]} +- {se[bad]}"
    )
    ratio_se = float(ratio.std(ddof=1) / math.sqrt(B))
    assert 0 < ratio_se < 0.05, f"{label}: se of Zh / Z {ratio_se:.3g}"
    assert abs(ratio.mean() - 1.0) <= Z_SIGMA * ratio_se, (
        f"{label}: mean Zh / Z {ratio.mean():.4f} +- {ratio_se:.4f}"
    )


def verifier(prompt: Any, text: str) -> float:
    """A terminal reward unlike the twist: by the letters of the text (0 for an empty one)."""
    return 0.0 if not text else 0.1 + (sum(map(ord, text)) % 7) / 7.0


@pytest.mark.slow
@pytest.mark.parametrize("reward_from", ["twist", "verifier", "verifier, sampler's limit"])
def test_optimal_proposal_and_exact_sp_gsmc_against_the_enumerated_target(reward_from: str) -> None:
    """The target ``pi ∝ p r`` with ``r`` the twist at the last token or a verifier's; the length limit
    ``HORIZON`` the policy's own or the sampler's ``max_new_tokens`` (the verifier scores every extension
    at either)."""
    samplers_limit = reward_from.endswith("limit")
    policy = twist_policy(max_new_tokens=HORIZON + 2) if samplers_limit else twist_policy()
    limit = HORIZON if samplers_limit else None
    check = verifier if reward_from.startswith("verifier") else None
    twist = PolicyTwist(policy, kind="logit", verifier=check)
    target = Enumerated(list(policy.encode_prompt(PROMPT)), check, policy.tokenizer)
    assert 5 <= len(target.keys) <= TOP_K**HORIZON
    assert target.pi.max() < 0.9 and np.abs(target.pi - target.q).sum() > 0.01  # not a trivial target
    with np.errstate(invalid="ignore"):  # 0 / 0 where the verifier gives 0
        assert np.nanmax(target.pi / target.q) < 10  # bounded weights: the sample sizes below suffice
    B = 1500 if check is None else 400
    res = tiltsmc.smc(policy, twist, prompts=[PROMPT] * B, num_particles=6, ess_threshold=0.5,
                      proposal="optimal", rng=31, max_new_tokens=limit)  # fmt: skip
    assert_measure_matches(res, target, f"smc optimal ({reward_from})")

    B = 4000 if check is None else 1500
    sp = tiltsmc.sp_gsmc(policy, twist, prompts=[PROMPT] * B, pool_size=None, rng=32, max_new_tokens=limit)
    index = {k: j for j, k in enumerate(target.keys)}
    drawn = [sequences(sp, b)[0] for b in range(B)]
    counts = np.bincount([index[x] for x in drawn], minlength=len(index))
    assert_counts_match(counts, target.q, f"sp_gsmc exact ({reward_from})")
    # the deterministic log Zh(x) of each draw, and its unbiasedness: E_q[Zh] = Z
    expected = np.array([target.log_zh[x] for x in drawn])
    np.testing.assert_allclose(sp.log_z, expected, rtol=0, atol=1e-4)
    exact = float(np.sum(target.q * np.exp(np.array([target.log_zh[k] for k in target.keys]) - target.log_z)))
    assert abs(exact - 1.0) < 1e-6  # sum_x q(x) Zh(x) = Z: exact on the enumeration itself


def test_log_value_is_the_parents_twist_at_the_chosen_token() -> None:
    """``log_value(x v) = next_log_values(x)[v]`` through steps, endings and resampling, and
    ``log Vh_0 = log sum_v p(v) Vh(v)``; both from the policy's own cached runs."""
    policy = twist_policy(max_new_tokens=6, top_k=None)
    twist = PolicyTwist(policy, kind="logit")
    particles = policy.start([PROMPT, "hello"], 5)
    log_v0 = twist.initial_log_value(particles)
    log_p = policy.next_log_probs(particles)[:, 0]
    np.testing.assert_allclose(
        log_v0, np.logaddexp.reduce(log_p + twist.next_log_values(particles)[:, 0], -1)
    )
    np.testing.assert_allclose(twist.log_value(particles), np.repeat(log_v0[:, None], 5, axis=1))
    graph = Graph()
    rng = np.random.default_rng(5)
    for _ in range(6):
        before = twist.next_log_values(particles)
        live = ~particles.finished
        old = twist.log_value(particles)
        tokens = rng.integers(0, policy.vocab_size, size=particles.lengths.shape)
        policy.append(particles, tokens)
        chosen = np.take_along_axis(before, tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(twist.log_value(particles), np.where(live, chosen, old), atol=1e-12)
        # the cached twist row equals the graph's on the whole sequence
        b, i = 1, 2
        if not particles.finished[b, i]:
            ids = list(policy.encode_prompt("hello")) + list(
                particles.tokens[b, i, : particles.lengths[b, i]]
            )
            _, row = graph.last_rows(ids)
            np.testing.assert_allclose(twist.next_log_values(particles)[b, i], log_sigmoid(row), atol=1e-4)
        ancestors = rng.integers(0, 5, size=particles.lengths.shape)
        values = twist.log_value(particles)
        particles.reorder(ancestors)
        np.testing.assert_allclose(twist.log_value(particles), np.take_along_axis(values, ancestors, 1))


def test_twist_head_in_the_engine_and_bad_options() -> None:
    policy = twist_policy(max_new_tokens=5, top_k=None)
    twist = PolicyTwist(policy, kind="log_value", verifier=verifier)
    prompts, counts = [PROMPT, "hello", "z"], [4, 6, 3]
    with tiltsmc.Engine(policy, twist) as engine:
        futures = [
            engine.submit(p, "smc", num_particles=n, proposal="optimal", rng=s)
            for s, (p, n) in enumerate(zip(prompts, counts))
        ]
        served = [f.result(timeout=60) for f in futures]
    for s, (prompt, n) in enumerate(zip(prompts, counts)):
        offline = tiltsmc.smc(policy, twist, prompts=[prompt], num_particles=n, proposal="optimal", rng=s)
        assert served[s].texts == offline.texts
        # float32 graph: a batch joined by left padding differs in the last bits
        np.testing.assert_allclose(served[s].log_z, offline.log_z, atol=1e-5)
    with pytest.raises(ValueError, match="twist head"):
        PolicyTwist(OnnxCausalLM(VALUE, value_output="value"))
    with pytest.raises(ValueError, match="twist head"):
        PolicyValue(policy)
    with pytest.raises(ValueError, match="step='token'"):
        PolicyTwist(OnnxCausalLM(TWIST, value_output="twist", step=[39]))
    with pytest.raises(ValueError, match="kind"):
        PolicyTwist(policy, kind="odds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PolicyTwist reads its own policy"):
        tiltsmc.smc(twist_policy(), twist, prompts=[PROMPT], proposal="optimal")


@pytest.mark.parametrize(
    ("options", "sampler", "expected_options"),
    [
        (["--sampler", "sp-gsmc"], tiltsmc.sp_gsmc, {"pool_size": 16}),
        (["--sampler", "sp-gsmc", "--pool-size", "exact"], tiltsmc.sp_gsmc, {"pool_size": None}),
        (["--sampler", "smc", "--proposal", "optimal", "--particles", "4"], tiltsmc.smc,
         {"proposal": "optimal", "num_particles": 4}),
        (["--sampler", "mh", "--pool-size", "exact", "--mh-steps", "2"], tiltsmc.mh,
         {"pool_size": None, "steps": 2}),
    ],
)  # fmt: skip
def test_cli_reads_a_twist_output_as_a_twist(
    tmp_path: Path, options: list[str], sampler: Callable[..., Any], expected_options: dict[str, Any]
) -> None:
    """``tiltsmc run --value-output twist`` on a twist-head graph runs PolicyTwist: the same samples and
    log Z as the API with the prompt's seed (prompt 0: ``seed``),
    recorded with the options given. ``--pool-size exact`` (SP-gSMC's exact form, MH's SP-gSMC proposals)
    and ``--proposal optimal`` (SMC) are the API's ``pool_size=None`` and ``proposal="optimal"`` (the help
    promised exact SP-gSMC, which no option gave: ``--pool-size`` took only counts)."""
    from tiltsmc.cli import main

    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", str(TWIST), "--value-output", "twist", "--reward-kind", "logit",
            "--max-new-tokens", "3", "--top-k", "3", "--seed", "7", "--prompt", "10", "--json", str(out),
            "-q", *options]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(out.read_text())
    policy = OnnxCausalLM(TWIST, value_output="twist", max_new_tokens=3, top_k=3)
    expected = sampler(
        policy,
        PolicyTwist(policy, kind="logit"),
        ["10"],
        rng=7,
        **expected_options,
    )
    assert record["samples"] == [list(map(int, s)) for s in expected.samples[0]]
    assert math.isclose(record["log_z"], float(expected.log_z[0]), rel_tol=0, abs_tol=1e-9)
    assert {k: record["run"]["options"][k] for k in expected_options} == expected_options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sampler", "sp-gsmc", "--pool-size", "exact"], "--pool-size: exact needs a token-level policy"),
        (["--sampler", "mh", "--pool-size", "exact"], "--pool-size: exact needs a token-level policy"),
        (["--sampler", "smc", "--proposal", "optimal"], "--proposal: optimal needs a token-level policy"),
    ],
)
def test_the_optimal_proposal_without_a_twist_head_is_refused_before_any_prompt_runs(
    tmp_path: Path, options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value head (one score per position) has no next-token values: the optimal forms are refused
    once the models are loaded, with status 2 and one line naming the option, no prompt run or written."""
    from tiltsmc.cli import main

    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", str(VALUE), "--value-output", "value", "--max-new-tokens", "3",
            "--prompt", "10", "--prompt", "11", "--json", str(out), "-q", *options]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tiltsmc: {message}"), err
    assert "twist head (next_log_values)" in err and len(err.splitlines()) == 1, err
    assert not out.exists() or out.read_text() == ""


@pytest.mark.parametrize("value", ["0", "exactly", "Exact", "-1"])
def test_pool_size_takes_a_count_or_exact(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Anything else is refused by argparse (status 2), naming the option and both forms."""
    from tiltsmc.cli import main

    argv = ["run", "--policy", str(TWIST), "--value-output", "twist", "--prompt", "10", "-q",
            "--sampler", "sp-gsmc", "--pool-size", value]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "argument --pool-size: expected an integer >= 1" in err and "(or exact)" in err, err


def test_pool_size_exact_is_refused_where_the_sampler_has_no_pool(capsys: pytest.CaptureFixture[str]) -> None:
    from tiltsmc.cli import main

    argv = ["run", "--policy", str(TWIST), "--value-output", "twist", "--prompt", "10", "-q",
            "--sampler", "smc", "--pool-size", "exact"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "tiltsmc: --pool-size: not an option of --sampler smc (it takes --particles, --resample, "
        "--ess-threshold, --proposal)\n"
    )


@pytest.mark.parametrize("bad", [3, "verify", [verifier]])
def test_a_verifier_that_is_not_callable_is_refused(bad: Any) -> None:
    """Accepted before (``verifier=3``), then failed at the first finished trajectory without a name."""
    with pytest.raises(TypeError, match=r"^verifier: expected a function verifier\(prompt, text\) -> r >= 0"):
        PolicyTwist(twist_policy(), verifier=bad)


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        (
            "1",
            TypeError,
            r"^verifier: returned '1' \(a str\); expected a real number r >= 0",
        ),  # was read as 1
        (
            None,
            TypeError,
            r"^verifier: returned None \(a NoneType\); expected a real number",
        ),  # float() failed
        ([1.0], TypeError, r"^verifier: returned \[1.0\] \(a list\); expected a real number"),
        (np.array([1.0]), TypeError, r"^verifier: returned array\(\[1.\]\) \(a ndarray\); expected a real"),
        (-1.0, ValueError, r"^verifier: returned -1.0 for prompt 0; rewards must be finite and >= 0"),
        (math.nan, ValueError, r"^verifier: returned nan for prompt 0"),
        (math.inf, ValueError, r"^verifier: returned inf for prompt 0"),
    ],
)
def test_a_verifier_must_return_a_real_number(returned: Any, error: type, match: str) -> None:
    policy = twist_policy()
    twist = PolicyTwist(policy, kind="logit", verifier=lambda prompt, text: returned)
    for proposal in ("optimal", "naive"):  # every ending extension, or the finished trajectories
        with pytest.raises(error, match=match):
            tiltsmc.smc(policy, twist, prompts=[PROMPT], num_particles=2, proposal=proposal, rng=0)


@pytest.mark.parametrize("returned", [1, np.float32(0.5), np.int64(1), np.array(0.25), True, np.True_, False])
def test_a_verifiers_real_numbers_and_bools_are_rewards(returned: Any) -> None:
    """Ints and floats of Python or numpy (a 0-d array too) are rewards; a bool is read as 1 or 0 (a
    predicate verifier): the run is that of a verifier returning the same float."""
    policy = twist_policy()
    results = []
    for value in (returned, float(returned)):
        twist = PolicyTwist(policy, kind="logit", verifier=lambda prompt, text, value=value: value)
        results.append(tiltsmc.smc(policy, twist, prompts=[PROMPT], num_particles=2, proposal="naive", rng=0))
    given, plain = results
    assert given.log_z.tolist() == plain.log_z.tolist() and given.texts == plain.texts
    assert bool(given.collapsed[0]) is (float(returned) == 0.0)


def test_a_verifier_with_stop_strings_is_refused_and_without_one_the_twist_is_the_terminal_reward() -> None:
    """A token that completes a stop string ends the trajectory, as an EOS does: with a verifier,
    ``next_log_values`` kept the twist at that token where ``log_value`` of the extended trajectory gave the
    verifier's ``log r`` (the optimal proposal and exact SP-gSMC then targeted another law). Telling which
    tokens complete one would decode the whole vocabulary at every step, so the pair is refused; without a
    verifier the twist is the terminal reward and the two agree. The verifier's text at the length limit is
    the results' text."""
    with pytest.raises(ValueError, match=r"^verifier: a PolicyTwist with a verifier .* stop strings \['a'\]"):
        PolicyTwist(twist_policy(stop=["a"]), kind="logit", verifier=lambda prompt, text: 0.5)
    policy = twist_policy(stop=["a"], max_new_tokens=8)
    twist = PolicyTwist(policy, kind="logit")
    particles = policy.start(["hello"], 1)
    a = policy.tokenizer.token_id("a")
    expected = twist.next_log_values(particles)[0, 0, a]
    policy.append(particles, np.array([[a]]))
    assert bool(particles.finished[0, 0])
    assert twist.log_value(particles)[0, 0] == expected

    seen: list[str] = []

    def recording(prompt: Any, text: str) -> float:
        seen.append(text)
        return 1.0

    policy = twist_policy(top_k=None)
    twist = PolicyTwist(policy, kind="logit", verifier=recording)
    result = tiltsmc.smc(policy, twist, prompts=[PROMPT], num_particles=8, proposal="optimal", rng=3)
    assert result.texts is not None and result.texts[0] and seen
    assert set(result.texts[0]) <= set(seen)
