"""Reward models that keep their own KV cache per particle (models/reward_cache.py): every value equals
re-encoding the whole prefix (``kv_cache=False``), through ragged prompts, multi-token steps, resampling,
the serving engine's joins and trims, and seeded sampler runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, Particles
from tiltsmc.tasks import arithmetic

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"
GPT2, LLAMA, MERGED, VALUE, PRM = (
    MODELS / name for name in ("gpt2-tiny", "llama-tiny", "gpt2-merged-tiny", "gpt2-value-tiny", "prm-tiny")
)
SPACE, PLUS, MINUS = 39, 47, 46  # the character tokenizer's " ", "+" and "-"
TOLERANCE = 1e-4
PROMPTS = ["ab", "hello there", [5], "the quick brown fox"]

# (graph, reward options): causal LMs read through a class, and a value head on a decoder trunk
READERS = [
    (GPT2, {"kind": "logit", "label": PLUS, "classes": [PLUS, MINUS]}),
    (LLAMA, {"kind": "log_value", "label": SPACE}),
    (MERGED, {"kind": "logit", "label": MINUS, "classes": [PLUS, MINUS, SPACE]}),
    (VALUE, {"kind": "logit", "output": "value"}),
]


def pair(path: Path, options: dict[str, Any], **more: Any) -> tuple[OnnxRewardModel, OnnxRewardModel]:
    """The cached reward model and the same one re-encoding."""
    cached = OnnxRewardModel(path, **options, **more)
    encoding = OnnxRewardModel(path, **options, **more, kv_cache=False)
    assert cached.kv_cached and not encoding.kv_cached
    return cached, encoding


@pytest.mark.parametrize(("path", "options"), READERS, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("position", ["last", "delimiter"])
@pytest.mark.parametrize("step", ["token", "line"])
def test_cached_values_equal_re_encoding(
    path: Path, options: dict[str, Any], position: str, step: str
) -> None:
    """Ragged prompts, steps of one token or of several (ending at a space, so rows append different
    counts), random resampling after every step: ``log Vh_0`` and every ``log Vh_t`` agree to 1e-4. The
    reward is called only every other step at times, so it catches up on two steps at once."""
    policy = OnnxCausalLM(
        GPT2, max_new_tokens=24, eos_token_id=[0], step="token" if step == "token" else [SPACE]
    )
    delimiters = {"position": position, "delimiter_ids": [SPACE, PLUS] if position == "delimiter" else None}
    cached, encoding = pair(path, options, **delimiters)
    particles = policy.start(PROMPTS, 6)
    np.testing.assert_allclose(
        cached.initial_log_value(particles), encoding.initial_log_value(particles), atol=TOLERANCE
    )
    rng = np.random.default_rng(3)
    compared = 0
    for t in range(8):
        policy.propose(particles, rng)
        if t % 3 == 1:
            continue  # the next call feeds two steps
        values = cached.log_value(particles)
        expected = encoding.log_value(particles)
        np.testing.assert_allclose(values, expected, atol=TOLERANCE, err_msg=f"step {t}")
        compared += int(np.isfinite(expected).sum())
        ancestors = rng.integers(0, 6, size=particles.lengths.shape)
        particles.reorder(ancestors)
        np.testing.assert_array_equal(cached.log_value(particles), values[np.arange(4)[:, None], ancestors])
    assert compared > 100
    assert (particles.lengths.max() > 8 and particles.finished.any()) or step == "token"
    assert len(set(particles.lengths.reshape(-1).tolist())) > 1  # rows of different lengths


def test_the_cache_is_fed_only_new_tokens() -> None:
    """Each call runs the tokens appended since the last (width = the longest step), not the prefix."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=40, eos_token_id=[], step=[SPACE, *range(3, 12)])
    reward = OnnxRewardModel(VALUE, output="value", kind="logit")
    widths: list[int] = []
    run = reward.session.run

    def recording(names: Any, feeds: dict[str, Any]) -> Any:
        widths.append(int(feeds["input_ids"].shape[1]))
        return run(names, feeds)

    reward.session.run = recording  # type: ignore[method-assign]
    particles = policy.start(["a b", "hello"], 4)
    reward.initial_log_value(particles)
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(4):
        before = particles.lengths.copy()
        policy.propose(particles, rng)
        steps.append(int((particles.lengths - before).max()))
        reward.log_value(particles)
    assert min(steps) > 0 and max(steps) > 1
    assert widths == [5, *steps]  # the prompts (the longest has 5 tokens), then each step's longest line


def test_demo_policy_as_a_cached_reward_model() -> None:
    """The demo's trained decoder (3 layers, grouped-query attention, lines as steps) read as a PRM by the
    probability of a digit at the line's start: cached and re-encoded values agree through SMC-style
    resampling on the demo's own problems."""
    policy, _ = arithmetic.load_models()
    folder = arithmetic.MODELS_DIR / "policy"
    newline = arithmetic.VOCAB.index("\n")
    digit = arithmetic.VOCAB.index("5")
    options = {"kind": "logit", "label": digit, "position": "delimiter", "delimiter_ids": [newline]}
    cached, encoding = pair(folder, options, pad_token_id=arithmetic.PAD_ID)
    prompts = [p.prompt for p in arithmetic.make_problems(4, 4, rng=1)]
    particles = policy.start(prompts, 5)
    np.testing.assert_allclose(cached.initial_log_value(particles), encoding.initial_log_value(particles),
                               atol=TOLERANCE)  # fmt: skip
    rng = np.random.default_rng(2)
    for _ in range(5):
        policy.propose(particles, rng)
        np.testing.assert_allclose(cached.log_value(particles), encoding.log_value(particles), atol=TOLERANCE)
        particles.reorder(rng.integers(0, 5, size=particles.lengths.shape))


def test_batches_join_trim_and_flatten_as_the_engine_does() -> None:
    """Two batches at different depths joined (left padding of the reward's cache), then one prompt
    selected out (its padding trimmed), then flattened one particle per prompt and reordered across
    prompts: the values still equal re-encoding."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=10, eos_token_id=[], step=[SPACE])
    cached, encoding = pair(VALUE, {"output": "value", "kind": "logit"})
    rng = np.random.default_rng(4)
    old = policy.start(["the quick brown fox", "ab"], 3)
    cached.initial_log_value(old)
    for _ in range(3):
        policy.propose(old, rng)
        cached.log_value(old)
    new = policy.start(["x"], 3)
    cached.initial_log_value(new)
    joined = Particles.concatenate([old, new])
    assert cached._cached is not None and cached._cached.has_state(joined)
    for _ in range(2):
        policy.propose(joined, rng)
        np.testing.assert_allclose(cached.log_value(joined), encoding.log_value(joined), atol=TOLERANCE)
    kept = joined.select([1, 2])
    mask = kept.state[cached._cached.mask_key]
    assert mask[..., 0].any()  # the longest prompt's padding is gone
    policy.propose(kept, rng)
    np.testing.assert_allclose(cached.log_value(kept), encoding.log_value(kept), atol=TOLERANCE)
    flat = kept.one_per_prompt()
    flat.reorder(rng.integers(0, flat.lengths.size, size=(1, flat.lengths.size)), across_prompts=True)
    policy.propose(flat, rng)
    np.testing.assert_allclose(cached.log_value(flat), encoding.log_value(flat), atol=TOLERANCE)


def test_a_batch_without_the_reward_state_starts_it_from_its_prefixes() -> None:
    """Particles the cached reward has never seen (grown by the policy alone) are fed their prompts and
    every generated token at the first call; a state joined with a part lacking it is dropped and rebuilt."""
    policy = OnnxCausalLM(LLAMA, max_new_tokens=8, eos_token_id=[])
    cached, encoding = pair(LLAMA, {"kind": "logit", "label": PLUS})
    particles = policy.start(["hello", "a"], 3)
    rng = np.random.default_rng(5)
    for _ in range(4):
        policy.propose(particles, rng)
    np.testing.assert_allclose(cached.log_value(particles), encoding.log_value(particles), atol=TOLERANCE)
    other = policy.start(["b"], 3)
    policy.propose(other, rng)
    joined = Particles.concatenate([particles, other])  # `other` lacks the reward's state
    np.testing.assert_allclose(cached.log_value(joined), encoding.log_value(joined), atol=TOLERANCE)


@pytest.mark.parametrize("sampler", ["smc", "sp_gsmc", "best_of_n"])
def test_seeded_runs_are_the_same_with_cached_and_re_encoding_reward(sampler: str) -> None:
    """Where the values agree to rounding, a seeded run draws the same samples with either reward."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=10, step=[SPACE])
    cached, encoding = pair(VALUE, {"output": "value", "kind": "logit"})
    options = {"smc": {"num_particles": 8}, "sp_gsmc": {"pool_size": 4}, "best_of_n": {"n": 6}}[sampler]
    run = getattr(tiltsmc, sampler)
    first = run(policy, cached, prompts=PROMPTS[:3], rng=7, **options)
    second = run(policy, encoding, prompts=PROMPTS[:3], rng=7, **options)
    assert first.texts == second.texts
    np.testing.assert_allclose(first.log_z, second.log_z, atol=TOLERANCE)


def test_requests_joining_and_leaving_the_engine_with_a_cached_reward() -> None:
    """Requests of ragged prompts and particle counts join a running batch and leave it: each gets the
    samples of its offline run with the re-encoding reward (same seed)."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=6)
    cached, encoding = pair(VALUE, {"output": "value", "kind": "logit"})
    jobs = [(p, n, seed) for seed, (p, n) in enumerate(zip(["hello there", "a", "the quick brown fox"] * 3,
                                                          [8, 4, 16, 2, 6, 3, 5, 7, 9]))]  # fmt: skip
    with tiltsmc.Engine(policy, cached) as engine:
        futures = []
        for prompt, n, seed in jobs:
            futures.append(engine.submit(prompt, "smc", num_particles=n, rng=seed))
            time.sleep(0.002)
        served = [f.result(timeout=60) for f in futures]
    for (prompt, n, seed), result in zip(jobs, served):
        offline = tiltsmc.smc(policy, encoding, prompts=[prompt], num_particles=n, rng=seed)
        assert result.texts == offline.texts, (prompt, n, seed)
        np.testing.assert_allclose(result.log_z, offline.log_z, rtol=1e-4, atol=TOLERANCE)


def test_kv_cache_option() -> None:
    """Graphs without a cache re-encode (automatic); kv_cache=True refuses them, naming why; a bad value
    is refused; an empty prompt falls back to re-encoding."""
    assert not OnnxRewardModel(PRM, kind="logit").kv_cached
    with pytest.raises(ValueError, match=r"kv_cache: .*no past_key_values"):
        OnnxRewardModel(PRM, kind="logit", kv_cache=True)
    with pytest.raises(ValueError, match=r"output: 'present.0.key' has shape \[.*\]; expected one score"):
        OnnxRewardModel(GPT2, kind="logit", output="present.0.key", kv_cache=True)  # refused at load
    with pytest.raises(TypeError, match="kv_cache"):
        OnnxRewardModel(GPT2, kind="logit", label=PLUS, kv_cache="yes")  # type: ignore[arg-type]
    cached, encoding = pair(VALUE, {"output": "value", "kind": "logit"})
    particles = Particles.empty([None], 3, 4)
    particles.tokens[0, :, :2] = [[3, 4], [5, 6], [7, 8]]
    particles.lengths[:] = 2
    np.testing.assert_array_equal(cached.log_value(particles), encoding.log_value(particles))
    assert not cached._cached.has_state(particles)  # type: ignore[union-attr]


# -- one graph as policy and reward -------------------------------------------------------------------------


def test_policy_value_reads_the_value_head_of_the_policys_own_run() -> None:
    """gpt2-value-tiny as policy (logits) and reward (its value head) at once: the values equal those of the
    same graph loaded as a reward model, through multi-token steps, endings and resampling; the policy's
    law is the plain policy's; a seeded run is the same as with two models, with one session run a step."""
    joint_policy = OnnxCausalLM(VALUE, max_new_tokens=12, step=[SPACE], value_output="value")
    reward = tiltsmc.models.PolicyValue(joint_policy, kind="logit")
    separate = OnnxRewardModel(VALUE, output="value", kind="logit", kv_cache=False)
    plain = OnnxCausalLM(GPT2, max_new_tokens=12, step=[SPACE])
    particles = joint_policy.start(PROMPTS, 5)
    np.testing.assert_allclose(reward.initial_log_value(particles), separate.initial_log_value(particles),
                               atol=TOLERANCE)  # fmt: skip
    rng = np.random.default_rng(8)
    for _ in range(6):
        joint_policy.propose(particles, rng)
        np.testing.assert_allclose(reward.log_value(particles), separate.log_value(particles), atol=TOLERANCE)
        particles.reorder(rng.integers(0, 5, size=particles.lengths.shape))
    assert particles.finished.any()
    calls = {"joint": 0, "plain": 0}
    for name, model in (("joint", joint_policy), ("plain", plain)):
        run = model.session.run

        def counted(*args: Any, _run: Any = run, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _run(*args, **kwargs)

        model.session.run = counted  # type: ignore[method-assign]
    together = tiltsmc.smc(joint_policy, reward, prompts=PROMPTS[:2], num_particles=6, rng=3)
    apart = tiltsmc.smc(plain, separate, prompts=PROMPTS[:2], num_particles=6, rng=3)
    assert together.texts == apart.texts
    np.testing.assert_allclose(together.log_z, apart.log_z, atol=TOLERANCE)
    # one trunk: the policy's runs (a step's last token fed once more where every row ended) and no other
    assert calls["plain"] <= calls["joint"] <= calls["plain"] + together.ess.shape[1]


def test_policy_value_in_the_engine_and_bad_options() -> None:
    joint_policy = OnnxCausalLM(VALUE, max_new_tokens=6, value_output="value")
    reward = tiltsmc.models.PolicyValue(joint_policy, kind="logit", verifier=lambda prompt, text: 0.5)
    with tiltsmc.Engine(joint_policy, reward) as engine:
        futures = [
            engine.submit(p, "smc", num_particles=n, rng=s)
            for s, (p, n) in enumerate(zip(PROMPTS[:3], [4, 6, 3]))
        ]
        served = [f.result(timeout=60) for f in futures]
    for s, (prompt, n) in enumerate(zip(PROMPTS[:3], [4, 6, 3])):
        offline = tiltsmc.smc(joint_policy, reward, prompts=[prompt], num_particles=n, rng=s)
        assert served[s].texts == offline.texts
    with pytest.raises(ValueError, match="value_output"):
        OnnxCausalLM(VALUE, value_output="nope")
    with pytest.raises(ValueError, match="value_output"):
        OnnxCausalLM(VALUE, value_output="present.0.key")
    with pytest.raises(ValueError, match="policy: expected an OnnxCausalLM loaded with value_output"):
        tiltsmc.models.PolicyValue(OnnxCausalLM(GPT2))
    with pytest.raises(ValueError, match="kind"):
        tiltsmc.models.PolicyValue(joint_policy, kind="odds")  # type: ignore[arg-type]


def test_cli_one_model_for_both_roles_and_the_kv_cache_option(tmp_path: Path, capfd: Any) -> None:
    """``tiltsmc run --policy gpt2-value-tiny --value-output value`` is the API's PolicyValue run;
    ``--reward-kv-cache off`` is the re-encoding reward's run (the same samples); neither or both of
    --reward / --value-output is refused."""
    import json

    from tiltsmc.cli import main

    out = tmp_path / "out.jsonl"
    base = ["run", "--policy", str(VALUE), "--max-new-tokens", "5", "--prompt", "ab", "--seed", "4"]
    assert main([*base, "--value-output", "value", "--json", str(out)]) == 0
    (joint,) = [json.loads(line) for line in out.read_text().splitlines()]
    policy = OnnxCausalLM(VALUE, max_new_tokens=5, value_output="value")
    expected = tiltsmc.smc(policy, tiltsmc.models.PolicyValue(policy), ["ab"], rng=4)  # prompt 0 of --seed 4
    assert joint["texts"] == expected.texts[0] and joint["log_z"] == float(expected.log_z[0])
    for setting in ("on", "off"):
        out.unlink()
        argv = [*base, "--reward", str(VALUE), "--reward-output", "value", "--reward-kv-cache", setting]
        assert main([*argv, "--json", str(out)]) == 0
        (record,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert record["texts"] == joint["texts"]
        np.testing.assert_allclose(record["log_z"], joint["log_z"], atol=TOLERANCE)
    capfd.readouterr()
    assert main(base) == 2
    assert main([*base, "--reward", str(VALUE), "--value-output", "value"]) == 2
    assert "--value-output" in capfd.readouterr().err
    assert main([*base, "--reward", str(PRM), "--reward-kv-cache", "on"]) == 2
    assert "--reward-kv-cache: " in capfd.readouterr().err


def test_the_demos_joint_graph_gives_the_separate_prms_values_and_samples() -> None:
    """``arithmetic_models/joint`` (the policy's graph with the PRM's head and its error count carried in
    one more cache layer) equals the separate policy + PRM: ``log Vh`` of every prefix to 1e-4 through
    ragged prompts, line steps and resampling, and a seeded SMC run draws the same solutions."""
    policy, reward = arithmetic.load_models()
    separate_policy, prm = arithmetic.load_models(joint=False)
    assert isinstance(reward, tiltsmc.models.PolicyValue) and isinstance(prm, OnnxRewardModel)
    prompts = [p.prompt for p in arithmetic.make_problems(4, 3, rng=3)]
    prompts += [p.prompt for p in arithmetic.make_problems(12, 2, rng=4)]
    particles = policy.start(prompts, 6)
    np.testing.assert_allclose(reward.initial_log_value(particles), prm.initial_log_value(particles),
                               atol=TOLERANCE)  # fmt: skip
    rng = np.random.default_rng(0)
    while not particles.finished.all():
        policy.propose(particles, rng)
        np.testing.assert_allclose(reward.log_value(particles), prm.log_value(particles), atol=TOLERANCE)
        particles.reorder(rng.integers(0, 6, size=particles.lengths.shape))
    together = tiltsmc.smc(policy, reward, prompts, num_particles=8, rng=5)
    apart = tiltsmc.smc(separate_policy, prm, prompts, num_particles=8, rng=5)
    assert together.texts == apart.texts
    np.testing.assert_allclose(together.log_z, apart.log_z, atol=TOLERANCE)
