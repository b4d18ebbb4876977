"""``scripts/train_smollm2_value.py`` on a fixture: its recorder of the policy's hidden states.

The trainer labels each prefix of its rollouts with the hidden state the policy's session computed at the
prefix's last token, recorded row by row as the session is fed. Its rollouts need the converted SmolLM2
(``tests/test_real_model.py`` checks the head it writes where it is present); the recorder's contract with
the policy is checked here on ``gpt2-value-tiny``, whose 64 logits stand in for the hidden state.
"""

from __future__ import annotations

import importlib.util
import sys
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


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder that passes the trainer's --model check (the rollouts never run here)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not read")
    (folder / "config.json").write_text('{"hidden_size": 4}')
    return folder


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # refused only after the training rollouts (10-30 min), as the held-out ones started
        (["--held-out", "0"], "argument --held-out: expected an integer >= 1, got 0"),
        (["--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),  # was "range() arg 3 ..."
        (["--samples", "0"], "argument --samples: expected an integer >= 1, got 0"),
        (["--problems", "-1"], "argument --problems: expected an integer >= 1, got -1"),
        (["--levels", "4", "17"], "argument --levels: expected an integer from 1 to 16, got 17"),
        (["--levels", "0"], "argument --levels: expected an integer from 1 to 16, got 0"),
        (["--temperature", "0"], "argument --temperature: expected a finite number > 0, got 0"),
        (["--temperature", "nan"], "argument --temperature: expected a finite number > 0, got nan"),
        (["--penalties", "1", "-1"], "argument --penalties: expected a finite number >= 0, got -1"),
        (["--penalties", "inf"], "argument --penalties: expected a finite number >= 0, got inf"),
        (["--threads", "0"], "argument --threads: expected an integer from 1 to 1024, got 0"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
    ],
)
def test_the_value_trainer_checks_every_argument_before_any_work(
    options: list[str],
    message: str,
    model_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trainer = _trainer()

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trainer started work")

    monkeypatch.setattr(trainer, "with_head", reached)
    monkeypatch.setattr(trainer, "rollouts", reached)
    argv = ["--model", str(model_folder), "--out", str(tmp_path / "out"), *options]
    monkeypatch.setattr(sys, "argv", ["train_smollm2_value.py", *argv])  # as the script reads them
    with pytest.raises(SystemExit) as exit_info:
        trainer.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_value_trainer_checks_its_folders_before_any_work(
    model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out is written after the rollouts: a file there, the --model folder itself or a folder that cannot
    be created are refused first; so is a --model whose config.json has no hidden size."""
    trainer = _trainer()
    monkeypatch.setattr(trainer, "with_head", lambda *a, **k: pytest.fail("the trainer started work"))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"")
    (broken / "config.json").write_text('{"hidden": 4}')
    for argv, message in [
        (["--out", str(a_file)], f"--out: {a_file} exists and is not a folder"),
        (["--out", str(a_file / "below")], f"--out: cannot create or write {a_file / 'below'}"),
        (["--out", str(model_folder)], "--out: " + str(model_folder) + " is the --model folder"),
        (["--model", str(broken), "--out", str(tmp_path / "out")], "--model: cannot read the hidden size"),
        (["--model", str(tmp_path), "--out", str(tmp_path / "out")], "--model: no model.onnx in"),
    ]:
        if "--model" not in argv:
            argv = ["--model", str(model_folder), *argv]
        monkeypatch.setattr(sys, "argv", ["train_smollm2_value.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            trainer.main()
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
