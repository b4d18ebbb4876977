"""The bundled arithmetic task, its trained ONNX models, and ``tiltsmc demo``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiltsmc
from tiltsmc import cli
from tiltsmc import demo as demo_module
from tiltsmc.samplers.result import SamplerResult
from tiltsmc.tasks import arithmetic

# --------------------------------------------------------------------------- the task


@pytest.mark.parametrize("steps", [1, 5, 16])
def test_problems_stay_in_range_and_their_solutions_verify(steps: int) -> None:
    for problem in arithmetic.make_problems(steps, 50, rng=steps):
        assert problem.num_steps == steps
        assert all(0 <= v <= 99 for v in problem.values) and 10 <= problem.start <= 89
        prompt = problem.prompt
        assert prompt.endswith("\n") and prompt.count(" ") == steps
        solution = problem.solution()
        assert len(solution.split("\n")) == steps
        assert arithmetic.verify(prompt, solution) == 1.0
        assert arithmetic.verify(problem, solution) == 1.0
        assert arithmetic.parse_answer(solution) == problem.answer


def test_verify_rejects_wrong_answers_and_wrong_line_counts() -> None:
    problem = arithmetic.make_problems(3, 1, rng=0)[0]
    lines = problem.solution().split("\n")
    wrong = [*lines[:-1], lines[-1][:-2] + f"{(problem.answer + 1) % 100:02d}"]
    assert arithmetic.verify(problem.prompt, "\n".join(wrong)) == 0.0
    assert arithmetic.verify(problem.prompt, "\n".join(lines[:-1])) == 0.0  # a line short
    assert arithmetic.verify(problem.prompt, "\n".join([*lines, lines[-1]])) == 0.0  # a line too many
    assert arithmetic.verify(problem.prompt, "") == 0.0
    assert arithmetic.verify(problem.prompt, problem.solution() + "\n") == 1.0  # a trailing newline is fine
    assert arithmetic.parse_answer("a:12+3=1") is None and arithmetic.parse_answer("") is None


def test_a_known_problem_reads_as_written() -> None:
    problem = arithmetic.Problem(57, (("+", 8), ("-", 3), ("+", 9)))
    assert problem.prompt == "57 a+8 b-3 c+9\n"
    assert problem.solution() == "a:57+8=65\nb:65-3=62\nc:62+9=71"
    assert problem.values == (57, 65, 62, 71)


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 3), "num_steps"), ((17, 3), "num_steps"), ((3, 0), "count"), ((True, 3), "num_steps")],
)
def test_make_problems_bad_input(args: tuple[int, int], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        arithmetic.make_problems(*args)


def test_verify_names_a_malformed_prompt() -> None:
    with pytest.raises(ValueError, match="prompt"):
        arithmetic.verify("hello\n", "a:12+3=15")
    with pytest.raises(ValueError, match="operation 2"):
        arithmetic.verify("12 a+3 c+4\n", "a:12+3=15")


# --------------------------------------------------------------------------- the bundled models


@pytest.fixture(scope="module")
def models() -> tuple[tiltsmc.models.OnnxCausalLM, tiltsmc.models.OnnxRewardModel]:
    return arithmetic.load_models(intra_op_num_threads=1)


def test_bundled_models_are_small_and_in_the_export_layout() -> None:
    files = [p for p in arithmetic.MODELS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 5 * 2**20
    for name in ("policy", "prm"):
        for required in ("model.onnx", "config.json", "tokenizer.json"):
            assert (arithmetic.MODELS_DIR / name / required).is_file()
    training = json.loads((arithmetic.MODELS_DIR / "training.json").read_text())
    assert training["seed"] == 0 and "policy_evaluation" in training


def test_the_policy_writes_well_formed_but_imperfect_solutions(models) -> None:
    policy, reward = models
    problems = arithmetic.make_problems(6, 16, rng=1)
    result = tiltsmc.best_of_n(policy, reward, [p.prompt for p in problems], n=8, rng=2)
    z = np.exp(result.log_z)  # the mean verified reward of 8 draws per problem
    assert result.texts is not None
    for texts in result.texts:
        for line_index, line in enumerate(texts[0].split("\n")):
            assert line[:2] == f"{arithmetic.LABELS[line_index]}:" and line[4] in "+-" and line[6] == "="
    # Imperfect: over 128 six-step solutions some are right and some wrong (the trained policy's
    # one-sample accuracy at T = 6 is about 0.3: both events have probability > 1 - 1e-12).
    assert 0.0 < z.mean() < 1.0


def test_the_reward_model_rates_a_slip_below_the_right_line(models) -> None:
    # After a wrong line the answer is lost (V* ~ 0); after a right one V* is the chance of finishing,
    # well above 0. The learned model must tell them apart on most problems.
    policy, reward = models
    problems = arithmetic.make_problems(8, 20, rng=3)
    ranked = 0
    for problem in problems:
        lines = problem.solution().split("\n")
        right = lines[:4]
        wrong = [*lines[:3], lines[3][:-2] + f"{(problem.values[4] + 10) % 100:02d}"]
        values = []
        for prefix in (right, wrong):
            particles = policy.start([problem.prompt + "\n".join(prefix) + "\n"], 1)  # the prefix as a prompt
            values.append(float(reward.initial_log_value(particles)[0]))
        ranked += values[0] > values[1] + np.log(4)
    assert ranked >= 18


# --------------------------------------------------------------------------- the demo's parts


def test_noisy_reward_is_a_fixed_function_of_the_prefix_and_keeps_r(models) -> None:
    policy, reward = models
    problems = arithmetic.make_problems(2, 2, rng=4)
    prompts = [p.prompt for p in problems]
    particles = policy.start(prompts, 3)
    rng = np.random.default_rng(5)
    policy.propose(particles, rng)
    noisy = demo_module.NoisyReward(reward, 1.5, seed=7)
    first = noisy.log_value(particles)
    base = reward.log_value(particles)
    assert np.array_equal(first, noisy.log_value(particles))  # deterministic
    assert not np.allclose(first, base)
    assert np.array_equal(demo_module.NoisyReward(reward, 0.0).log_value(particles), base)
    while not particles.finished.all():
        policy.propose(particles, rng)
    assert np.array_equal(noisy.log_value(particles), reward.log_value(particles))  # r is untouched


def _result(texts: list[list[str]], log_weights: list[np.ndarray], collapsed: list[bool]) -> SamplerResult:
    batch = len(texts)
    return SamplerResult(
        sampler="smc",
        samples=[[] for _ in texts],
        log_weights=log_weights,
        log_z=np.zeros(batch),
        ess=np.zeros((batch, 0)),
        resampled=np.zeros((batch, 0), dtype=bool),
        unique_ancestors=np.zeros((batch, 0), dtype=np.int64),
        log_z_increments=np.zeros((batch, 0)),
        collapsed=np.array(collapsed),
        texts=texts,
    )


def test_accuracy_is_the_weighted_share_of_right_solutions() -> None:
    problems = arithmetic.make_problems(2, 2, rng=6)
    right = [p.solution() for p in problems]
    wrong = right[0][:-2] + f"{(problems[0].answer + 1) % 100:02d}"
    result = _result(
        [[right[0], wrong, right[0]], [right[1]]],
        [np.log([0.5, 0.3, 0.2]), np.zeros(1)],
        [False, True],
    )
    np.testing.assert_allclose(demo_module.accuracy(result, problems), [0.7, 0.0])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("levels", (0,), "levels"),
        ("levels", (17,), "levels"),
        ("budgets", (), "budgets"),
        ("problems", 0, "problems"),
        ("noise", -1.0, "noise"),
        ("noise", float("nan"), "noise"),
        # its ratios overflowed in the Bellman estimate (RuntimeWarnings), its log-values rounded the
        # learned model's away (accuracies off, above 1 at 1e300)
        ("noise", 1e6, r"^noise: expected a finite sd in \[0, 32\], got 1000000.0$"),
        ("noise", 32.5, "noise"),
        ("bellman_samples", 0, "bellman_samples"),
        # run and tabled twice
        ("levels", (4, 8, 4), r"^levels: expected distinct values, got \(4, 8, 4\) \(4 twice\)$"),
        ("budgets", (2, 2), r"^budgets: expected distinct values, got \(2, 2\) \(2 twice\)$"),
        # accepted, then refused later naming the samplers' arguments (rng, num_steps, count,
        # samples_per_prefix), some only after the sampler runs
        ("seed", -1, r"^seed: expected an int >= 0, got -1$"),
        ("seed", 1.5, r"^seed: expected an int >= 0, got 1.5$"),
        ("seed", True, r"^seed: expected an int >= 0, got True$"),
        (
            "levels",
            (2.5,),
            r"^levels: expected a non-empty sequence of ints in 1\.\.16, got 2.5 in \(2.5,\)$",
        ),
        ("levels", (True,), r"^levels: expected a non-empty sequence of ints in 1\.\.16, got True in"),
        ("levels", 4, r"^levels: expected a non-empty sequence of ints in 1\.\.16, got 4$"),
        ("levels", "48", r"^levels: expected a non-empty sequence of ints in 1\.\.16, got '48'$"),
        ("levels", np.array([2]), r"^levels: expected a non-empty sequence of ints in 1\.\.16, got array"),
        ("budgets", (True,), r"^budgets: expected a non-empty sequence of ints in 1\.\.4096, got True in"),
        ("budgets", (2.0,), r"^budgets: expected a non-empty sequence of ints in 1\.\.4096, got 2.0 in"),
        ("problems", 2.5, r"^problems: expected an int in 1\.\.100000, got 2.5$"),
        ("problems", True, r"^problems: expected an int in 1\.\.100000, got True$"),
        ("problems", "3", r"^problems: expected an int in 1\.\.100000, got '3'$"),
        ("bellman_samples", 2.5, r"^bellman_samples: expected an int >= 1, got 2.5$"),
        ("bellman_prompts", True, r"^bellman_prompts: expected an int >= 1, got True$"),
        ("bellman_prefixes", None, r"^bellman_prefixes: expected an int >= 1, got None$"),
        ("threads", 1.5, r"^threads: expected an int in 1\.\.1024, got 1.5$"),
        ("threads", True, r"^threads: expected an int in 1\.\.1024, got True$"),
        ("threads", 1025, r"^threads: expected an int in 1\.\.1024, got 1025$"),  # as ONNX Runtime's bound
        ("noise", True, r"^noise: expected a finite sd in \[0, 32\], got True$"),
        ("noise", "2", r"^noise: expected a finite sd in \[0, 32\], got '2'$"),
        pytest.param(
            "noise", 10**400, r"^noise: expected a finite sd in \[0, 32\], got 1000", id="noise-10**400"
        ),
    ],
)
def test_demo_config_bad_values(field: str, value: object, message: str) -> None:
    config = demo_module.DemoConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_run_demo_refuses_a_bad_config_before_any_work() -> None:
    """``bellman_samples=2.5`` was refused by the Bellman estimate, naming ``samples_per_prefix``, after
    every sampler run of the first level."""
    config = demo_module.DemoConfig(levels=(2,), budgets=(2,), problems=2, bellman_samples=2.5)  # type: ignore[arg-type]

    def models_for(level: int) -> tuple[object, object]:
        raise AssertionError("the demo started work")

    with pytest.raises(ValueError, match=r"^bellman_samples: expected an int >= 1, got 2.5$"):
        demo_module.run_demo(config, models=models_for)


def test_a_demo_config_of_numpy_numbers_runs_as_the_same_python_numbers(models, tmp_path: Path) -> None:
    """numpy integers (and a float32 noise) are taken as the ints (float) they are: the same run, and a
    demo.json of plain numbers (its encoder refused the record's numpy integers, after every run)."""
    plain = {"levels": (2,), "budgets": (2,), "problems": 2, "seed": 3, "noise": 2.0, "threads": 1}
    plain.update(bellman_prompts=1, bellman_prefixes=2, bellman_samples=2)
    numpy_numbers = {
        name: tuple(np.int64(v) for v in value)
        if isinstance(value, tuple)
        else np.float32(value)
        if name == "noise"
        else np.int32(value)
        for name, value in plain.items()
    }
    records = [
        demo_module.run_demo(demo_module.DemoConfig(**config), models=models)  # type: ignore[arg-type]
        for config in (plain, numpy_numbers)
    ]
    accuracies = [
        [(r["sampler"], r["reward_model"], r["accuracy"]) for r in rec["results"]] for rec in records
    ]
    assert accuracies[0] == accuracies[1]
    demo_module.write_outputs(records[1], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "demo.json").read_text())["config"]
    assert written == {**plain, "levels": [2], "budgets": [2]}


def test_a_small_demo_run_records_every_sampler(models, tmp_path: Path) -> None:
    config = demo_module.DemoConfig(
        levels=(2,), budgets=(2, 4), problems=3, bellman_prompts=1, bellman_prefixes=2, bellman_samples=2
    )
    calls = []
    record = demo_module.run_demo(config, models=models, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] == len(calls)
    names = {(row["sampler"], row["reward_model"], row["budget"]) for row in record["results"]}
    # SP-gSMC + MH needs C >= 4 (H = 3 proposals and the first run, each with a pool of C / 4)
    assert ("sp-gsmc+mh", "learned", 2) not in names and ("sp-gsmc+mh", "learned", 4) in names
    assert {("smc", "degraded", 2), ("best-of-n", "learned", 4), ("sp-gsmc", "degraded", 4)} <= names
    for row in record["results"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["policy_steps_per_problem"] > 0
    assert set(record["bellman_error"]["2"]) == {"learned", "degraded"}
    table = demo_module.render_table(record)
    assert "best-of-N" in table and "Bellman error" in table
    written = demo_module.write_outputs(record, tmp_path / "out")
    assert {p.name for p in written} >= {"demo.json", "demo.txt"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["config"]["levels"] == [2]


def test_run_demo_takes_a_task_and_models_per_level(models) -> None:
    """The comparison of ``bench/real_model.py``: another task's problems, prompts and verifier, and the
    models built for each T."""
    levels_asked: list[int] = []
    verified: list[str] = []

    def models_for(level: int):
        levels_asked.append(level)
        return models

    def verify(problem: arithmetic.Problem, text: str) -> float:
        verified.append(text)
        return arithmetic.verify(problem.prompt, text)

    task = demo_module.DemoTask(
        "arithmetic, own verifier",
        lambda level, count, rng: arithmetic.make_problems(level, count, rng=rng),
        lambda problem: problem.prompt,
        verify,
    )
    config = demo_module.DemoConfig(
        levels=(1, 2), budgets=(2,), problems=2, bellman_prompts=1, bellman_prefixes=2, bellman_samples=2
    )
    record = demo_module.run_demo(config, models=models_for, task=task)
    assert levels_asked == [1, 2] and record["task"] == "arithmetic, own verifier"
    # every output of the five runs per level (best-of-N, SMC, SP-gSMC, SMC*, SP-gSMC*) went through it
    assert len(verified) >= 2 * 5 * 2
    with pytest.raises(ValueError, match="name"):
        demo_module.run_sampler("beam", *models, ["01 a+1\n"], 2, np.random.default_rng(0))


# --------------------------------------------------------------------------- the command line


def test_cli_demo_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--levels", "20", "--out", str(tmp_path / "x")]) == 2
    assert "levels" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "sub")]) == 2
    assert "out: cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--problems", "0"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--out", ""],
            "tiltsmc: demo: --out: expected a folder name, got ''\n",
        ),  # wrote to the current folder
        (
            ["--levels", "4", "4"],
            "tiltsmc: demo: --levels: expected distinct values, got (4, 4) (4 twice)\n",  # ran twice
        ),
        (["--budgets", "2", "4", "2"], "tiltsmc: demo: --budgets: expected distinct values, got (2, 4, 2)"),
        (["--noise", "1e6"], "tiltsmc: demo: --noise: expected a finite sd in [0, 32], got 1000000.0\n"),
    ],
)
def test_cli_demo_refuses_options_before_it_runs(
    options: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo ran")

    monkeypatch.setattr(demo_module, "run_demo", reached)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", *options]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_the_noise_bound_keeps_the_degraded_models_ratios_within_doubles() -> None:
    """MAX_NOISE's reason: NoisyReward's z lies within the normal quantiles of its hash's extreme uniforms,
    and exp(MAX_NOISE (z_max - z_min)) leaves room below the largest double for the learned model's ratio."""
    from statistics import NormalDist

    low, high = NormalDist().inv_cdf(0.5 / 2.0**64), NormalDist().inv_cdf(1.0 - 2.0**-53)
    headroom = np.log(np.finfo(np.float64).max) - demo_module.MAX_NOISE * (high - low)
    assert 100.0 < headroom < 200.0


def test_noisy_reward_takes_the_hashes_that_round_to_one(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """The top 2^10 of the 2^64 hashes made a uniform of exactly 1.0, which NormalDist.inv_cdf refuses
    (StatisticsError, about once in 2^54 prefixes): they read as the largest double below 1."""
    import hashlib

    blake2b = hashlib.blake2b

    class Highest:
        def __init__(self, data: bytes, key: bytes) -> None:
            self.real = blake2b(data, key=key)

        def digest(self) -> bytes:
            return b"\xff" * 8 + self.real.digest()[8:]

    noisy = demo_module.NoisyReward(models[1], 1.0, seed=7)
    monkeypatch.setattr(demo_module.hashlib, "blake2b", Highest)
    z = noisy._z(np.arange(3))
    assert z == pytest.approx(8.2095, abs=1e-4)  # the quantile of 1 - 2^-53


def test_cli_demo_interrupted_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_demo", interrupted)
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out)]) == 130
    assert list(out.iterdir()) == []
    assert "interrupted" in capsys.readouterr().err


def test_write_outputs_interrupted_midway_leaves_no_files(tmp_path: Path, monkeypatch, models) -> None:
    config = demo_module.DemoConfig(
        levels=(1,), budgets=(1,), problems=1, bellman_prompts=1, bellman_prefixes=1, bellman_samples=1
    )
    record = demo_module.run_demo(config, models=models)

    def broken(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "render_table", broken)  # demo.txt is written second
    with pytest.raises(KeyboardInterrupt):
        demo_module.write_outputs(record, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- files and signals at the end


@pytest.fixture(scope="module")
def small_record(models) -> dict:
    """A demo record of one level, one budget and one problem (what ``run_demo`` returns)."""
    config = demo_module.DemoConfig(
        levels=(1,), budgets=(1,), problems=1, bellman_prompts=1, bellman_prefixes=1, bellman_samples=1
    )
    return demo_module.run_demo(config, models=models)


def test_the_bellman_estimate_records_and_prints_the_problems_it_used(models) -> None:
    """With fewer problems than ``bellman_prompts`` the estimate takes them all: the record and the table
    say how many (they said the 4 asked where 2 were used)."""
    config = demo_module.DemoConfig(
        levels=(1,), budgets=(1,), problems=2, bellman_prompts=4, bellman_prefixes=1, bellman_samples=1
    )
    record = demo_module.run_demo(config, models=models)
    assert record["config"]["bellman_prompts"] == 2 and record["config"]["problems"] == 2
    assert "(sampled: 2 problems x 1 rollouts x 1 continuations per step)" in demo_module.render_table(record)


@pytest.mark.parametrize("name", ["demo.json", "demo.txt", "demo.png"])
def test_cli_demo_refuses_an_output_entry_that_is_a_folder_before_it_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder where the demo writes one of its files: refused before the run, status 2, naming it (after
    the run, the files before it in the list were replaced and the rest not, the error naming the
    folder)."""
    ran = []
    monkeypatch.setattr(demo_module, "run_demo", lambda *args, **kwargs: ran.append(True))
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / "demo.json").touch()
    assert cli.main(["demo", "-q", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"tiltsmc: demo: --out: {out / name} is a folder, which the demo's results cannot replace\n"
    )
    assert ran == [] and sorted(p.name for p in out.iterdir()) == sorted({name, "demo.json"})


def _without_plot_warning(err: str) -> str:
    """Standard error less the warning a machine without matplotlib adds (the README's test install)."""
    return err.replace(
        "tiltsmc: warning: demo: matplotlib is not installed, so no plot (pip install 'tiltsmc[demo]')\n", ""
    )


def test_cli_demo_write_error_names_the_file(
    small_record: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that cannot be written (demo.txt made a folder during the run): the error names it, and the
    files replaced before it (it named the folder)."""
    out = tmp_path / "out"

    def run_demo(*args: object, **kwargs: object) -> dict:
        (out / "demo.txt").mkdir()
        return small_record

    monkeypatch.setattr(demo_module, "run_demo", run_demo)
    assert cli.main(["demo", "-q", "--out", str(out)]) == 1
    assert _without_plot_warning(capsys.readouterr().err) == (
        f"tiltsmc: demo: cannot write {out / 'demo.txt'}: Is a directory ({out / 'demo.json'} replaced "
        "before)\n"
    )
    assert not [p for p in out.iterdir() if ".tiltsmc-" in p.name]


def test_cli_demo_interrupted_after_writing_its_files_says_so(
    small_record: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C once the files were written (as the table is printed): the last line names them (it said
    "no result file written")."""
    monkeypatch.setattr(demo_module, "run_demo", lambda *args, **kwargs: small_record)
    render_table = demo_module.render_table
    tables = []

    def rendered_once(record: dict) -> str:  # for demo.txt; the second, the table printed, is interrupted
        tables.append(True)
        if len(tables) > 1:
            raise KeyboardInterrupt
        return render_table(record)

    monkeypatch.setattr(demo_module, "render_table", rendered_once)
    out = tmp_path / "out"
    assert cli.main(["demo", "-q", "--out", str(out)]) == 130
    files = sorted(p.name for p in out.iterdir())
    assert files == ["demo.json", "demo.png", "demo.txt"] or files == ["demo.json", "demo.txt"]
    wrote = ", ".join(str(out / name) for name in ("demo.json", "demo.txt", "demo.png") if name in files)
    assert _without_plot_warning(capsys.readouterr().err) == (
        f"tiltsmc: interrupted; the demo was done: wrote {wrote}\n"
    )


def test_write_outputs_lists_each_file_once_in_place(small_record: dict, tmp_path: Path) -> None:
    written: list[Path] = []
    returned = demo_module.write_outputs(small_record, tmp_path, written=written)
    assert written == returned and {p.name for p in written} >= {"demo.json", "demo.txt"}


def test_the_demo_replaces_a_symbolic_link_whatever_it_names(small_record: dict, tmp_path: Path) -> None:
    """A link where the demo writes a file is replaced by the file (a rename replaces the link itself),
    whether it names a device or a folder: the check refused both, as if the rename would fail."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "demo.txt").symlink_to(elsewhere)
    (out / "demo.json").symlink_to("/dev/null")
    demo_module.check_output_folder(out)
    demo_module.write_outputs(small_record, out)
    for name in ("demo.txt", "demo.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert list(elsewhere.iterdir()) == []
