"""``scripts/train_smollm2_value.py`` on a fixture: its recorder of the policy's hidden states.

The trainer labels each prefix of its rollouts with the hidden state the policy's session computed at the
prefix's last token, recorded row by row as the session is fed. Its rollouts need the converted SmolLM2
(``tests/test_real_model.py`` checks the head it writes where it is present); the recorder's contract with
the policy is checked here on ``gpt2-value-tiny``, whose 64 logits stand in for the hidden state.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from script_modules import load_script
from tiltsmc.models import OnnxCausalLM

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "models" / "gpt2-value-tiny"


def _trainer() -> ModuleType:
    return load_script("train_smollm2_value")


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
        # only 75 counting chains of a length: problems would repeat, or the held-out ones be trained on
        (["--problems", "70"], "--problems, --held-out: 70 + 8 distinct problems of a length asked for"),
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


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_the_value_trainer_holds_out_problems_it_never_trains_on(seed: int) -> None:
    """With the default sizes, every T's training problems are distinct, and none is held out too (with
    seed 1, 9 of the 32 held-out problems were trained on, and 11 training problems were repeats); the
    split is the same for a seed."""
    trainer = _trainer()
    args = trainer.build_parser().parse_args(["--out", "unused"])
    train, held = trainer.split_problems(args.levels, args.problems, args.held_out, seed)
    assert list(train) == list(held) == args.levels
    for num_steps in args.levels:
        assert len(set(train[num_steps])) == len(train[num_steps]) == args.problems
        assert len(set(held[num_steps])) == len(held[num_steps]) == args.held_out
        assert not set(train[num_steps]) & set(held[num_steps])
        assert all(p.num_steps == num_steps for p in train[num_steps] + held[num_steps])
    assert (train, held) == trainer.split_problems(args.levels, args.problems, args.held_out, seed)
    other = trainer.split_problems(args.levels, args.problems, args.held_out, seed + 1)
    assert other != (train, held)


def test_the_value_trainer_folds_by_problem() -> None:
    """Every prefix of a problem is in the problem's fold, one problem listed twice included; the distinct
    problems are spread evenly over the folds."""
    trainer = _trainer()
    train, _ = trainer.split_problems([2, 4], 6, 1, seed=3)
    problems = train[2] + train[4]
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(len(problems)), rng.integers(1, 6, len(problems)))
    folds = trainer.cross_validation_folds(problems, groups)
    assert folds.shape == groups.shape
    fold_of = {problems[g]: f for g, f in zip(groups.tolist(), folds.tolist())}
    assert all(fold_of[problems[g]] == f for g, f in zip(groups.tolist(), folds.tolist()))
    assert sorted(fold_of.values()) == sorted([0, 1, 2, 3] * 3)
    twice = [*problems, problems[5]]  # index 12 is problem 5 again
    folds = trainer.cross_validation_folds(twice, np.array([5, 12, 0]))
    assert folds[0] == folds[1] == 1 and folds[2] == 0


def test_the_value_trainer_rolls_out_disjoint_problem_sets(
    model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer samples its training and held-out rollouts on the split's problems (the rollouts and the
    graphs replaced by stand-ins), and reports the distinct problems of each."""
    trainer = _trainer()
    seen: list[dict[int, list[object]]] = []

    def fake_rollouts(args: object, hidden_dir: Path, problems_by_level: dict, stream: int) -> dict:
        seen.append(problems_by_level)
        problems = [p for level in problems_by_level.values() for p in level]
        groups = np.repeat(np.arange(len(problems)), 3)
        rng = np.random.default_rng(stream)
        return {
            "X": rng.normal(size=(groups.size, 4)),
            "y": (np.arange(groups.size) % 2).astype(float),
            "group": groups,
            "step": np.tile([0, 1, 2], len(problems)),
            "problems": problems,
            "answers": {},
        }

    monkeypatch.setattr(trainer, "with_head", lambda source, dest, *a, **k: dest.mkdir(exist_ok=True))
    monkeypatch.setattr(trainer, "rollouts", fake_rollouts)
    out = tmp_path / "out"
    trainer.main(["--model", str(model_folder), "--out", str(out), "--levels", "2", "4", "--seed", "1"])
    train, held = seen
    assert list(train) == list(held) == [2, 4]
    for num_steps in (2, 4):
        assert len(set(train[num_steps])) == 24 and len(set(held[num_steps])) == 8
        assert not set(train[num_steps]) & set(held[num_steps])
    report = json.loads((out / "value_head.json").read_text())
    assert report["train"]["problems"] == 48 and report["held_out"]["problems"] == 16
