"""What people consume: ``tiltsmc run``'s JSON lines against the shipped schema, the run's configuration
and per-prompt compute, file modes, ``SamplerResult``'s summaries and sampler diagnostics, progress, logs
and the command's help."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tiltsmc import cli
from tiltsmc.cli import DESCRIPTION, main
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.samplers.result import SamplerResult, finite_or_none, plain

jsonschema = pytest.importorskip("jsonschema")  # in the "test" extra; a GPU machine may lack it

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = str(FIXTURES / "llama-tiny"), str(FIXTURES / "prm-tiny")
BASE = ["run", "--policy", POLICY, "--reward", REWARD, "--max-new-tokens", "4"]


def _refuse(constant: str) -> None:
    raise AssertionError(f"{constant}: not strict JSON")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line, parse_constant=_refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = cli.output_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("sampler", ["smc", "sp-gsmc", "mh", "best-of-n", "rejection"])
def test_every_line_validates_against_the_shipped_schema(tmp_path: Path, sampler: str, validator) -> None:
    out = tmp_path / "out.jsonl"
    extra = ["--bound", "1.0", "--max-tries", "64"] if sampler == "rejection" else []
    size = ["--pool-size" if sampler == "sp-gsmc" else "--particles", "4"]  # the option the sampler takes
    argv = [*BASE, "--sampler", sampler, *size, "--seed", "1", "--json", str(out), *extra]
    # a prompt longer than the context: a record with "error", collapsed, log_z null
    assert main([*argv, "--prompt", "hello", "--prompt", "ab", "--prompt", "x" * 200, "-q"]) == 0
    records = _lines(out)
    assert [r["prompt_index"] for r in records] == [0, 1, 2]
    for record in records:
        validator.validate(record)
    assert "error" in records[2] and records[2]["log_z"] is None and records[2]["best"] is None
    # the schema is strict: a field it does not know, or "-inf" as a string, fails
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**records[0], "log_z": "-inf"})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**records[0], "surprise": 1})
    specific = {"mh": "mh_accepted", "rejection": "tries", "best-of-n": "log_rewards"}.get(sampler)
    if specific is not None:
        assert specific in records[0]


def test_value_output_lines_validate_against_the_shipped_schema(tmp_path: Path, validator) -> None:
    # --value-output has no reward model: run.models.reward is null, which the schema allows
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", str(FIXTURES / "gpt2-value-tiny"), "--value-output", "value", "--prompt", "hi"]
    assert main([*argv, "--max-new-tokens", "4", "--particles", "4", "-q", "--json", str(out)]) == 0
    (record,) = _lines(out)
    assert record["run"]["models"]["reward"] is None
    validator.validate(record)


def test_rejection_with_no_acceptance_is_collapsed_with_a_finite_log_z(tmp_path: Path, validator) -> None:
    """The schema said collapsed meant every weight zero "(then log_z is null)"; rejection with no draw
    accepted is collapsed with its finite estimate: the description says so."""
    out = tmp_path / "out.jsonl"
    # a seed whose one draw is rejected (prompt 0 of --seed 1 draws from rng=1)
    argv = [*BASE, "--sampler", "rejection", "--max-tries", "1", "--particles", "1", "--seed", "1"]
    assert main([*argv, "--prompt", "hi", "-q", "--json", str(out)]) == 0
    (record,) = _lines(out)
    validator.validate(record)
    assert record["collapsed"] and record["samples"] == [] and math.isfinite(record["log_z"])
    described = cli.output_schema()["properties"]["collapsed"]["description"]
    assert "rejection" in described and "no draw was accepted" in described


def test_each_line_records_the_run_that_made_it(tmp_path: Path) -> None:
    import onnxruntime

    out = tmp_path / "out.jsonl"
    assert main([*BASE, "--prompt", "a", "--prompt", "b", "--seed", "7", "--json", str(out), "-q"]) == 0
    first, second = _lines(out)
    assert first["run"] == second["run"]
    run = first["run"]
    assert run["tiltsmc_version"] == tiltsmc.__version__
    assert run["onnxruntime_version"] == onnxruntime.__version__
    assert run["seed"] == 7 and run["sampler"] == "smc" and run["batch_size"] == 8
    # every option of the sampler, its defaults included (from smc's signature: one place)
    assert run["options"]["num_particles"] == cli._default("smc", "num_particles")
    assert run["options"]["resample"] == cli._default("smc", "resample")
    assert run["models"]["policy"] == os.path.abspath(POLICY)
    assert run["models"]["max_new_tokens"] == 4


def test_a_prompt_has_its_own_compute_and_result_whatever_the_batch(tmp_path: Path) -> None:
    """Prompt i draws from seed + i: its result does not depend on --batch-size,
    and its compute is its own (the batch's was copied onto every line, so sums overcounted)."""
    prompts = ["--prompt", "hello", "--prompt", "ab", "--prompt", "abc"]
    runs = []
    for batch_size in ("1", "3"):
        out = tmp_path / f"out{batch_size}.jsonl"
        argv = [*BASE, *prompts, "--particles", "4", "--seed", "2", "--batch-size", batch_size]
        assert main([*argv, "--json", str(out), "-q"]) == 0
        runs.append(_lines(out))
    alone, together = runs
    for a, t in zip(alone, together):
        assert a["texts"] == t["texts"]
        assert a["log_z"] == pytest.approx(t["log_z"], rel=1e-9, abs=1e-12)
        # each prompt's particle-steps are its own: at most 4 particles x 4 steps
        assert a["compute"]["policy_steps"] == t["compute"]["policy_steps"] <= 16
        assert a["compute"]["reward_evaluations"] == t["compute"]["reward_evaluations"]
    # alone, a prompt's run is exactly the sampler function's with that prompt's stream
    policy, reward = OnnxCausalLM(POLICY, max_new_tokens=4), OnnxRewardModel(REWARD, kind="logit")
    expected = tiltsmc.smc(policy, reward, ["ab"], num_particles=4, rng=2 + 1)
    assert alone[1]["texts"] == expected.texts[0] and alone[1]["log_z"] == float(expected.log_z[0])
    assert alone[1]["compute"]["policy_steps"] == expected.compute.policy_steps


def test_new_files_get_the_users_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        out = tmp_path / "new.jsonl"
        assert main([*BASE, "--prompt", "a", "--json", str(out), "-q"]) == 0
        assert out.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        other = tmp_path / "other.jsonl"
        assert main([*BASE, "--prompt", "a", "--json", str(other), "-q"]) == 0
        assert other.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


# -- SamplerResult -------------------------------------------------------------------------------------


def _result(texts: list[list[str]], log_weights: list[list[float]]) -> SamplerResult:
    batch = len(texts)
    return SamplerResult(
        sampler="smc",
        samples=[np.zeros((len(t), 2), dtype=np.int64) + np.arange(len(t))[:, None] for t in texts],
        log_weights=[np.array(w, dtype=np.float64) for w in log_weights],
        log_z=np.zeros(batch),
        ess=np.ones((batch, 3)),
        resampled=np.zeros((batch, 3), dtype=bool),
        unique_ancestors=np.ones((batch, 3), dtype=np.int64),
        log_z_increments=np.zeros((batch, 3)),
        collapsed=np.array([not np.any(np.isfinite(w)) for w in log_weights]),
        texts=texts,
    )


def test_posterior_merges_duplicate_texts_and_sorts_them() -> None:
    log = np.log
    result = _result(
        [["b", "a", "b", "c"], ["x", "y"]],
        [[log(0.2), log(0.35), log(0.3), log(0.15)], [-math.inf, -math.inf]],
    )
    posterior = result.posterior(0)
    assert list(posterior) == ["b", "a", "c"]  # 0.5, 0.35, 0.15
    assert posterior["b"] == pytest.approx(0.5) and posterior["a"] == pytest.approx(0.35)
    assert sum(posterior.values()) == pytest.approx(1.0)
    assert result.best(0) == 1 and result.best_texts() == ["a", None]  # the best sample, not the best text
    assert result.posterior(1) == {} and result.best(1) is None
    # without texts: token sequences as keys
    result.texts = None
    assert list(result.posterior(0)) == [(1, 1), (2, 2), (0, 0), (3, 3)]


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        (2, ValueError, r"^prompt: must be < 2 \(the result holds 2 prompt\(s\)\), got 2"),
        (-3, ValueError, "^prompt: must be >= -2, got -3"),
        (True, TypeError, "^prompt: expected an int, got True"),
        (1.0, TypeError, "^prompt: expected an int, got 1.0"),
        ("0", TypeError, "^prompt: expected an int, got '0'"),
        (None, TypeError, "^prompt: expected an int, got None"),
    ],
)
def test_best_posterior_and_weights_refuse_a_bad_prompt_index(prompt: Any, error: type, match: str) -> None:
    result = _result([["a", "b"], ["c"]], [[math.log(0.25), math.log(0.75)], [0.0]])
    for read in (result.best, result.posterior, result.weights):
        with pytest.raises(error, match=match):
            read(prompt)
    # ints of any kind index as a list does, from the end too
    assert result.best(np.int64(0)) == result.best(-2) == 1 and result.posterior(-1) == {"c": 1.0}


def test_posterior_of_a_real_run_is_the_weighted_sample(tmp_path: Path) -> None:
    policy, reward = OnnxCausalLM(POLICY, max_new_tokens=3), OnnxRewardModel(REWARD, kind="logit")
    result = tiltsmc.smc(policy, reward, ["ab", "hello"], num_particles=16, rng=4)
    assert result.texts is not None
    for b in range(2):
        posterior = result.posterior(b)
        weights = result.weights(b)
        assert sum(posterior.values()) == pytest.approx(1.0)
        assert set(posterior) == {t for t, w in zip(result.texts[b], weights) if w > 0}
        for text, probability in posterior.items():
            mask = np.array([t == text for t in result.texts[b]])
            assert probability == pytest.approx(float(weights[mask].sum()))
        assert list(posterior.values()) == sorted(posterior.values(), reverse=True)
        assert result.best(b) == int(np.argmax(weights))


def test_repr_is_a_few_lines_whatever_the_size() -> None:
    rng = np.random.default_rng(0)
    texts = [[f"text {b} {i} " * 20 for i in range(64)] for b in range(16)]
    log_weights = [np.log(rng.dirichlet(np.ones(64))) for _ in range(16)]
    result = _result(texts, [list(w) for w in log_weights])
    text = repr(result)
    assert len(text.splitlines()) <= 8 and len(text) < 1000
    assert "16 prompt(s) x 64 sample(s)" in text and "13 more prompt(s)" in text


def test_samplers_without_guided_steps_give_their_own_diagnostics() -> None:
    policy, reward = OnnxCausalLM(POLICY, max_new_tokens=3), OnnxRewardModel(REWARD, kind="logit")
    prompts = ["ab", "hello"]
    chain = tiltsmc.mh(policy, reward, prompts, pool_size=2, steps=5, rng=1)
    assert chain.mh_accepted is not None and chain.mh_accepted.shape == (2, 5)
    assert chain.acceptance_rate is not None
    np.testing.assert_allclose(chain.mh_accepted.mean(axis=1), chain.acceptance_rate)
    assert chain.proposal_log_z is not None and chain.proposal_log_z.shape == (2, 6)
    mean_z = np.logaddexp.reduce(chain.proposal_log_z, axis=1) - np.log(6)
    np.testing.assert_allclose(chain.log_z, mean_z)

    best = tiltsmc.best_of_n(policy, reward, prompts, n=6, rng=1)
    assert best.log_rewards is not None and best.log_rewards.shape == (2, 6)
    np.testing.assert_allclose(best.log_z, np.logaddexp.reduce(best.log_rewards, axis=1) - np.log(6))

    exact = tiltsmc.rejection(policy, reward, prompts, bound=1.0, num_samples=1, max_tries=64, rng=1)
    assert exact.tries is not None and exact.acceptance_rate is not None
    accepted = np.array([len(s) for s in exact.samples])
    # every draw that passed counts, those past num_samples too: at least the samples kept
    assert np.all(exact.acceptance_rate * exact.tries >= accepted - 1e-9)
    assert np.all((exact.acceptance_rate >= 0) & (exact.acceptance_rate <= 1))
    for result in (chain, best, exact):
        assert len(repr(result).splitlines()) <= 8


# -- help, version, progress and logs ---------------------------------------------------------------------


def test_help_is_whole_and_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    assert DESCRIPTION in text and "'tiltsmc COMMAND --help'" in text
    for command in ("run", "serve", "demo"):
        assert re.search(rf"^    {command} +\w", text, re.MULTILINE), command  # each command with its help
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"tiltsmc {name} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {cli._default('smc', 'num_particles')})" in text
    assert f"(default: {cli._default('rejection', 'max_tries')})" in text
    assert "prompts sampled together (one model call per step for all of them) (default: 8)" in text
    assert "(default: 0)" in text  # --seed: a default of 0 is shown too


def test_version_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tiltsmc {tiltsmc.__version__}"
    completed = subprocess.run(
        [sys.executable, "-m", "tiltsmc", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0 and completed.stdout.strip() == f"tiltsmc {tiltsmc.__version__}"


def test_logs_levels_and_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("tiltsmc").handlers)
    out = str(tmp_path / "o.jsonl")
    assert main([*BASE, "--prompt", "a", "--json", out]) == 0
    err = capfd.readouterr().err
    assert "tiltsmc: 1 prompt(s), 0 failed" in err
    assert main([*BASE, "--prompt", "a", "--json", out, "--quiet"]) == 0
    assert capfd.readouterr().err == ""
    warned = ["--sampler", "sp-gsmc", "--prompt", "ab", "--seed", "3", "--eps", "1e-9"]
    assert main([*BASE, *warned, "--json", out, "--log-level", "warning"]) == 0
    err = capfd.readouterr().err
    assert "prompt(s)" not in err and "tiltsmc: warning: " in err
    assert main([*BASE, "--prompt", "a", "--json", out, "--log-level", "debug"]) == 0
    assert "run configuration: {" in capfd.readouterr().err
    # the handler is the command's only: gone after it returns
    assert not [h for h in logging.getLogger("tiltsmc").handlers if not isinstance(h, logging.NullHandler)]


def test_piped_demo_reports_progress_through_log_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--levels", "2", "--budgets", "2", "--problems", "2", "--out", str(tmp_path / "d")]
    previous = os.umask(0o022)
    try:
        assert main(argv) == 0
    finally:
        os.umask(previous)
    err = capfd.readouterr().err
    assert "\r" not in err
    assert re.search(r"tiltsmc: demo: (\d+)/\1 sampler runs, \d+s elapsed", err)  # the last report at least
    names = {"demo.json", "demo.txt"}
    try:
        import matplotlib  # noqa: F401

        names.add("demo.png")  # was 0600: unreadable by a web server
    except ImportError:
        pass
    assert {path.name for path in (tmp_path / "d").iterdir()} == names  # no temporary file left
    for name in names:
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == 0o644, name
    record = json.loads((tmp_path / "d" / "demo.json").read_text(), parse_constant=_refuse)
    assert record["config"]["levels"] == [2]


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float64, np.float32, np.int64, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
def test_plain_lists_an_array_as_the_element_by_element_pass_would(values: np.ndarray) -> None:
    """``plain`` lists numeric arrays at once: the same JSON as listing them and replacing every number
    that is not finite by None (infinities and NaN included), whatever the dtype and shape."""
    expected = finite_or_none(values.tolist())
    got = plain(values)
    assert json.dumps(got, allow_nan=False) == json.dumps(expected, allow_nan=False)
    assert json.dumps(plain([values, values[()] if values.ndim == 0 else values[:1]]), allow_nan=False)
