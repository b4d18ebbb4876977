"""Requests as a service receives them: one hostile prompt fails alone, a bare string is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models.prompts import check_prompts
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import MarkovPolicy
from tokenizers import Tokenizer as HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = FIXTURES / "llama-tiny", FIXTURES / "prm-tiny"

SAMPLERS: dict[str, Callable[..., tiltsmc.SamplerResult]] = {
    "smc": lambda p, r, prompts, rng: tiltsmc.smc(p, r, prompts, num_particles=3, rng=rng),
    "sp_gsmc": lambda p, r, prompts, rng: tiltsmc.sp_gsmc(p, r, prompts, pool_size=3, rng=rng),
    "mh": lambda p, r, prompts, rng: tiltsmc.mh(p, r, prompts, pool_size=2, steps=2, rng=rng),
    "best_of_n": lambda p, r, prompts, rng: tiltsmc.best_of_n(p, r, prompts, n=3, rng=rng),
    "rejection": lambda p, r, prompts, rng: tiltsmc.rejection(p, r, prompts, bound=1, max_tries=50, rng=rng),
}


@pytest.fixture(scope="module")
def models() -> tuple[OnnxCausalLM, OnnxRewardModel]:
    return OnnxCausalLM(POLICY, max_new_tokens=3), OnnxRewardModel(REWARD, kind="logit")


class RaisingTokenizer:
    """The fixture's real tokenizer, except that encoding a text containing "boom" raises RuntimeError:
    a tokenizer failing with an exception type the policy cannot know in advance."""

    def __init__(self) -> None:
        self.inner = HFTokenizer.from_file(str(POLICY / "tokenizer.json"))

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        if "boom" in text:
            raise RuntimeError("tokenizer exploded")
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=skip_special_tokens))

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=with_added_tokens))

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self.inner.get_vocab(with_added_tokens=with_added_tokens))

    def token_to_id(self, token: str) -> Any:
        return self.inner.token_to_id(token)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_lone_surrogate_fails_its_prompt_only(models: Any, sampler: str) -> None:
    """``json.loads('"ab\\ud800cd"')`` gives a lone surrogate, which the tokenizer refuses with a TypeError:
    that prompt is reported in ``result.errors`` and the others run."""
    policy, reward = models
    hostile = json.loads('"ab\\ud800cd"')
    result = SAMPLERS[sampler](policy, reward, [hostile, "ok", "ab"], np.random.default_rng(0))
    assert set(result.errors) == {0}
    assert "not valid Unicode" in result.errors[0] and "'\\ud800' at character 2" in result.errors[0]
    assert result.collapsed[0] and not result.collapsed[1:].any()
    assert np.isfinite(result.log_z[1:]).all()
    assert result.texts is not None and all(len(texts) > 0 for texts in result.texts[1:])


def test_any_tokenizer_exception_fails_its_prompt_only(models: Any) -> None:
    _, reward = models
    policy = OnnxCausalLM(POLICY, tokenizer=RaisingTokenizer(), max_new_tokens=3)
    result = tiltsmc.smc(policy, reward, ["ok", "boom", "ab"], num_particles=3, rng=np.random.default_rng(1))
    assert result.errors == {1: "prompt 1: tokenizer exploded"}
    assert np.isfinite(result.log_z[[0, 2]]).all() and result.collapsed[1]


def test_a_tokenizer_of_the_users_own_needs_only_encode_and_decode(models: Any) -> None:
    """A tokenizer object with ``encode`` and ``decode`` (no batch methods) encodes prompts and checks
    stop strings (decoded one by one), as the library's own tokenizer does in one call."""
    _, reward = models
    own = OnnxCausalLM(POLICY, tokenizer=RaisingTokenizer(), max_new_tokens=6, stop=["a"])
    library = OnnxCausalLM(POLICY, max_new_tokens=6, stop=["a"])
    assert not hasattr(RaisingTokenizer(), "encode_batch") and not hasattr(RaisingTokenizer(), "decode_batch")
    results = [
        tiltsmc.smc(policy, reward, ["ok", "ab"], num_particles=4, rng=np.random.default_rng(2))
        for policy in (own, library)
    ]
    assert results[0].texts == results[1].texts and not results[0].errors
    np.testing.assert_array_equal(results[0].log_z, results[1].log_z)


@pytest.mark.parametrize("prompts", ["hello", b"hello", bytearray(b"hi")])
def test_a_bare_string_is_refused_not_read_letter_by_letter(models: Any, prompts: Any) -> None:
    """By the policies' start() and by every sampler (which lists the prompts before start() sees them)."""
    policy, reward = models
    with pytest.raises(TypeError, match=r"prompts: expected a list of prompts, got a .*\[prompt\]"):
        policy.start(prompts, 2)
    for sampler in (tiltsmc.smc, tiltsmc.sp_gsmc, tiltsmc.mh, tiltsmc.best_of_n, tiltsmc.rejection):
        with pytest.raises(TypeError, match="prompts: expected a list of prompts"):
            sampler(policy, reward, prompts, rng=0)
    with pytest.raises(TypeError, match="prompts: expected a list of prompts"):
        MarkovPolicy(MarkovDFATask.needle(2, 2, rng=0)).start(prompts, 2)


def test_check_prompts() -> None:
    assert check_prompts(None) is None
    assert check_prompts(("a", [1, 2])) == ["a", [1, 2]]
    assert check_prompts(p for p in ["x"]) == ["x"]
    with pytest.raises(TypeError, match="got int"):
        check_prompts(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got a str \('hello'\)"):
        check_prompts("hello")
