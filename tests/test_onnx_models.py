"""The ONNX Runtime policy and reward model on the tiny optimum-exported fixtures (tests/fixtures/models).

Covers: cached decoding against a full recompute (also after resampling), padding invariance, exactness in
distribution of SMC against the enumerated target, delimiter steps, top-k / top-p / temperature, errors on
bad input, provider choice, and the reward model scoring only the prefixes that changed. CPU only.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_helpers
import pytest
import tiltsmc
from onnx_helpers import assert_float32_close, assert_state_follows, full_sequence, with_initializer_set
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, Particles
from tiltsmc.models._ort import cuda_device_usable
from tiltsmc.models.onnx_lm import log_softmax

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

FIXTURES = Path(__file__).parent / "fixtures" / "models"
GPT2 = FIXTURES / "gpt2-tiny"
LLAMA = FIXTURES / "llama-tiny"
PRM = FIXTURES / "prm-tiny"
DECODERS = [pytest.param(GPT2, id="gpt2-tiny"), pytest.param(LLAMA, id="llama-tiny")]
VOCAB = 64
EOS = 0
SPACE = 39
NEWLINE = 55

# Ragged prompts, text and token ids mixed (left padding in one batch).
RAGGED = ["hello world", [5, 6, 7], "a", list(range(2, 30)), "the cat sat."]


# -- helpers ---------------------------------------------------------------------------------------------


# Cache geometry of each decoder, from tests/fixtures/models/README.md: (KV heads, head dim).
CACHE_SHAPES = {"gpt2-tiny": (2, 16), "llama-tiny": (2, 8)}


def session_logits(policy: OnnxCausalLM, ids: Any) -> np.ndarray:
    """Logits ``(rows, seq, vocab)`` straight from the session, without cache (see onnx_helpers)."""
    assert policy.has_position_ids  # both fixtures take position_ids: they are fed as arange
    return onnx_helpers.session_logits(policy, ids, *CACHE_SHAPES[policy.model_file.parent.name])


def full_logits(policy: OnnxCausalLM, ids: Any) -> np.ndarray:
    """Logits ``(seq, vocab)`` of one unpadded sequence, run from scratch (empty cache, positions 0..L-1)."""
    return session_logits(policy, np.asarray(ids, dtype=np.int64)[None, :])[0]


def assert_cache_matches_recompute(policy: OnnxCausalLM, particles: Particles) -> int:
    """Every unfinished particle's next-token logits equal a full recompute without cache (1e-4)."""
    assert policy.has_position_ids
    shape = CACHE_SHAPES[policy.model_file.parent.name]
    return onnx_helpers.assert_cache_matches_recompute(policy, particles, *shape)


def decode_all(policy: OnnxCausalLM, samples: list[Any]) -> list[list[str]]:
    return [[policy.decode(sequence) for sequence in per_prompt] for per_prompt in samples]


@pytest.fixture(scope="module")
def llama() -> OnnxCausalLM:
    return OnnxCausalLM(LLAMA, max_new_tokens=2)


@pytest.fixture(scope="module")
def prm() -> OnnxRewardModel:
    return OnnxRewardModel(PRM, kind="logit")


# -- 1. cached decoding equals a full recompute, also after resampling ------------------------------------


@pytest.mark.parametrize("path", DECODERS)
def test_cached_decode_matches_full_recompute(path: Path) -> None:
    policy = OnnxCausalLM(path, max_new_tokens=10)
    rng = np.random.default_rng(11)
    particles = policy.start(RAGGED, 4)
    assert not particles.errors
    assert particles.prompt_tokens is not None
    assert [len(p) for p in particles.prompt_tokens] == [11, 3, 1, 28, 12]
    assert assert_cache_matches_recompute(policy, particles) == len(RAGGED) * 4
    checked = 0
    for _ in range(5):
        log_p = policy.propose(particles, rng)
        assert np.all(np.isfinite(log_p))
        checked += assert_cache_matches_recompute(policy, particles)
    assert checked > 50  # most particles still run after five steps
    # The cache follows resampling: arbitrary (unsorted, repeated) ancestors, then one more step.
    ancestors = rng.integers(0, 4, size=particles.lengths.shape).astype(np.int64)
    before = copy.deepcopy(particles)
    particles.reorder(ancestors)
    rows = np.arange(len(RAGGED))[:, None]
    np.testing.assert_array_equal(particles.tokens, before.tokens[rows, ancestors])
    assert_state_follows(before, particles, ancestors)
    assert assert_cache_matches_recompute(policy, particles) > 0
    for _ in range(2):
        policy.propose(particles, rng)
        assert assert_cache_matches_recompute(policy, particles) > 0


@pytest.mark.parametrize("path", DECODERS)
def test_take_copies_cache_for_any_particle_count(path: Path) -> None:
    policy = OnnxCausalLM(path, max_new_tokens=6)
    rng = np.random.default_rng(5)
    particles = policy.start(RAGGED[:3], 3)
    policy.propose(particles, rng)
    taken = particles.take(np.array([[2, 2, 0, 1, 1], [0, 0, 0, 0, 0], [1, 2, 1, 2, 0]]))
    assert taken.lengths.shape == (3, 5)
    policy.propose(taken, rng)
    policy.propose(taken, rng)
    assert assert_cache_matches_recompute(policy, taken) > 0


# -- 2. padding does not leak -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", DECODERS)
def test_prompt_alone_equals_prompt_in_ragged_batch(path: Path) -> None:
    policy = OnnxCausalLM(path, max_new_tokens=8)
    for position, prompt in enumerate(RAGGED):
        alone = policy.start([prompt], 2)
        together = policy.start(RAGGED, 2)
        np.testing.assert_allclose(
            together.state["lm.logits"][position], alone.state["lm.logits"][0], atol=1e-4, rtol=0
        )
        # The same tokens appended to both: still the same logits (padding masked on cached steps too).
        rng = np.random.default_rng(position)
        for _ in range(4):
            tokens = rng.integers(2, VOCAB, size=(len(RAGGED), 2))  # no EOS: nobody finishes
            alone_tokens = tokens[position : position + 1]
            policy.append(together, tokens)
            policy.append(alone, alone_tokens)
            together.flush()  # the session runs the policy deferred
            alone.flush()
            np.testing.assert_allclose(
                together.state["lm.logits"][position], alone.state["lm.logits"][0], atol=1e-4, rtol=0
            )
    assert assert_cache_matches_recompute(policy, together) == len(RAGGED) * 2


# -- 3. SMC is exact in distribution on the ONNX models ----------------------------------------------------


def logsumexp(a: np.ndarray) -> float:
    shift = float(np.max(a))
    return shift + float(np.log(np.sum(np.exp(a - shift))))


def enumerate_target(
    policy: OnnxCausalLM, reward: OnnxRewardModel, prompt: str
) -> tuple[list[tuple[int, ...]], np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Every trajectory of llama-tiny with max_new_tokens=2: (0,) or (x1, x2) with x1 != 0.

    Returns the cells, ``log p``, ``log r`` of each cell, ``log Z = log E_p[r]``, ``log Vh_0`` and the
    intermediate target of the first step, ``pi_1(x1) ∝ p(x1) Vh_1(x1)`` (64 values).
    """
    ids = policy.encode_prompt(prompt)
    log_p1 = log_softmax(full_logits(policy, ids)[-1])
    batch = np.column_stack([np.repeat(ids[None, :], VOCAB, axis=0), np.arange(VOCAB)])
    logits = session_logits(policy, batch)
    log_p2 = log_softmax(logits[:, -1, :])  # row x1: log p(x2 | prompt, x1)
    cells: list[tuple[int, ...]] = [(EOS,)] + [(a, b) for a in range(1, VOCAB) for b in range(VOCAB)]
    log_p = np.array([log_p1[c[0]] if len(c) == 1 else log_p1[c[0]] + log_p2[c[0], c[1]] for c in cells])
    log_r = reward._score([np.concatenate([ids, np.array(c, dtype=np.int64)]) for c in cells])
    log_v0 = float(reward._score([ids])[0])
    log_v1 = reward._score([np.concatenate([ids, [x1]]) for x1 in range(VOCAB)])
    pi_1 = np.exp(log_p1 + log_v1 - logsumexp(log_p1 + log_v1))
    return cells, log_p, log_r, logsumexp(log_p + log_r), log_v0, pi_1


def cell_index(sequence: Any) -> int:
    sequence = [int(t) for t in sequence]
    if len(sequence) == 1:
        assert sequence[0] == EOS, sequence
        return 0
    assert len(sequence) == 2 and sequence[0] != EOS, sequence
    return 1 + (sequence[0] - 1) * VOCAB + sequence[1]


def x1_of_cells(cells: list[tuple[int, ...]], values: np.ndarray) -> np.ndarray:
    """Aggregate a per-cell array (last axis) into the marginal of the first token."""
    first = np.array([c[0] for c in cells])
    out = np.zeros((*values.shape[:-1], VOCAB))
    for v in range(VOCAB):
        out[..., v] = values[..., first == v].sum(axis=-1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("resample", "ess_threshold", "seed", "replicates"),
    [("systematic", 0.5, 2024, 400), ("multinomial", 1.0, 7, 800)],
)
def test_smc_exact_in_distribution(
    llama: OnnxCausalLM, prm: OnnxRewardModel, resample: str, ess_threshold: float, seed: int, replicates: int
) -> None:
    prompt = "ab"
    cells, log_p, log_r, log_z_exact, log_v0, pi_1 = enumerate_target(llama, prm, prompt)
    assert np.isclose(np.exp(log_p).sum(), 1.0, atol=1e-9)
    pi = np.exp(log_p + log_r - log_z_exact)
    count = 64
    res = tiltsmc.smc(
        llama,
        prm,
        prompts=[prompt] * replicates,
        num_particles=count,
        resample=resample,  # type: ignore[arg-type]
        ess_threshold=ess_threshold,
        rng=seed,
    )
    assert not res.collapsed.any() and not res.errors
    assert np.all(np.isfinite(res.log_z))
    # Derivation. Replicate b is an independent SMC run: final normalised weights W_bi on trajectories x_bi
    # and the estimate Zh_b = exp(log_z_b). SMC's unnormalised measure is unbiased whatever the (adaptive)
    # resampling: E[Zh_b * sum_i W_bi f(x_bi)] = Z * pi(f) for every f, where Zh_b includes log Vh_0
    # (smc adds it back) so that it estimates Z = E_p[r] for the terminal reward r (docs/theory/samplers.md).
    # With the exact Z, Y_b(f) = (Zh_b / Z) * sum_i W_bi f(x_bi) is therefore an exactly unbiased estimate of
    # pi(f): no O(1/N) self-normalisation bias. The Y_b are i.i.d. over b, so their mean is within a few
    # standard errors sd_b(Y_b) / sqrt(R) of pi(f) (CLT). We test f = indicator of each frequent x1 value, of
    # the most probable full sequences, and f = 1 (i.e. E[Zh] = Z), each within 5 standard errors.
    scale = np.exp(res.log_z - log_z_exact)
    y = np.zeros((replicates, len(cells)))
    for b in range(replicates):
        weights = np.exp(res.log_weights[b])
        assert weights.shape == (count,) and np.isclose(weights.sum(), 1.0)
        for i, sequence in enumerate(res.samples[b]):
            y[b, cell_index(sequence)] += weights[i]
        y[b] *= scale[b]
    assert res.texts is not None and res.texts == decode_all(llama, res.samples)

    def check(estimates: np.ndarray, exact: np.ndarray, what: str) -> np.ndarray:
        mean = estimates.mean(axis=0)
        se = estimates.std(axis=0, ddof=1) / np.sqrt(replicates)
        z = np.abs(mean - exact) / np.maximum(se, 1e-12)
        assert np.all(z < 5.0), f"{what}: worst |mean - pi| = {z.max():.2f} standard errors"
        return se

    pi_x1 = x1_of_cells(cells, pi[None, :])[0]
    p_x1 = x1_of_cells(cells, np.exp(log_p)[None, :])[0]
    y_x1 = x1_of_cells(cells, y)
    # The replicate spread estimates the standard error well only for a cell that many independent events
    # populate, at the final step and at the intermediate one where resampling happens: a first token of
    # tiny Vh_1 (here token 37, Vh_1 = e^-5) survives resampling in ~1 run in 200 and then carries a huge
    # weight r / Vh_1, a heavy tail that a few hundred replicates cannot resolve (unbiased all the same).
    tested = np.minimum(pi_x1, pi_1) * replicates * count >= 100
    assert tested.sum() >= 20
    se_x1 = check(y_x1[:, tested], pi_x1[tested], "x1 marginal")
    # Power: the base policy's marginal is many standard errors away, so the test tells pi from p.
    assert np.max(np.abs(p_x1[tested] - pi_x1[tested]) / se_x1) > 10
    first = np.array([c[0] for c in cells])
    top = [c for c in np.argsort(pi)[::-1][:12] if tested[first[c]]]
    assert len(top) >= 8
    check(y[:, top], pi[top], "most probable sequences")
    check(scale[:, None], np.ones(1), "E[Zh] / Z")
    # log_z includes log Vh_0 (the prm's value at the prompt, -0.071 here): exactly, log_z is log Vh_0 plus
    # the step increments (to rounding). Left out, every Zh would be e^0.071 = 1.074 times too large: a
    # shift of 15.6 standard errors of the mean of 400 replicates with systematic resampling at ESS < N/2,
    # but of 5.9 with multinomial resampling at every step (caught at 5 se on 17 of 21 seeds), hence 800
    # replicates there (8.2 se on average over 21 seeds, 6.5 at the least: caught on all 21).
    assert abs(log_v0) > 0.03
    np.testing.assert_allclose(res.log_z, log_v0 + res.log_z_increments.sum(axis=1), rtol=0, atol=1e-9)


def test_other_samplers_run_on_onnx_models(llama: OnnxCausalLM, prm: OnnxRewardModel) -> None:
    prompts = ["ab", [5, 6, 7], "hello"]
    results = [
        tiltsmc.best_of_n(llama, prm, prompts=prompts, n=8, rng=1),
        tiltsmc.sp_gsmc(llama, prm, prompts=prompts, pool_size=4, rng=2),
        tiltsmc.mh(llama, prm, prompts=prompts, pool_size=4, steps=3, rng=3),
        tiltsmc.mh(llama, prm, prompts=prompts, num_particles=4, steps=2, rng=4),
    ]
    for res in results:
        assert not res.errors and not res.collapsed.any(), res.sampler
        assert np.all(np.isfinite(res.log_z)), res.sampler
        assert len(res.samples) == len(prompts)
        assert res.texts is not None and res.texts == decode_all(llama, res.samples), res.sampler
        for per_prompt in res.samples:
            assert len(per_prompt) == 1
            cell_index(per_prompt[0])  # a valid trajectory: (EOS,) or (x1 != EOS, x2)
    # best-of-n returns the highest reward of its n draws, so at least their mean reward (its log_z).
    best = results[0]
    for b, prompt in enumerate(prompts):
        ids = llama.encode_prompt(prompt)
        log_r_best = prm._score([np.concatenate([ids, best.samples[b][0]])])[0]
        assert log_r_best >= best.log_z[b] - 1e-9


# -- 4. delimiter steps -----------------------------------------------------------------------------------


def step_ended(policy: OnnxCausalLM, appended: np.ndarray) -> bool:
    if policy.step_ids is not None:
        return int(appended[-1]) in policy.step_ids
    assert policy.step_text is not None
    ended = policy.decode(appended).endswith(policy.step_text)
    if policy.step_text == "\n":  # one character, one token
        assert ended == (int(appended[-1]) == NEWLINE)
    return ended


def _metaspace_decoder() -> Any:
    """SentencePiece's decoder: "▁" is a space, and the text's first is dropped (tokenizers before 0.19
    name that ``add_prefix_space``; from 0.19 on ``prepend_scheme``)."""
    from tokenizers import decoders

    try:
        return decoders.Metaspace(replacement="▁", prepend_scheme="always")
    except TypeError:
        return decoders.Metaspace(replacement="▁", add_prefix_space=True)


def _word_tokenizer(decoder: str) -> Any:
    """64 word pieces, several of more than one character (a lone "▁" among them), with the ``decoder``
    given: ``fuse`` (a sequence's text is its tokens' texts joined) or SentencePiece's ``metaspace`` (a
    token's text alone is not always what it adds to a sequence)."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<|endoftext|>", "<pad>", "<unk>", "▁", "▁a", "a\n", "\n\n", "\n", "ab", "b", "a", "=", "=\n"]
    pieces += ["▁=", "1", "2", "\n1", "a=", "b▁", "é"]
    pieces += [f"x{k}" for k in range(64 - len(pieces))]
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse() if decoder == "fuse" else _metaspace_decoder()
    return tokenizer


def _byte_level_tokenizer() -> Any:
    """64 byte-level tokens (GPT-2's alphabet) with both bytes of "é" (0xC3 0xA9) apart and together:
    either byte alone decodes to U+FFFD."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    wanted = ["Ã", "©", "Ã©", "Ċ", "Ġ", "ĊĊ", "a", "b", "Ã©Ċ", "aÃ"]
    pieces = ["<|endoftext|>", *wanted]
    pieces += [c for c in sorted(ByteLevel.alphabet()) if c not in pieces][: 64 - len(pieces)]
    tokenizer = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, []))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@pytest.mark.parametrize(
    ("make_tokenizer", "step", "skips"),
    [
        pytest.param(None, "\n", True, id="fixture-newline"),
        pytest.param(None, "a=", True, id="fixture-two-characters"),
        pytest.param(lambda: _word_tokenizer("fuse"), "a\n", True, id="fuse-pieces"),
        pytest.param(lambda: _word_tokenizer("fuse"), "\n\n", True, id="fuse-double"),
        pytest.param(lambda: _word_tokenizer("fuse"), "é", True, id="fuse-accent"),
        pytest.param(lambda: _word_tokenizer("metaspace"), " ", False, id="metaspace-space"),
        pytest.param(lambda: _word_tokenizer("metaspace"), "a\n", False, id="metaspace-pieces"),
        pytest.param(_byte_level_tokenizer, "é", False, id="bytes-split-character"),
    ],
)
def test_delimiter_check_skips_only_tokens_that_cannot_end_a_step(
    make_tokenizer: Any, step: str, skips: bool
) -> None:
    """``propose`` decodes a row's step so far only where its newest token could end the step
    (``OnnxCausalLM._could_end_step``): every token after which a text first ends with the delimiter must
    be one, for every prefix of up to two tokens (all of them). Tokens are skipped only with a decoder
    that joins the tokens' texts; with others (SentencePiece's, byte-level: a token's text alone is not
    what it adds to a sequence, which this test finds for a rule read from it) every row is decoded."""
    tokenizer = None if make_tokenizer is None else make_tokenizer()
    policy = OnnxCausalLM(LLAMA, tokenizer=tokenizer, step=step)
    assert policy.tokenizer is not None
    vocab = policy.vocab_size
    could = policy._could_end_step(np.arange(vocab, dtype=np.int64).reshape(1, -1))[0]
    assert could.all() != skips
    prefixes = [[]] + [[a] for a in range(vocab)] + [[a, b] for a in range(vocab) for b in range(vocab)]
    inner = policy.tokenizer.inner
    before = inner.decode_batch(prefixes, skip_special_tokens=False)
    ending = 0
    for t in range(vocab):
        after = inner.decode_batch([[*p, t] for p in prefixes], skip_special_tokens=False)
        for prefix, text_before, text_after in zip(prefixes, before, after):
            if text_after.endswith(step) and not text_before.endswith(step):
                ending += 1
                assert could[t], f"{[*prefix, t]} ends a step ({text_after!r}) but token {t} was skipped"
    assert ending > 0


def test_delimiter_check_changes_no_step() -> None:
    """The same draws with and without the skip (every row decoded): the same steps, bit for bit."""
    runs = []
    for check_every_row in (False, True):
        policy = OnnxCausalLM(LLAMA, max_new_tokens=12, step=",")
        assert policy._could_end is not None  # the fixture's decoder joins token texts
        if check_every_row:
            policy._could_end[:] = 1
        particles = policy.start(["hi there", [7, 8], "x"], 24)
        rng = np.random.default_rng(11)
        while not particles.finished.all():
            policy.propose(particles, rng)
        runs.append(particles)
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_array_equal(runs[0].lengths, runs[1].lengths)
    assert (runs[0].tokens == 41).any()  # "," was drawn: steps ended at it


@pytest.mark.parametrize(
    ("path", "step"),
    [
        pytest.param(LLAMA, "\n", id="llama-newline-text"),
        pytest.param(GPT2, {SPACE}, id="gpt2-space-id"),
        pytest.param(LLAMA, {SPACE, 5, 9}, id="llama-id-set"),
    ],
)
def test_delimiter_steps(path: Path, step: Any) -> None:
    max_new = 12
    policy = OnnxCausalLM(path, max_new_tokens=max_new, step=step)
    assert not policy.token_level
    rng = np.random.default_rng(3)
    particles = policy.start(["hi there", [7, 8], "x"], 24)
    reasons = {"delimiter": 0, "eos": 0, "max": 0}
    untouched_checked = 0
    for _ in range(max_new + 1):
        if particles.finished.all():
            break
        before = copy.deepcopy(particles)
        log_p = policy.propose(particles, rng)
        in_step = ~before.finished
        # Particles not in the step are untouched.
        assert np.all(log_p[~in_step] == 0.0)
        np.testing.assert_array_equal(particles.tokens[~in_step], before.tokens[~in_step])
        np.testing.assert_array_equal(particles.lengths[~in_step], before.lengths[~in_step])
        np.testing.assert_array_equal(particles.finished[~in_step], True)
        np.testing.assert_array_equal(
            particles.state["lm.logits"][~in_step], before.state["lm.logits"][~in_step]
        )
        untouched_checked += int(np.count_nonzero(~in_step))
        # Replay the same tokens one at a time on the copy, with the policy's own per-token law.
        added = particles.lengths - before.lengths
        assert np.all(added[in_step] >= 1) and np.all(added[~in_step] == 0)
        step_start = before.lengths.copy()
        replay = np.zeros(particles.lengths.shape)
        for k in range(int(added.max())):
            active = added > k
            column = np.minimum(step_start + k, max_new - 1)
            tokens = np.take_along_axis(particles.tokens, column[..., None], axis=2)[..., 0]
            chosen = np.take_along_axis(policy.next_log_probs(before), tokens[..., None], axis=2)[..., 0]
            replay += np.where(active, chosen, 0.0)
            policy._advance(before, tokens, active)
        np.testing.assert_allclose(log_p, replay, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(before.tokens, particles.tokens)
        np.testing.assert_array_equal(before.finished, particles.finished)
        for b, i in zip(*np.nonzero(in_step)):
            appended = particles.tokens[b, i, step_start[b, i] : particles.lengths[b, i]]
            # log p(step) = the sum of the token log-probs of a full recompute without cache (to ~1e-5).
            sequence = full_sequence(particles, b, i)
            logits = full_logits(policy, sequence[:-1])
            offset = len(sequence) - len(appended) - 1
            token_log_p = [log_softmax(logits[offset + k])[t] for k, t in enumerate(appended)]
            assert log_p[b, i] == pytest.approx(float(np.sum(token_log_p)), abs=1e-4)
            # The step ends at the first delimiter, EOS or max_new_tokens, and nowhere earlier.
            for k in range(1, len(appended)):
                assert not step_ended(policy, appended[:k]) and appended[k - 1] != EOS
            if appended[-1] == EOS:
                reasons["eos"] += 1
                assert particles.finished[b, i]
            elif step_ended(policy, appended):
                reasons["delimiter"] += 1
                assert particles.finished[b, i] == (particles.lengths[b, i] == max_new)
            else:
                reasons["max"] += 1
                assert particles.lengths[b, i] == max_new and particles.finished[b, i]
    assert particles.finished.all()
    assert reasons["delimiter"] > 0 and reasons["max"] > 0, reasons
    assert untouched_checked > 0


def test_optimal_proposal_refused_for_delimiter_steps() -> None:
    class FlatTwist:
        """A twist head that is constant: enough for smc(..., proposal='optimal') to accept it."""

        vocab_size = VOCAB

        def initial_log_value(self, particles: Particles) -> np.ndarray:
            return np.zeros(particles.num_prompts)

        def log_value(self, particles: Particles) -> np.ndarray:
            return np.zeros(particles.lengths.shape)

        def next_log_values(self, particles: Particles) -> np.ndarray:
            return np.zeros((*particles.lengths.shape, VOCAB))

    token_policy = OnnxCausalLM(LLAMA, max_new_tokens=3)
    res = tiltsmc.smc(token_policy, FlatTwist(), prompts=["ab"], num_particles=4, proposal="optimal", rng=0)
    assert np.allclose(res.log_z, 0.0, atol=1e-6)  # a flat twist gives Z = 1 exactly
    for step in ("\n", {SPACE}):
        policy = OnnxCausalLM(LLAMA, max_new_tokens=3, step=step)
        with pytest.raises(ValueError, match="token-level"):
            tiltsmc.smc(policy, FlatTwist(), prompts=["ab"], num_particles=4, proposal="optimal", rng=0)
        with pytest.raises(ValueError, match="token-level"):
            tiltsmc.sp_gsmc(policy, FlatTwist(), prompts=["ab"], pool_size=None, rng=0)
    # An ONNX reward model has no twist head: refused even for a token-level policy.
    with pytest.raises(ValueError, match="twist head"):
        tiltsmc.smc(token_policy, OnnxRewardModel(PRM), prompts=["ab"], num_particles=4, proposal="optimal")


# -- 4b. stop strings -------------------------------------------------------------------------------------


def _first_stop(policy: OnnxCausalLM, tokens: np.ndarray, stops: tuple[str, ...]) -> int:
    """The length of the shortest prefix of ``tokens`` whose text holds a stop string (all if none does)."""
    assert policy.tokenizer is not None
    for k in range(1, len(tokens) + 1):
        if any(stop in policy.tokenizer.decode(tokens[:k]) for stop in stops):
            return k
    return len(tokens)


@pytest.mark.parametrize(
    ("make_tokenizer", "stop"),
    [
        pytest.param(None, ("a",), id="fixture-one-character"),
        pytest.param(None, ("55", "a5"), id="fixture-two-stops"),
        pytest.param(lambda: _word_tokenizer("fuse"), ("a\n",), id="fuse-within-and-across-pieces"),
        pytest.param(lambda: _word_tokenizer("metaspace"), (" a", "=\n"), id="metaspace-leading-space"),
        pytest.param(_byte_level_tokenizer, ("é",), id="bytes-split-character"),
        pytest.param(_byte_level_tokenizer, ("\n\n", "ba"), id="bytes-pieces"),
    ],
)
def test_stop_cuts_each_trajectory_at_the_token_completing_a_stop_string(
    make_tokenizer: Any, stop: tuple[str, ...]
) -> None:
    """With the same draws, a trajectory under ``stop`` is the one without, cut at its first token after
    which its text holds a stop string (the law of the cut trajectories); its text ends before that string.
    Decoders that join token texts, SentencePiece's (a leading space the first token of a text loses) and
    byte-level ones (a character's bytes in two tokens)."""
    runs = []
    for stops in ((), stop):
        tokenizer = None if make_tokenizer is None else make_tokenizer()
        policy = OnnxCausalLM(LLAMA, tokenizer=tokenizer, max_new_tokens=12, stop=stops or None)
        particles = policy.start(["hi there", [7, 8], "x"], 24)
        rng = np.random.default_rng(5)
        while not particles.finished.all():
            policy.propose(particles, rng)
        runs.append((policy, particles))
    (free_policy, free), (policy, cut) = runs
    assert policy.stop == tuple(stop)
    stopped = 0
    for b, i in np.ndindex(free.lengths.shape):
        whole = free.tokens[b, i, : free.lengths[b, i]]
        expected = _first_stop(free_policy, whole, stop)
        assert cut.lengths[b, i] == expected, (b, i, free_policy.decode(whole))
        np.testing.assert_array_equal(cut.tokens[b, i, :expected], whole[:expected])
        text = free_policy.decode(whole[:expected])
        at = [text.find(s) for s in stop if s in text]
        stopped += bool(at)
        assert policy.decode(whole[:expected]) == (text[: min(at)] if at else text)
    assert 0 < stopped < free.lengths.size  # some trajectories stopped, some did not


@pytest.mark.parametrize(
    ("make_tokenizer", "stop", "pieces"),
    [
        pytest.param(lambda: _word_tokenizer("fuse"), "a\n", ["x0", "a", "\n"], id="fuse-two-pieces"),
        pytest.param(lambda: _word_tokenizer("fuse"), "a\n", ["x0", "a\n"], id="fuse-one-piece"),
        pytest.param(
            lambda: _word_tokenizer("metaspace"), " a", ["x0", "▁", "a"], id="metaspace-space-apart"
        ),
        pytest.param(
            lambda: _word_tokenizer("metaspace"), "a=", ["▁", "x1", "a", "="], id="metaspace-pieces"
        ),
        pytest.param(_byte_level_tokenizer, "é", ["a", "Ã", "©"], id="bytes-of-one-character"),
        pytest.param(_byte_level_tokenizer, "é\n", ["b", "Ã", "©", "Ċ"], id="bytes-three"),
    ],
)
def test_stop_ends_a_trajectory_at_the_token_completing_it_however_it_is_split(
    make_tokenizer: Any, stop: str, pieces: list[str]
) -> None:
    """Tokens appended one by one: the trajectory ends at the last piece and not before, where the stop
    string spans several tokens, a character's bytes are in two, or a SentencePiece space is a token of
    its own (a text's first token loses its leading space: the window reaches one token further back)."""
    tokenizer = make_tokenizer()
    policy = OnnxCausalLM(LLAMA, tokenizer=tokenizer, max_new_tokens=12, stop=stop)
    # the byte-level tokenizer has no token for "hi" (a text it encodes to nothing is refused): the empty
    # prompt, the BOS token alone, as it ran before
    particles = policy.start(["hi" if tokenizer.encode("hi").ids else ""], 2)
    assert not particles.errors
    for k, piece in enumerate(pieces):
        assert not particles.finished.any(), (k, piece)
        token = tokenizer.token_to_id(piece)
        assert token is not None, piece
        policy.append(particles, np.array([[token, token]]))
    assert particles.finished.all()
    tokens = particles.tokens[0, 0, : particles.lengths[0, 0]]
    whole = tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
    assert whole.endswith(stop) and policy.decode(tokens) == whole[: -len(stop)]


def test_smc_with_stop_strings() -> None:
    """Resampling moves whole trajectories: each still ends at the token completing its first stop string
    (or at EOS or the token limit), and the result's texts hold none."""
    policy = OnnxCausalLM(LLAMA, max_new_tokens=10, stop=["a", "b"])
    result = tiltsmc.smc(policy, OnnxRewardModel(PRM), prompts=["hi", "x"], num_particles=16, rng=2)
    assert policy.tokenizer is not None
    ended_by_stop = 0
    for samples, texts in zip(result.samples, result.texts or []):
        for tokens, text in zip(samples, texts):
            assert "a" not in text and "b" not in text
            assert _first_stop(policy, np.asarray(tokens), ("a", "b")) == len(tokens)
            ended_by_stop += any(s in policy.tokenizer.decode(tokens) for s in ("a", "b"))
    assert ended_by_stop > 0


@pytest.mark.parametrize("stop", ["", [""], ["a", 3], 7])
def test_stop_strings_are_checked(stop: Any) -> None:
    with pytest.raises(ValueError, match="stop: expected a non-empty string"):
        OnnxCausalLM(LLAMA, stop=stop)


# -- 4c. prompts run a few rows at a time ----------------------------------------------------------------


class CountingSession:
    """An ONNX Runtime session that counts its runs, the rows of each and the positions it was fed."""

    def __init__(self, session: Any) -> None:
        self.session, self.rows, self.positions = session, [], []

    def run(self, names: Any, feeds: dict[str, Any], *args: Any) -> Any:
        self.rows.append(int(feeds["input_ids"].shape[0]))
        self.positions.append(int(feeds["input_ids"].shape[1]))
        return self.session.run(names, feeds, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


@pytest.mark.parametrize(
    ("path", "options"),
    [
        pytest.param(GPT2, {}, id="gpt2"),
        pytest.param(LLAMA, {}, id="llama"),
        pytest.param(FIXTURES / "gpt2-merged-tiny", {}, id="merged"),
        pytest.param(FIXTURES / "gpt2-value-tiny", {"value_output": "value"}, id="value-head"),
        pytest.param(FIXTURES / "gpt2-twist-tiny", {"value_output": "twist"}, id="twist-head"),
    ],
)
def test_prompts_run_a_few_rows_at_a_time_give_the_same_start(path: Path, options: dict[str, Any]) -> None:
    """``prefill_tokens`` bounds the rows x width of one session call over the prompts (a graph's logits
    at every position, its attention scores): ragged prompts run a row at a time, or two, or a row in
    pieces of a few positions (or one), each piece a cached step over the pieces before it, start the same
    particles as in one call (caches, masks, logits, value scores; to float32 rounding), and the next
    steps go on the same."""
    prompts = ["hi there", [7, 8], "x", "a longer prompt", "ab"]
    starts = []
    for prefill_tokens in (1 << 20, 1, 3, 32):
        policy = OnnxCausalLM(path, max_new_tokens=4, prefill_tokens=prefill_tokens, **options)
        counting = CountingSession(policy.session)
        policy.session = counting  # type: ignore[assignment]
        particles = policy.start(prompts, 3)
        calls = list(zip(counting.rows, counting.positions))
        for token in (5, 9):
            policy.append(particles, np.full(particles.lengths.shape, token))
        particles.flush()
        starts.append((calls, particles))
    width = starts[0][0][0][1]  # the longest prompt's tokens: the one call's positions
    assert 8 < width < 32 and starts[0][0] == [(5, width)]
    assert starts[1][0] == [(1, 1)] * 5 * width  # a row at a time, a position at a time
    assert len(starts[2][0]) == 5 * -(-width // 3)  # ceil(width / 3) pieces a row
    assert all(rows == 1 and positions <= 3 for rows, positions in starts[2][0])
    assert sum(rows for rows, _ in starts[3][0]) == 5 and all(rows <= 2 for rows, _ in starts[3][0])
    assert all(positions == width for _, positions in starts[3][0]) and len(starts[3][0]) == 3
    reference = starts[0][1]
    for _, particles in starts[1:]:
        assert set(particles.state) == set(reference.state)
        for key, value in reference.state.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert_float32_close(particles.state[key], value, key)  # sums over the hidden size (32)
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(particles.state[key], value, err_msg=key)


@pytest.mark.parametrize("prefill_tokens", [0, -3, 2.5, True])
def test_prefill_tokens_is_checked(prefill_tokens: Any) -> None:
    with pytest.raises(ValueError, match="prefill_tokens: expected an integer >= 1"):
        OnnxCausalLM(LLAMA, prefill_tokens=prefill_tokens)


# -- 5. top_k / top_p / temperature ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_temperature_scales_logits(temperature: float) -> None:
    policy = OnnxCausalLM(LLAMA, max_new_tokens=4, temperature=temperature)
    particles = policy.start(RAGGED, 2)
    expected = log_softmax(particles.state["lm.logits"].astype(np.float64) / temperature)
    np.testing.assert_allclose(policy.next_log_probs(particles), expected, atol=1e-6)  # float32 division


def test_top_k_keeps_exactly_k() -> None:
    policy = OnnxCausalLM(LLAMA, max_new_tokens=6, top_k=5, temperature=0.8)
    rng = np.random.default_rng(21)
    particles = policy.start(RAGGED, 16)
    for _ in range(5):
        live = ~particles.finished
        log_probs = policy.next_log_probs(particles)
        logits = particles.state["lm.logits"].astype(np.float64) / 0.8
        for b, i in zip(*np.nonzero(live)):
            row = logits[b, i]
            kept = np.isfinite(log_probs[b, i])
            assert np.sort(row)[-5] > np.sort(row)[-6]  # no tie at the boundary (the models are random)
            assert kept.sum() == 5
            np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(np.argsort(row)[-5:]))
            np.testing.assert_allclose(log_probs[b, i, kept], log_softmax(row[kept]), atol=1e-6)
        before = particles.lengths.copy()
        log_p = policy.propose(particles, rng)
        b_index, i_index = np.nonzero(live)
        picked = particles.tokens[b_index, i_index, before[live]]
        assert np.all(np.isfinite(log_probs[b_index, i_index, picked]))
        np.testing.assert_allclose(log_p[live], log_probs[b_index, i_index, picked], atol=1e-12)


@pytest.mark.parametrize("top_k", [None, 12])
@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, top_k: Any) -> None:
    policy = OnnxCausalLM(GPT2, max_new_tokens=5, top_p=top_p, top_k=top_k)
    rng = np.random.default_rng(int(top_p * 100))
    particles = policy.start(RAGGED, 12)
    for _ in range(4):
        live = ~particles.finished
        log_probs = policy.next_log_probs(particles)
        base = log_softmax(particles.state["lm.logits"].astype(np.float64))
        if top_k is not None:
            kth = np.sort(base, axis=-1)[..., -top_k][..., None]
            base = log_softmax(np.where(base >= kth, base, -np.inf))
        for b, i in zip(*np.nonzero(live)):
            probs = np.exp(base[b, i])
            kept = np.isfinite(log_probs[b, i])
            order = np.argsort(-probs)
            size = int(kept.sum())
            # The kept set is the `size` most probable tokens, reaching top_p, and no smaller prefix does.
            assert set(np.flatnonzero(kept)) == set(order[:size])
            assert probs[kept].sum() >= top_p - 1e-12
            assert probs[order[: size - 1]].sum() < top_p
            np.testing.assert_allclose(np.exp(log_probs[b, i, kept]).sum(), 1.0, atol=1e-12)
            np.testing.assert_allclose(
                log_probs[b, i, kept], base[b, i, kept] - np.log(probs[kept].sum()), atol=1e-9
            )
        before = particles.lengths.copy()
        policy.propose(particles, rng)
        b_index, i_index = np.nonzero(live)
        picked = particles.tokens[b_index, i_index, before[live]]
        assert np.all(np.isfinite(log_probs[b_index, i_index, picked]))  # only kept tokens are sampled


# -- 6. bad input -----------------------------------------------------------------------------------------


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxCausalLM(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxRewardModel(tmp_path / "nowhere.onnx")
    folder = tmp_path / "empty-model"
    folder.mkdir()
    shutil.copy(LLAMA / "config.json", folder)
    shutil.copy(LLAMA / "tokenizer.json", folder)
    with pytest.raises(FileNotFoundError, match=r"model\.onnx.*found: config\.json, tokenizer\.json"):
        OnnxCausalLM(folder)
    with pytest.raises(FileNotFoundError, match=r"found: config\.json"):
        OnnxRewardModel(folder)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="found: nothing"):
        OnnxCausalLM(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"\.onnx"):
        OnnxCausalLM(LLAMA / "config.json")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        OnnxCausalLM(LLAMA, tokenizer=tmp_path / "no-tokenizer.json")


def test_graph_without_expected_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing.*past_key_values.*found: input_ids, attention_mask"):
        OnnxCausalLM(PRM)
    # prm-tiny with its attention_mask input renamed token_type_ids (same length: every reference to it
    # in the protobuf renamed alike, so the graph stays valid)
    renamed = tmp_path / "prm-token-types.onnx"
    model_bytes = (PRM / "model.onnx").read_bytes()
    assert model_bytes.count(b"attention_mask") >= 2
    renamed.write_bytes(model_bytes.replace(b"attention_mask", b"token_type_ids"))
    with pytest.raises(
        ValueError,
        match=r"missing \['attention_mask'\], unexpected \['token_type_ids'\]; inputs found: input_ids, "
        r"token_type_ids",
    ):
        OnnxRewardModel(renamed)
    # A decoder's inputs are taken (its cache fed empty); its logits need label=.
    with pytest.raises(ValueError, match=r"output: 'logits' has 64 classes per position"):
        OnnxRewardModel(LLAMA)
    with pytest.raises(ValueError, match="output"):
        OnnxRewardModel(PRM, output="no_such_output")
    with pytest.raises(ValueError, match="kind"):
        OnnxRewardModel(PRM, kind="sigmoid")  # type: ignore[arg-type]


def test_vocabulary_mismatch_needs_token_map(tmp_path: Path) -> None:
    folder = tmp_path / "prm-other-vocab"
    folder.mkdir()
    for name in ("model.onnx", "config.json"):
        shutil.copy(PRM / name, folder)
    tokenizer = json.loads((PRM / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    vocab["~"] = vocab.pop("_")  # same size, one entry renamed
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    policy = OnnxCausalLM(LLAMA, max_new_tokens=3)
    reward = OnnxRewardModel(folder, kind="logit")
    assert reward.tokenizer is not None and reward.tokenizer.vocab_size == VOCAB
    with pytest.raises(ValueError, match="token_map"):
        reward.check_policy(policy)
    with pytest.raises(ValueError, match="token_map"):
        tiltsmc.smc(policy, reward, prompts=["ab"], num_particles=4, rng=0)
    mapped = OnnxRewardModel(folder, kind="logit", token_map=np.arange(VOCAB))
    res = tiltsmc.smc(policy, mapped, prompts=["ab"], num_particles=4, rng=0)
    assert np.isfinite(res.log_z[0]) and not res.errors
    with pytest.raises(ValueError, match="token_map"):
        tiltsmc.smc(policy, OnnxRewardModel(folder, token_map=np.arange(10)), prompts=["ab"], num_particles=4)


@pytest.mark.parametrize("bad", [-1, VOCAB + 36], ids=["negative", "too-large"])
def test_token_map_out_of_range_refused(llama: OnnxCausalLM, bad: int) -> None:
    token_map = np.arange(VOCAB)
    token_map[-1] = bad
    with pytest.raises(ValueError, match="token_map"):
        reward = OnnxRewardModel(PRM, kind="logit", token_map=token_map)
        tiltsmc.smc(llama, reward, prompts=["ab"], num_particles=8, rng=0)


def test_prob_kind_out_of_range_refused(llama: OnnxCausalLM) -> None:
    reward = OnnxRewardModel(PRM, kind="prob")  # prm-tiny's raw scores are logits, many outside [0, 1]
    with pytest.raises(ValueError, match=r"prob.*\[0, 1\]"):
        tiltsmc.smc(llama, reward, prompts=["ab"], num_particles=4, rng=0)


def test_prompt_longer_than_context_fails_alone(llama: OnnxCausalLM, prm: OnnxRewardModel) -> None:
    prompts = ["ab", "x" * 200, [5, 6, 7]]
    res = tiltsmc.smc(llama, prm, prompts=prompts, num_particles=8, rng=5)
    assert list(res.errors) == [1]
    assert "prompt 1" in res.errors[1] and "context" in res.errors[1] and "128" in res.errors[1]
    np.testing.assert_array_equal(res.collapsed, [False, True, False])
    assert res.log_z[1] == -np.inf and np.all(np.isfinite(res.log_z[[0, 2]]))
    assert res.texts is not None
    for b in (0, 2):
        assert len(res.samples[b]) == 8
        for sequence in res.samples[b]:
            cell_index(sequence)  # finished normally: (EOS,) or two tokens
    # Exactly at the limit is fine (prompt + max_new_tokens == context).
    ok = tiltsmc.smc(llama, prm, prompts=["x" * 126], num_particles=2, rng=0)
    assert not ok.errors and not ok.collapsed.any()
    for sampler in (tiltsmc.best_of_n, tiltsmc.sp_gsmc):
        other = sampler(llama, prm, prompts, rng=1)
        assert list(other.errors) == [1] and other.collapsed[1] and not other.collapsed[[0, 2]].any()


def test_reward_output_with_nan_is_a_clear_error(tmp_path: Path, llama: OnnxCausalLM) -> None:
    """A real session whose score head's bias is NaN: every score is NaN, and the run says so."""
    shutil.copytree(PRM, tmp_path / "prm-nan")
    model = tmp_path / "prm-nan" / "model.onnx"
    model.write_bytes(with_initializer_set(model.read_bytes(), "score.bias", float("nan")))
    for kind in ("logit", "prob", "log_value"):
        reward = OnnxRewardModel(tmp_path / "prm-nan", kind=kind)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"reward: model\.onnx returned NaN for 2 prefix\(es\)"):
            tiltsmc.smc(llama, reward, prompts=["ab", "cd"], num_particles=1, rng=0)


def test_reward_output_of_plus_infinity(tmp_path: Path, llama: OnnxCausalLM) -> None:
    """Scores of +inf from a real session: refused as log-values and as probabilities, while as logits
    they are sigmoid 1 (log-value 0). The samplers rely on the model's own check (log_values_checked)."""
    shutil.copytree(PRM, tmp_path / "prm-inf")
    model = tmp_path / "prm-inf" / "model.onnx"
    model.write_bytes(with_initializer_set(model.read_bytes(), "score.bias", float("inf")))
    assert OnnxRewardModel.log_values_checked is True
    reward = OnnxRewardModel(tmp_path / "prm-inf", kind="log_value")
    with pytest.raises(
        ValueError, match=r"reward: model\.onnx returned \+inf as a log-value for 2 prefix\(es\)"
    ):
        tiltsmc.smc(llama, reward, prompts=["ab", "cd"], num_particles=1, rng=0)
    reward = OnnxRewardModel(tmp_path / "prm-inf", kind="prob")
    with pytest.raises(
        ValueError, match=r"reward: kind='prob' but model\.onnx returned values outside \[0, 1\]"
    ):
        tiltsmc.smc(llama, reward, prompts=["ab", "cd"], num_particles=1, rng=0)
    result = tiltsmc.smc(
        llama, OnnxRewardModel(tmp_path / "prm-inf", kind="logit"), ["ab"], num_particles=4, rng=0
    )
    np.testing.assert_array_equal(result.log_z, [0.0])  # Vh = 1 at every step: every potential is 1


def test_start_buffers_are_reused_only_once_released(llama: OnnxCausalLM) -> None:
    """The arrays start() copies each prompt's state into are kept for the next run, but two live batches
    never share them; results do not depend on the reuse."""
    first = llama.start(["ab", "cd"], 3)
    second = llama.start(["ab", "cd"], 3)
    for key, array in first.state.items():
        assert not np.shares_memory(array, second.state[key]), key
    kept = {key: id(array) for key, array in second.state.items()}
    del second
    third = llama.start(["ef", "gh"], 3)
    assert {key: id(array) for key, array in third.state.items()} == kept  # the released buffers, reused
    for key, array in first.state.items():
        assert not np.shares_memory(array, third.state[key]), key
    fresh = OnnxCausalLM(LLAMA, max_new_tokens=4, eos_token_id=EOS).start(["ef", "gh"], 3)
    for key, array in third.state.items():
        np.testing.assert_array_equal(array, fresh.state[key])


@pytest.mark.parametrize("options", [{}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.9}])
def test_policy_logits_with_nan_are_a_clear_error(
    tmp_path: Path, prm: OnnxRewardModel, options: dict[str, Any]
) -> None:
    """A real policy session whose first layer norm weights are NaN: every logit is NaN. It is refused
    at load (``check_batching``'s probe reads its logits); loaded without the check, the draw says which
    model returned them and for which prompt (with or without top-k / top-p filtering)."""
    shutil.copytree(LLAMA, tmp_path / "llama-nan")
    model = tmp_path / "llama-nan" / "model.onnx"
    name = "model.layers.0.input_layernorm.weight"
    model.write_bytes(with_initializer_set(model.read_bytes(), name, float("nan")))
    with pytest.raises(ValueError, match=r"path: model\.onnx returned NaN logits for two short prompts"):
        OnnxCausalLM(tmp_path / "llama-nan", max_new_tokens=3, eos_token_id=EOS, **options)
    policy = OnnxCausalLM(
        tmp_path / "llama-nan", max_new_tokens=3, eos_token_id=EOS, check_batching=False, **options
    )
    with pytest.raises(ValueError, match=r"^prompt 0: logits: model\.onnx returned NaN for this prompt's"):
        tiltsmc.smc(policy, prm, prompts=["ab"], num_particles=2, rng=0)


@pytest.mark.parametrize("value", [float("nan"), -0.5, float("inf")])
def test_bad_verifier_values(llama: OnnxCausalLM, value: float) -> None:
    reward = OnnxRewardModel(PRM, kind="logit", verifier=lambda prompt, text: value)
    with pytest.raises(ValueError, match="verifier"):
        tiltsmc.smc(llama, reward, prompts=["ab"], num_particles=4, rng=0)


@pytest.mark.parametrize("verifier", [5, "exact", [1.0]])
def test_a_verifier_that_is_not_callable_is_refused_at_construction(verifier: Any) -> None:
    with pytest.raises(TypeError, match=r"^verifier: expected a function verifier\(prompt, text\)"):
        OnnxRewardModel(PRM, kind="logit", verifier=verifier)


def test_verifier_gives_terminal_reward(llama: OnnxCausalLM) -> None:
    seen: list[tuple[Any, str]] = []

    def verifier(prompt: Any, text: str) -> float:
        seen.append((prompt, text))
        return 1.0 if text.startswith("e") else 0.25

    reward = OnnxRewardModel(PRM, kind="logit", verifier=verifier)
    replicates = 100
    res = tiltsmc.smc(llama, reward, prompts=["ab"] * replicates, num_particles=16, rng=3)
    assert seen and all(prompt == "ab" and isinstance(text, str) for prompt, text in seen)
    # log_z estimates log E_p[r] for the verifier's r (the prm only guides): Z = 0.25 + 0.75 p(x1 = "e").
    p_e = np.exp(log_softmax(full_logits(llama, llama.encode_prompt("ab"))[-1]))[llama.encode_prompt("e")[0]]
    z_exact = 0.25 + 0.75 * p_e
    z_hat = np.exp(res.log_z)
    assert abs(z_hat.mean() - z_exact) < 5 * z_hat.std(ddof=1) / np.sqrt(replicates)


def test_text_prompt_without_tokenizer(tmp_path: Path, prm: OnnxRewardModel) -> None:
    shutil.copy(LLAMA / "model.onnx", tmp_path / "model.onnx")
    policy = OnnxCausalLM(tmp_path / "model.onnx", max_new_tokens=3, eos_token_id=EOS, tokenizer=None)
    assert policy.tokenizer is None and policy.vocab_size == VOCAB
    res = tiltsmc.smc(policy, prm, prompts=["hello", [5, 6, 7]], num_particles=4, rng=0)
    assert list(res.errors) == [0] and "tokenizer" in res.errors[0]
    np.testing.assert_array_equal(res.collapsed, [True, False])
    assert res.texts is None
    with pytest.raises(ValueError, match="no tokenizer"):
        policy.decode([3, 4])
    # The fixture folder's tokenizer.json is found beside the .onnx file.
    assert OnnxCausalLM(LLAMA / "model.onnx").tokenizer is not None
    # A text delimiter needs a tokenizer too.
    with pytest.raises(ValueError, match="step"):
        OnnxCausalLM(tmp_path / "model.onnx", step="\n")


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"step": set()}, "step"),
        ({"step": {VOCAB}}, "step"),
    ],
)
def test_bad_generation_arguments(arguments: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OnnxCausalLM(LLAMA, **arguments)


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        (5, TypeError, "^step: expected 'token', a delimiter text or a collection of token ids, got int"),
        (None, TypeError, "^step: expected 'token', .* got NoneType"),
        (b"\n", TypeError, "^step: expected 'token', .* got bytes"),  # not read as the id 10
        (["a"], TypeError, r"^step: expected token ids \(ints\), got 'a'"),
        ([1.5], TypeError, r"^step: expected token ids \(ints\), got 1.5"),  # not truncated to 1
        ([True], TypeError, r"^step: expected token ids \(ints\), got True"),
        ([-1], ValueError, "^step: expected token ids >= 0, got -1"),
        ("", ValueError, "^step: expected 'token', a non-empty delimiter text or token ids, got ''"),
        ([], ValueError, "^step: expected at least one token id"),
    ],
)
def test_a_bad_step_is_refused_naming_step(step: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        OnnxCausalLM(LLAMA, step=step)


def test_fractional_top_k_refused() -> None:
    with pytest.raises((ValueError, TypeError), match="top_k"):
        OnnxCausalLM(LLAMA, top_k=2.5)  # type: ignore[arg-type]


def test_bad_prompts_reported_per_prompt(llama: OnnxCausalLM) -> None:
    particles = llama.start(["ab", [3, VOCAB], [[1, 2]], [-1], "", None], 2)
    assert sorted(particles.errors) == [1, 2, 3]
    assert "[0, 64)" in particles.errors[1] and "[0, 64)" in particles.errors[3]
    assert particles.finished[[1, 2, 3]].all() and not particles.finished[[0, 4, 5]].any()
    assert particles.prompt_tokens is not None
    assert list(particles.prompt_tokens[4]) == [0] and list(particles.prompt_tokens[5]) == [0]  # BOS
    with pytest.raises(ValueError, match="prompts"):
        llama.start([], 2)


# -- 7. providers -----------------------------------------------------------------------------------------


def test_cpu_provider_and_quiet_construction(capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    policy = OnnxCausalLM(GPT2)
    reward = OnnxRewardModel(PRM)
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    if not cuda_device_usable()[0]:
        assert policy.session.get_providers() == ["CPUExecutionProvider"]
        assert reward.session.get_providers() == ["CPUExecutionProvider"]
    explicit = OnnxCausalLM(LLAMA, providers=["CPUExecutionProvider"], intra_op_num_threads=1)
    assert explicit.session.get_providers() == ["CPUExecutionProvider"]
    assert explicit.start(["ab"], 2).state["lm.logits"].shape == (1, 2, VOCAB)
    explicit_reward = OnnxRewardModel(PRM, providers=["CPUExecutionProvider"])
    assert explicit_reward.session.get_providers() == ["CPUExecutionProvider"]


def test_quiet_in_a_fresh_process() -> None:
    """ONNX Runtime prints provider errors once per process: check construction in a new one."""
    code = (
        "import sys; from tiltsmc.models import OnnxCausalLM, OnnxRewardModel\n"
        f"p = OnnxCausalLM({os.fspath(LLAMA)!r}); r = OnnxRewardModel({os.fspath(PRM)!r})\n"
        "print(p.session.get_providers()[-1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.strip() == "CPUExecutionProvider"


def test_require_gpu_without_gpu() -> None:
    if cuda_device_usable()[0]:
        pytest.skip("a CUDA device is usable here: require_gpu succeeds")
    with pytest.raises(RuntimeError, match="require_gpu"):
        OnnxCausalLM(LLAMA, require_gpu=True)
    with pytest.raises(RuntimeError, match="require_gpu"):
        OnnxRewardModel(PRM, require_gpu=True)


def test_require_gpu_with_explicit_providers_without_gpu() -> None:
    if cuda_device_usable()[0]:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError, match="require_gpu"):
        OnnxCausalLM(LLAMA, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], require_gpu=True)


# -- 8. the reward model scores only changed prefixes -----------------------------------------------------


@pytest.mark.parametrize("ess_threshold", [1.0, 0.0])
def test_reward_scores_only_changed_prefixes(ess_threshold: float) -> None:
    policy = OnnxCausalLM(LLAMA, max_new_tokens=10)  # long enough that some particles meet EOS
    reward = OnnxRewardModel(PRM, kind="logit")
    rows_scored: list[int] = []
    live_before_step: list[int] = []
    run = reward.session.run
    propose = policy.propose

    def spy_run(names: Any, feeds: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        rows_scored.append(int(feeds["input_ids"].shape[0]))
        return run(names, feeds, *args, **kwargs)

    def spy_propose(particles: Particles, rng: np.random.Generator) -> np.ndarray:
        live_before_step.append(int(np.count_nonzero(~particles.finished)))
        return propose(particles, rng)

    reward.session.run = spy_run
    policy.propose = spy_propose  # type: ignore[method-assign]
    prompts = ["ab", [5, 6, 7], "hello"]
    res = tiltsmc.smc(policy, reward, prompts=prompts, num_particles=16, ess_threshold=ess_threshold, rng=9)
    assert np.all(np.isfinite(res.log_z))
    assert len(live_before_step) >= 3 and live_before_step[0] == len(prompts) * 16
    assert live_before_step[-1] < live_before_step[0]  # particles finish along the way (EOS)
    # One call for Vh_0 (a row per prompt), then one per step with a row per particle that moved.
    assert rows_scored == [len(prompts), *live_before_step]
    if ess_threshold == 1.0:
        assert res.resampled[:, :-1].all()

    # Direct: scoring again, or after a reorder, costs nothing; one new token costs one row per particle.
    rows_scored.clear()
    particles = policy.start(prompts, 4)
    propose(particles, np.random.default_rng(0))
    first = reward.log_value(particles).copy()  # the returned array is the state's, reordered in place
    assert rows_scored == [12]
    assert np.array_equal(reward.log_value(particles), first) and rows_scored == [12]
    ancestors = np.array([[3, 3, 0, 1], [2, 2, 2, 2], [0, 1, 2, 3]])
    particles.reorder(ancestors)
    again = reward.log_value(particles)
    assert rows_scored == [12]
    np.testing.assert_array_equal(again, first[np.arange(3)[:, None], ancestors])
    # The values read from the state equal a fresh score of each prefix.
    fresh = reward._score([full_sequence(particles, b, i) for b in range(3) for i in range(4)])
    np.testing.assert_allclose(again.ravel(), fresh, atol=1e-6)


def test_reward_read_at_the_last_step_delimiter() -> None:
    """position='delimiter': the score at the last delimiter of the generated text (else the prompt's end)."""
    space = 39  # the character tokenizer's id of " " (checked below)
    plain = OnnxRewardModel(PRM, kind="log_value")
    assert plain.tokenizer is not None and plain.tokenizer.token_id(" ") == space
    reward = OnnxRewardModel(PRM, kind="log_value", position="delimiter", delimiter_ids=[space])
    policy = OnnxCausalLM(LLAMA, max_new_tokens=8, eos_token_id=[])
    particles = policy.start(["ab", "hello"], 6)
    rng = np.random.default_rng(3)
    for _ in range(5):
        policy.propose(particles, rng)
    values = reward.log_value(particles)
    for b in range(2):
        prompt = particles.prompt_tokens[b]
        for i in range(6):
            generated = particles.tokens[b, i, : particles.lengths[b, i]]
            sequence = np.concatenate([prompt, generated])
            (scores,) = plain.session.run(
                ["logits"],
                {"input_ids": sequence[None], "attention_mask": np.ones((1, len(sequence)), np.int64)},
            )
            where = np.flatnonzero(generated == space)
            position = len(prompt) + where[-1] if where.size else len(prompt) - 1
            assert values[b, i] == pytest.approx(float(scores[0, position, 0]), abs=1e-5)
    with pytest.raises(ValueError, match="delimiter_ids"):
        OnnxRewardModel(PRM, position="delimiter")
    with pytest.raises(ValueError, match="position"):
        OnnxRewardModel(PRM, position="everywhere")  # type: ignore[arg-type]


def test_reward_prefixes_with_ragged_prompts_and_steps() -> None:
    """A long prompt whose particles stopped early beside a short one whose particles ran on: each row is
    its prompt + its own tokens, right-padded, for every particle and for any subset."""
    reward = OnnxRewardModel(PRM, kind="logit", providers=["CPUExecutionProvider"])
    particles = Particles.empty(["long", "short"], 3, 8)
    particles.prompt_tokens = [np.arange(1, 11), np.array([5, 6])]
    particles.lengths[:] = [[1, 0, 1], [8, 3, 5]]
    particles.tokens[:] = np.arange(20, 28)
    for selected in (None, np.array([1, 4]), np.array([0, 2]), np.array([5, 0, 5])):
        ids, mask, last, positions = reward._prefixes(particles, selected)
        chosen = range(6) if selected is None else selected
        expected = [full_sequence(particles, *divmod(int(p), 3)) for p in chosen]
        np.testing.assert_array_equal(last, [len(e) - 1 for e in expected])
        assert ids.shape == (len(expected), max(len(e) for e in expected)) and ids.flags.c_contiguous
        assert positions is None  # prm-tiny takes no position_ids
        for row, row_mask, sequence in zip(ids, mask, expected):
            np.testing.assert_array_equal(row[: len(sequence)], sequence)
            assert np.all(row[len(sequence) :] == reward.pad_token_id)
            np.testing.assert_array_equal(row_mask, np.arange(len(row)) < len(sequence))


def test_decoder_runs_are_deferred_until_needed(prm: OnnxRewardModel) -> None:
    """The session run on appended tokens waits for the next draw or resampling (Particles.defer): a run
    of T tokens calls the decoder once for the prompts and T - 1 times after, never after the last token;
    and deferred work runs before a reorder copies the state it writes."""
    policy = OnnxCausalLM(LLAMA, max_new_tokens=5, eos_token_id=[], providers=["CPUExecutionProvider"])
    calls = []
    run = policy.session.run
    policy.session.run = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs)  # type: ignore[method-assign]
    result = tiltsmc.smc(policy, prm, ["ab", "cd"], num_particles=4, ess_threshold=1.0, rng=0)
    assert all(len(s) == 5 for per_prompt in result.samples for s in per_prompt)
    assert len(calls) == 1 + 4
    live = policy.start(["ab"], 2)
    policy.append(live, np.array([[5, 6]]))
    copied = copy.deepcopy(live)  # runs the deferred decoder first: the copy holds the new logits
    assert not live._pending and not copied._pending
    np.testing.assert_array_equal(copied.state["lm.logits"], live.state["lm.logits"])
    assert copied.state["lm.mask"].shape[2] == live.state["lm.cache.0.key"].shape[3]
    particles = Particles.empty(["a"], 3, 2)
    order: list[str] = []
    assert not particles.deferred
    particles.defer(lambda: order.append("first"))
    particles.defer(lambda: particles.state.__setitem__("x", np.array([[10.0, 20.0, 30.0]])))
    assert particles.deferred
    particles.reorder(np.array([[2, 2, 0]]))
    assert order == ["first"] and not particles._pending and not particles.deferred
    np.testing.assert_array_equal(particles.state["x"], [[30.0, 30.0, 10.0]])


def test_a_prompt_fits_the_context_with_its_runs_token_limit() -> None:
    """A prompt counts the new tokens its run may add against the model's context: with ``max_new_tokens``
    below the policy's own it fits where it would not with the policy's (gpt2-tiny: 128 positions; 123
    prompt tokens + 6 do not fit, + 4 do), offline and in the engine beside a request at the policy's
    limit, with the result of a policy whose own limit is the run's (it was refused for the policy's)."""
    six = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6)
    four = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    long_prompt = "ab " * 41
    assert len(four.encode_prompt(long_prompt)) == 123 and six.max_length == 128
    with pytest.raises(ValueError, match="123 prompt tokens \\+ max_new_tokens 6 exceed the model's context"):
        six.encode_prompt(long_prompt)
    assert len(six.encode_prompt(long_prompt, max_new_tokens=4)) == 123
    refused = tiltsmc.smc(six, reward, prompts=[long_prompt], num_particles=8, rng=3)
    assert "max_new_tokens 6 exceed the model's context of 128" in refused.errors[0]
    limited = tiltsmc.smc(six, reward, prompts=[long_prompt], num_particles=8, rng=3, max_new_tokens=4)
    own = tiltsmc.smc(four, reward, prompts=[long_prompt], num_particles=8, rng=3)
    assert not limited.errors and limited.texts == own.texts and np.array_equal(limited.log_z, own.log_z)
    with tiltsmc.Engine(six, reward) as engine:  # joined in one start with a request at the policy's limit
        futures = [
            engine.submit(long_prompt, "smc", num_particles=8, rng=3, max_new_tokens=4),
            engine.submit("hello", "smc", num_particles=8, rng=5),
        ]
        together = [future.result(timeout=60) for future in futures]
    assert together[0].texts == own.texts and np.array_equal(together[0].log_z, own.log_z)
    alone = tiltsmc.smc(six, reward, prompts=["hello"], num_particles=8, rng=5)
    assert together[1].texts == alone.texts and np.array_equal(together[1].log_z, alone.log_z)


def particles_snapshot(particles: Particles) -> dict[str, Any]:
    """Copies of a batch's tokens, lengths, finished flags and state, to compare with after a call."""
    state = {key: np.array(value, copy=True) for key, value in particles.state.items()}
    return {
        "tokens": particles.tokens.copy(),
        "lengths": particles.lengths.copy(),
        "finished": particles.finished.copy(),
        "state": state,
        "deferred": particles.deferred,
    }


def assert_unchanged(particles: Particles, before: dict[str, Any]) -> None:
    after = particles_snapshot(particles)
    for name in ("tokens", "lengths", "finished"):
        np.testing.assert_array_equal(after[name], before[name])
    assert after["deferred"] == before["deferred"] and list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        np.testing.assert_array_equal(after["state"][key], value)


@pytest.mark.parametrize("path", [GPT2, FIXTURES / "gqa-tiny"], ids=["gpt2-tiny", "gqa-tiny"])
def test_append_refuses_tokens_that_are_not_the_batchs_token_ids(path: Path) -> None:
    """``append``'s ``tokens``: integer ids, shaped ``(B, N)`` like ``lengths``, each unfinished particle's
    below ``vocab_size``; else TypeError / ValueError naming ``tokens``, before anything is written (a -1
    was read by the graph's Gather as the last embedding; the vocabulary's size made the deferred session
    run fail at the next read; a transposed array or floats were taken)."""
    policy = OnnxCausalLM(path, max_new_tokens=8)
    particles = policy.start(["abc"], 2)
    policy.next_log_probs(particles)
    before = particles_snapshot(particles)
    refused: list[tuple[Any, type[Exception], str]] = [
        (np.array([[5, -1]]), ValueError, rf"must lie in \[0, {VOCAB}\), got -1"),
        (np.array([[VOCAB, 5]]), ValueError, rf"must lie in \[0, {VOCAB}\), got {VOCAB}"),
        (np.array([[5], [6]]), ValueError, r"expected shape \(B, N\) = \(1, 2\), got \(2, 1\)"),
        (np.array([5, 6]), ValueError, r"expected shape \(B, N\) = \(1, 2\), got \(2,\)"),
        (np.array([[1.5, 2.0]]), TypeError, "expected integer token ids, got an array of float64"),
        (np.array([[True, False]]), TypeError, "expected integer token ids, got an array of bool"),
    ]
    for tokens, error, message in refused:
        with pytest.raises(error, match="^tokens: .*" + message):
            policy.append(particles, tokens)
        assert_unchanged(particles, before)
    policy.next_log_probs(particles)  # still usable
    particles.finished[0, 1] = True  # a finished particle's entry is not read
    policy.append(particles, np.array([[5, -1]], dtype=np.int32))
    assert particles.lengths.tolist() == [[1, 0]] and particles.tokens[0, 0, 0] == 5
    assert np.isfinite(policy.next_log_probs(particles)[0, 0]).all()


def test_a_failed_deferred_session_run_leaves_the_particles_unusable() -> None:
    """The deferred session run of an append that fails (here ONNX Runtime's Gather on an id past the
    vocabulary, fed past ``append``'s check) raises at the next read, and every later read, copy or
    reorder raises too, from that error: the tokens and mask were written but not the logits and caches,
    which were read silently as they stood before the append."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=8)
    particles = policy.start(["abc"], 2)
    policy.next_log_probs(particles)
    policy._advance(particles, np.array([[5, VOCAB]]), ~particles.finished)
    with pytest.raises(Exception, match="Gather") as failed:
        policy.next_log_probs(particles)
    later = [
        lambda: policy.next_log_probs(particles),
        lambda: policy.append(particles, np.array([[6, 6]])),
        lambda: policy.propose(particles, np.random.default_rng(0)),
        lambda: particles.reorder(np.array([[1, 0]])),
        lambda: particles.select([0]),
        lambda: particles.view_rows(0, 1),
        lambda: Particles.concatenate([particles, policy.start(["de"], 2)]),
        lambda: copy.deepcopy(particles),
    ]
    for read in later:
        with pytest.raises(
            RuntimeError, match=r"^particles: unusable after deferred model work failed"
        ) as raised:
            read()
        assert raised.value.__cause__ is failed.value
    assert particles.deferred and particles.lengths.tolist() == [[1, 1]]  # nothing more was written
