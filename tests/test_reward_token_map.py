"""``OnnxRewardModel`` with a ``token_map`` (a reward model whose vocabulary is not the policy's): its
``delimiter_ids`` are the reward model's own ids, as ``pad_token_id`` is (checked against its vocabulary,
the ids a PRM scores at), so a step is scored where the translated ids hold a delimiter. They were
matched against the policy's ids. Real fixture models, re-encoded and with the KV cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, Particles

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"
PRM, VALUE = MODELS / "prm-tiny", MODELS / "gpt2-value-tiny"
VOCAB = 64  # every fixture's
# policy id p -> reward id (5 p + 7) mod 64, a permutation: the reward model's space (39, the fixtures'
# tokenizer's) is the policy's id 32, and the policy's 39 is the reward model's 10
MAPPING = (5 * np.arange(VOCAB) + 7) % VOCAB
SPACE = 39
POLICY_SPACE = int(np.flatnonzero(MAPPING == SPACE)[0])


def particles_of(prompts: list[list[int]], tokens: list[list[list[int]]]) -> Particles:
    """Particles with these prompts and generated tokens (all of them, to be revealed step by step)."""
    count, width = len(tokens[0]), len(tokens[0][0])
    particles = Particles.empty([None] * len(prompts), count, width)
    particles.prompt_tokens = [np.array(p, dtype=np.int64) for p in prompts]
    particles.tokens[:] = tokens
    return particles


@pytest.mark.parametrize(("fixture", "options"), [(PRM, {}), (VALUE, {"output": "value"})])
@pytest.mark.parametrize("kv_cache", [None, False])
def test_delimiters_are_matched_in_the_reward_models_ids(
    fixture: Path, options: dict[str, Any], kv_cache: Optional[bool]
) -> None:
    """Step by step, the values of policy ids through the map are those of the translated ids without a
    map, read at the reward model's delimiter: a policy token that translates into one is a step's end,
    the policy's own id of that number is not."""
    assert POLICY_SPACE == 32 and MAPPING[SPACE] == 10
    common = {"kind": "logit", "position": "delimiter", "delimiter_ids": [SPACE], "kv_cache": kv_cache}
    mapped = OnnxRewardModel(fixture, token_map=MAPPING, **common, **options)
    plain = OnnxRewardModel(fixture, **common, **options)
    at_last = OnnxRewardModel(fixture, kind="logit", kv_cache=kv_cache, **options)
    assert mapped.kv_cached == plain.kv_cached == (fixture == VALUE and kv_cache is None)
    np.testing.assert_array_equal(mapped.policy_delimiter_ids, [POLICY_SPACE])
    # rows with the policy's 32 (a delimiter once translated) and 39 (not one) at several places
    policy_tokens = [
        [[5, 32, 8, 9, 11], [39, 6, 39, 7, 12], [32, 39, 4, 32, 3]],
        [[39, 39, 39, 39, 39], [13, 14, 32, 15, 16], [17, 18, 19, 20, 32]],
    ]
    prompts = [[3, 4, 39, 5], [6]]
    policy = particles_of(prompts, policy_tokens)
    reward = particles_of([list(MAPPING[p]) for p in prompts], MAPPING[np.array(policy_tokens)].tolist())
    np.testing.assert_array_equal(mapped.initial_log_value(policy), plain.initial_log_value(reward))
    differs = False
    for length in range(1, 6):
        for particles in (policy, reward):
            particles.lengths[:] = length
        got, expected = mapped.log_value(policy), plain.log_value(reward)
        np.testing.assert_array_equal(got, expected, err_msg=f"{length} tokens")
        differs |= not np.array_equal(expected, at_last.log_value(reward))
    assert differs  # the delimiter's place is read, not every prefix's last token


def test_a_delimiter_no_policy_token_translates_into_is_refused() -> None:
    """position='delimiter' where the map sends no policy id to a delimiter would never score a step at
    its end: refused at load, naming delimiter_ids and whose ids they are."""
    no_space = np.where(np.arange(VOCAB) == SPACE, 2, np.arange(VOCAB))
    with pytest.raises(ValueError, match=r"^delimiter_ids: token_map translates no policy token into \[39\]"):
        OnnxRewardModel(PRM, position="delimiter", delimiter_ids=[SPACE], token_map=no_space)
    reads_last = OnnxRewardModel(PRM, delimiter_ids=[SPACE], token_map=no_space)  # position='last'
    assert reads_last.position == "last"


def test_the_verifier_is_given_the_policys_text_through_a_token_map(tmp_path: Path) -> None:
    """With a token_map the verifier is given the policy's text, the result's, not the policy's ids decoded
    by the reward model's tokenizer (here one whose ids of 'a' and 'b' are swapped: it read 'aab' as 'bba').
    Particles that carry no policy to decode them (built by hand, not by a policy's start) give the verifier
    the policy's token ids, which the reward model's tokenizer cannot read."""
    folder = tmp_path / "prm-swapped"
    shutil.copytree(PRM, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = vocab["a"], vocab["b"]
    vocab["a"], vocab["b"] = b, a
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    swap = np.arange(VOCAB)
    swap[[a, b]] = [b, a]
    seen: set[str] = set()

    def verifier(prompt: Any, text: str) -> float:
        seen.add(text)
        return 1.0

    reward = OnnxRewardModel(folder, kind="logit", token_map=swap, verifier=verifier)
    policy = OnnxCausalLM(MODELS / "gpt2-tiny", max_new_tokens=4)
    result = tiltsmc.smc(policy, reward, prompts=["ab", "ba"], num_particles=16, rng=0)
    assert result.texts is not None
    texts = {text for per_prompt in result.texts for text in per_prompt}
    assert any("a" in text or "b" in text for text in texts)  # where the two tokenizers differ
    assert texts <= seen
    finished = particles_of([[a]], [[[a, a, b]]])
    finished.lengths[:], finished.finished[:] = 3, True
    ids: list[Any] = []
    by_ids = OnnxRewardModel(
        folder, kind="logit", token_map=swap, verifier=lambda _, text: ids.append(text) or 1.0
    )
    by_ids.log_value(
        finished
    )  # particles without a decoder: the policy's ids, which its tokenizer cannot read
    assert [list(map(int, text)) for text in ids] == [[a, a, b]]
    finished.text_decoder = policy  # as the policy's start sets it
    seen.clear()
    reward.log_value(finished)
    assert seen == {"aab"}
