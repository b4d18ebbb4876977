"""``scripts/train_smollm2_value.py`` on a fixture: its recorder of the policy's hidden states.

The trainer labels each prefix of its rollouts with the hidden state the policy's session computed at the
prefix's last token, recorded row by row as the session is fed. Its rollouts need the converted SmolLM2
(``tests/test_real_model.py`` checks the head it writes where it is present); the recorder's contract with
the policy is checked here on ``gpt2-value-tiny``, whose 64 logits stand in for the hidden state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from tiltsmc.models import OnnxCausalLM

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "models" / "gpt2-value-tiny"


def _trainer() -> ModuleType:
    path = ROOT / "scripts" / "train_smollm2_value.py"
    spec = importlib.util.spec_from_file_location("train_smollm2_value", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample(policy: OnnxCausalLM) -> np.ndarray:
    """Prompts of different lengths, lines ending at different tokens: rows finish their steps apart."""
    particles = policy.start(["ab", "hello there, a longer one"], 4)
    rng = np.random.default_rng(0)
    while not particles.finished.all():
        policy.propose(particles, rng)
    particles.flush()
    return particles.lengths.reshape(-1)


def test_the_value_trainer_records_one_hidden_state_per_token_of_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every row's recorded states are as many as its tokens (its last one included), each the session's
    output at that token; a policy that decodes a step's last tokens on the rows still writing it (the
    default ``step_rows_below``) runs calls on fewer rows, which the recorder refuses, naming the option."""
    trainer = _trainer()
    monkeypatch.setattr(trainer, "HIDDEN", "logits")
    policy, recorder = trainer.recording_policy(FIXTURE, max_new_tokens=24, temperature=1.0, threads=1)
    lengths = _sample(policy)
    assert len(recorder.rows) == lengths.size and len(recorder.prompt_ends) == 2
    assert [len(states) for states in recorder.rows] == lengths.tolist()
    assert len(set(lengths.tolist())) > 1  # rows of different lengths, so steps ended apart
    assert all(state.shape == (64,) for states in recorder.rows for state in states)

    compacting = OnnxCausalLM(FIXTURE, max_new_tokens=24, step="\n", temperature=1.0, value_output="value")
    assert compacting.step_rows_below > 0
    trainer.HiddenRecorder(compacting)
    with pytest.raises(RuntimeError, match="step_rows_below=0"):
        _sample(compacting)
