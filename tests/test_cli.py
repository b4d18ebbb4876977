"""``tiltsmc run`` end to end on the tiny fixture models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiltsmc.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = str(FIXTURES / "llama-tiny"), str(FIXTURES / "prm-tiny")


def run(tmp_path: Path, *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / "out.jsonl"
    code = main(
        ["run", "--policy", POLICY, "--reward", REWARD, "--max-new-tokens", "4", "--json", str(out), *extra]
    )
    lines = out.read_text().splitlines() if out.exists() else []
    return code, [json.loads(line) for line in lines]


@pytest.mark.parametrize("sampler", ["smc", "sp-gsmc", "mh", "best-of-n", "rejection"])
def test_every_sampler_writes_one_json_line_per_prompt(tmp_path: Path, sampler: str, capfd) -> None:
    extra = ["--bound", "1.0", "--max-tries", "200"] if sampler == "rejection" else []
    size = "--pool-size" if sampler == "sp-gsmc" else "--particles"  # sp-gsmc takes no --particles
    code, records = run(
        tmp_path,
        "--sampler",
        sampler,
        "--prompt",
        "hello",
        "--prompt",
        "ab",
        size,
        "4",
        "--seed",
        "3",
        *extra,
    )
    assert code == 0
    assert [r["prompt"] for r in records] == ["hello", "ab"]
    for record in records:
        assert record["sampler"] == sampler.replace("-", "_")
        assert len(record["texts"]) == len(record["samples"])
        assert isinstance(record["log_z"], float) or record["log_z"] is None  # null: -inf
        assert record["compute"]["policy_calls"] > 0
    # piped (not a terminal): no progress bar, one summary line on stderr
    captured = capfd.readouterr()
    assert "\r" not in captured.err and "2 prompt(s), 0 failed" in captured.err


def test_stop_strings_end_trajectories(tmp_path: Path) -> None:
    """``--stop`` (repeatable, escapes decoded) reaches the policy: trajectories end at the token that
    completes one (the fixture's tokens are single characters: "a" is id 3, a newline 55), and the texts
    end before it."""
    argv = ["--prompt", "hello", "--seed", "2", "--particles", "64", "--stop", "a", "--stop", "\\n"]
    code, records = run(tmp_path, *argv)
    assert code == 0
    (record,) = records
    assert all("a" not in text and "\n" not in text for text in record["texts"])
    ends = [sample[-1] for sample in record["samples"] if sample]
    assert 3 in ends or 55 in ends
    for sample, text in zip(record["samples"], record["texts"]):
        assert 3 not in sample[:-1] and 55 not in sample[:-1]
        if sample and sample[-1] in (3, 55):
            assert len(text) == len(sample) - 1


def test_same_seed_same_output_and_a_bad_prompt_is_reported(tmp_path: Path) -> None:
    first = run(tmp_path, "--prompt", "hi", "--prompt", "x" * 200, "--seed", "5")
    second = run(tmp_path, "--prompt", "hi", "--prompt", "x" * 200, "--seed", "5")
    without_timings = [
        [{k: v for k, v in r.items() if k not in ("compute", "run")} for r in rs] for _, rs in (first, second)
    ]
    assert without_timings[0] == without_timings[1]
    # the same configuration, but for the start time
    assert [{**r["run"], "started": None} for r in first[1]] == [
        {**r["run"], "started": None} for r in second[1]
    ]
    code, records = first
    assert code == 0
    assert "context" in records[1]["error"] and records[1]["collapsed"] is True
    assert "error" not in records[0] and math.isfinite(records[0]["log_z"])


def test_prompts_file_and_errors(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\n")
    code, records = run(tmp_path, "--prompts", str(prompts), "--sampler", "best-of-n")
    assert code == 0 and [r["prompt"] for r in records] == ["one", "two"]
    assert main(["run", "--policy", str(tmp_path / "missing"), "--reward", REWARD, "--prompt", "a"]) == 2
    assert (
        main(
            [
                "run",
                "--policy",
                POLICY,
                "--reward",
                REWARD,
                "--prompt",
                "a",
                "--json",
                str(tmp_path / "no" / "such" / "dir.jsonl"),
            ]
        )
        == 2
    )
    absent = str(tmp_path / "absent.txt")
    assert main(["run", "--policy", POLICY, "--reward", REWARD, "--prompts", absent]) == 2
    with pytest.raises(SystemExit):
        main(["run", "--policy", POLICY, "--reward", REWARD, "--prompt", "a", "--particles", "0"])
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temporary file left behind


@pytest.mark.skipif(not hasattr(__import__("os"), "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    leader, follower = os.openpty()
    out = tmp_path / "out.jsonl"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiltsmc.cli",
            "run",
            "--policy",
            POLICY,
            "--reward",
            REWARD,
            "--prompt",
            "hi",
            "--prompt",
            "ab",
            "--batch-size",
            "1",
            "--max-new-tokens",
            "3",
            "--particles",
            "2",
            "--json",
            str(out),
        ],
        stderr=follower,
        stdout=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert completed.returncode == 0
    text = shown.decode()
    # tqdm's bar, redrawn per step (steps of both prompts: up to 2 x 3), with its rate
    assert "\r" in text and "tiltsmc smc" in text and "step/s" in text
    # the bar's total ends as the steps actually taken: it reaches 100%
    assert "100%" in text
    assert len(out.read_text().splitlines()) == 2


def test_reward_class_head_options(tmp_path: Path, capfd) -> None:
    """--reward-label / --reward-classes / --reward-position / --reward-delimiters reach the reward model:
    the run equals the same SMC run through the Python API; bad options are refused with exit code 2."""
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    decoder = str(FIXTURES / "gpt2-tiny")
    options = ["--reward-label", "47", "--reward-classes", "47,46", "--reward-position", "delimiter"]
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", POLICY, "--reward", decoder, "--max-new-tokens", "4", "--json", str(out)]
    code = main([*argv, *options, "--reward-delimiters", "39", "--prompt", "ab", "--seed", "2"])
    assert code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    reward = OnnxRewardModel(
        decoder, kind="logit", position="delimiter", delimiter_ids=[39], label=47, classes=[47, 46]
    )
    policy = OnnxCausalLM(POLICY, max_new_tokens=4)
    expected = tiltsmc.smc(policy, reward, ["ab"], rng=2)  # smc's own defaults; prompt 0 of --seed 2: 2
    assert record["log_z"] == float(expected.log_z[0]) and record["texts"] == expected.texts[0]
    capfd.readouterr()
    assert main([*argv, "--reward-label", "47", "--reward-classes", "46,45", "--prompt", "ab"]) == 2
    assert "classes: [46, 45] must include label 47" in capfd.readouterr().err
    assert main([*argv, "--prompt", "ab"]) == 2
    assert "pass --reward-label (and --reward-classes) to read" in capfd.readouterr().err  # the CLI's names
    with pytest.raises(SystemExit):
        main([*argv, "--reward-classes", "4x", "--prompt", "ab"])


@pytest.mark.parametrize(
    ("sampler", "function"), [("sp-gsmc", "sp_gsmc"), ("mh", "mh"), ("best-of-n", "best_of_n")]
)
def test_run_uses_the_samplers_own_defaults(tmp_path: Path, sampler: str, function: str, capfd) -> None:
    """Options left out are the sampler function's defaults (one set for the API, the CLI and the server);
    the summary gives the online reading of the reward model's Bellman error, and --eps warns past it."""
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", POLICY, "--reward", REWARD, "--max-new-tokens", "4", "--sampler", sampler]
    assert main([*argv, "--prompt", "ab", "--seed", "3", "--json", str(out), "--reward-kind", "logit"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    policy = OnnxCausalLM(POLICY, max_new_tokens=4)
    reward = OnnxRewardModel(REWARD, kind="logit")
    expected = getattr(tiltsmc, function)(policy, reward, ["ab"], rng=3)  # prompt 0 of --seed 3: 3
    assert record["texts"] == expected.texts[0] and record["log_z"] == float(expected.log_z[0])
    assert "log_z_increments" in record and "log_z_increment_se" in record
    err = capfd.readouterr().err
    if sampler == "best-of-n":  # no guided steps, no reading
        assert "Bellman error: no online reading" in err
        return
    assert "Bellman error along the sampled paths" in err and "warning" not in err
    assert main([*argv, "--prompt", "ab", "--seed", "3", "--reward-kind", "logit", "--eps", "1e-9"]) == 0
    assert "warning:" in capfd.readouterr().err


def test_a_seed_is_the_apis_and_the_servers_prompt_i_drawing_from_seed_plus_i(tmp_path: Path) -> None:
    """``--seed s``: prompt i draws from ``seed + i``, the server's rule for its choices
    (``choice_seed``), so that one prompt seeded s is ``tiltsmc.smc(..., rng=s)`` and the server's answer
    to ``seed: s``, as the README says (prompt i drew from ``SeedSequence(s, spawn_key=(i,))``, a result
    neither gave)."""
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    code, records = run(tmp_path, "--prompt", "ab", "--prompt", "hi", "--particles", "4", "--seed", "5",
                        "--batch-size", "1")  # fmt: skip
    assert code == 0
    policy, reward = OnnxCausalLM(POLICY, max_new_tokens=4), OnnxRewardModel(REWARD, kind="logit")
    for i, (record, prompt) in enumerate(zip(records, ["ab", "hi"])):
        expected = tiltsmc.smc(policy, reward, [prompt], num_particles=4, rng=5 + i)
        assert record["log_z"] == float(expected.log_z[0]) and record["texts"] == expected.texts[0]
        assert record["samples"] == [list(map(int, sample)) for sample in expected.samples[0]]
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from tiltsmc.serving.server import Settings

    settings = Settings()
    with TestClient(settings.app(settings.engine(policy, reward))) as client:
        answer = client.post("/v1/completions", json={"prompt": ["ab", "hi"], "particles": 4, "seed": 5})
    assert answer.status_code == 200, answer.text
    assert [choice["log_z"] for choice in answer.json()["tiltsmc"]["choices"]] == [
        r["log_z"] for r in records
    ]


def test_messages_of_text_parts_are_the_joined_prompt(tmp_path: Path) -> None:
    """``--messages`` lines with OpenAI's text parts are the prompt of their joined text, as the server and
    the API take them (the CLI rendered the list's Python repr: another prompt, another result)."""
    pytest.importorskip("jinja2")
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    template = FIXTURES / "chat-tiny" / "chat_template.jinja"
    parts = [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]}]
    results = []
    for name, messages in (("parts", parts), ("plain", [{"role": "user", "content": "hey"}])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(messages) + "\n")
        code, records = run(tmp_path, "--messages", str(path), "--chat-template", str(template),
                            "--particles", "4", "--seed", "2")  # fmt: skip
        assert code == 0
        results.append({key: records[0][key] for key in ("log_z", "texts", "samples")})
    assert results[0] == results[1]
    policy = OnnxCausalLM(POLICY, max_new_tokens=4, chat_template=template.read_text())
    expected = tiltsmc.smc(policy, OnnxRewardModel(REWARD, kind="logit"), [parts], num_particles=4, rng=2)
    assert results[0]["log_z"] == float(expected.log_z[0]) and results[0]["texts"] == expected.texts[0]
