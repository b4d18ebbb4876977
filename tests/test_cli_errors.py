"""Every failure of ``tiltsmc run`` is one line ``tiltsmc: ...`` on standard error with exit status 2 (bad
arguments, prompts or model files) or 1 (the run or its output failed), never a traceback."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import tiltsmc.tasks.arithmetic
from tiltsmc.cli import _step, main

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = str(FIXTURES / "llama-tiny"), str(FIXTURES / "prm-tiny")
RUN = ["run", "--policy", POLICY, "--reward", REWARD, "--max-new-tokens", "3", "--particles", "2"]


def one_line_error(capfd: pytest.CaptureFixture[str]) -> str:
    error = capfd.readouterr().err
    assert error.startswith("tiltsmc: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


def model_copy(tmp_path: Path, name: str = "llama-tiny") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--ess-threshold", "nan", "expected a fraction in [0, 1], got nan"),
        ("--ess-threshold", "1.5", "expected a fraction in [0, 1], got 1.5"),
        ("--seed", "-1", "--seed: expected an integer >= 0, got -1"),
        ("--seed", "1e3", "--seed: expected an integer >= 0, got '1e3'"),
        ("--step", "\\x4", "--step: malformed escape in '\\\\x4'"),
        ("--step", "\\u12", "--step: malformed escape"),
        ("--step", "", "--step: expected 'token' or a non-empty delimiter"),
        ("--temperature", "nan", "--temperature: expected a finite number > 0, got nan"),
        ("--temperature", "0", "--temperature: expected a finite number > 0, got 0"),
        ("--top-p", "0", "--top-p: expected a fraction in (0, 1], got 0"),
        ("--bound", "inf", "--bound: expected a finite number > 0, got inf"),
        ("--mh-steps", "-2", "--mh-steps: expected an integer >= 0, got -2"),
        ("--reward-delimiters", "-1", "--reward-delimiters: expected comma-separated integers >= 0"),
        ("--reward-label", "-1", "--reward-label: expected an integer >= 0, got -1"),
        ("--particles", "x", "--particles: expected an integer >= 1, got 'x'"),
        ("--threads", "100000", "--threads: expected at most 1024 threads"),  # ONNX Runtime ran out of memory
        # numpy refused the arrays ("Maximum allowed dimension exceeded"), status 1 after the models loaded
        ("--particles", "99999999999999999999", "--particles: expected at most 1048576 particles, got 9999"),
        ("--particles", "1048577", "--particles: expected at most 1048576 particles, got 1048577"),
        ("--pool-size", "99999999999999999999", "--pool-size: expected at most 1048576 particles"),
        # overflowed int64 ("Python int too large to convert to C long"), status 1 after the models loaded
        ("--max-tries", "99999999999999999999", "--max-tries: expected at most 1099511627776 draws"),
        # ran until killed (tiltsmc.mh takes any count)
        ("--mh-steps", "99999999999999999999", "--mh-steps: expected at most 1048576 steps, got 9999"),
        ("--mh-steps", "1048577", "--mh-steps: expected at most 1048576 steps, got 1048577"),
        # online_bellman's eps range (diagnostics.online.check_eps): a number >= 0
        ("--eps", "-1", "--eps: expected a number >= 0, got -1"),
        ("--eps", "nan", "--eps: expected a number >= 0, got nan"),
        ("--eps", "x", "--eps: expected a number >= 0, got 'x'"),
    ],
)
def test_bad_arguments(option: str, value: str, message: str, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*RUN, "--prompt", "hi", f"{option}={value}"])
    assert exit_info.value.code == 2
    assert message in one_line_error(capfd)


def test_eps_takes_what_online_bellman_takes(capfd: pytest.CaptureFixture[str]) -> None:
    """``--eps`` reads the range of ``online_bellman``'s ``eps`` (``check_eps``): 0 (an exact twist, which
    the API took and the CLI refused as "expected a finite number > 0") and inf (never warns) included."""
    from tiltsmc.cli import build_parser
    from tiltsmc.diagnostics.online import check_eps

    for value in ("0", "-0", "1e-9", "2.5", "inf", "1e400"):
        parsed = build_parser().parse_args([*RUN, "--prompt", "hi", "--eps", value])
        assert parsed.eps == check_eps(float(value)) and math.copysign(1.0, parsed.eps) == 1.0, value
    assert main([*RUN, "--prompt", "hi", "--eps", "0", "--quiet"]) == 0
    assert "Traceback" not in capfd.readouterr().err


def test_the_mh_step_bound_takes_zero_and_the_bound() -> None:
    from tiltsmc.cli import MAX_MH_STEPS, build_parser

    for steps in (0, MAX_MH_STEPS):
        parsed = build_parser().parse_args([*RUN, "--prompt", "hi", "--sampler", "mh", f"--mh-steps={steps}"])
        assert parsed.mh_steps == steps


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        (
            "--session-config",
            b"session.intra_op.allow_spinning=\xff",
            "'session.intra_op.allow_spinning=\\xff'",
        ),
        ("--session-config", b"na\xefve=1", "'na\\xefve=1'"),
        ("--session-option", b"log_severity_level=\xe93", "'log_severity_level=\\xe93'"),
        ("--provider-option", b"CPUExecutionProvider:x=\xff", "'CPUExecutionProvider:x=\\xff'"),
    ],
)
def test_onnx_runtime_options_that_are_not_utf8_are_refused(
    option: str, value: bytes, shown: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """An argument whose bytes are not UTF-8 reaches Python with surrogates in place of the bad bytes
    (``os.fsdecode``); ONNX Runtime's binding refused it with a raw "incompatible function arguments" line
    naming no option. Refused as parsed, naming the option and the byte, status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main([*RUN, "--prompt", "hi", option, os.fsdecode(value)])
    assert exit_info.value.code == 2
    byte = next(b for b in value if b >= 0x80)
    assert f"{option}: {shown} is not UTF-8 text (byte 0x{byte:02x})" in one_line_error(capfd)


def test_step_escapes() -> None:
    assert _step("token") == "token"
    assert _step("\\n\\n") == "\n\n" and _step("\\t") == "\t" and _step("\\x41") == "A"
    assert _step("é") == "é" and _step("→\\n") == "→\n"  # 'é' was read as UTF-8 bytes: 'Ã©'
    assert _step("\\u00e9") == "é" and _step("\\\\") == "\\"


def test_prompts_files(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first\nd\xe9j\xe0 vu\n".encode("latin-1"))
    assert main([*RUN, "--prompts", str(bad)]) == 2
    assert f"--prompts: {bad} is not UTF-8 text (byte 0xe9 on line 2)" in one_line_error(capfd)
    assert main([*RUN, "--prompts", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capfd)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main([*RUN, "--prompts", str(empty)]) == 2
    assert "holds no prompt" in one_line_error(capfd)
    # CRLF line ends and a byte-order mark are not part of the prompts; U+2028 does not end a line
    windows = tmp_path / "windows.txt"
    windows.write_bytes("\ufeffone\r\ntwo\u2028half\r\n".encode())
    out = tmp_path / "out.jsonl"
    assert main([*RUN, "--prompts", str(windows), "--json", str(out)]) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["one", "two\u2028half"]


def test_a_prompt_line_past_the_bound_is_refused_without_reading_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A line of more than MAX_LINE_BYTES (64 MiB; 1000 here) is refused as it is read, naming the option,
    the file and the line: --prompts /dev/zero was read until the memory ran out."""
    from tiltsmc import cli

    monkeypatch.setattr(cli, "MAX_LINE_BYTES", 1000)
    long = tmp_path / "long.txt"
    long.write_bytes(b"first\n" + b"x" * 1001 + b"\nthird\n")
    assert main([*RUN, "--prompts", str(long)]) == 2
    assert one_line_error(capfd) == (
        f"tiltsmc: --prompts: {long} line 2 is longer than 1000 bytes, past any model's context: "
        "not a prompt\n"
    )
    messages = tmp_path / "chats.jsonl"
    messages.write_text('[{"role": "user", "content": "' + "x" * 1000 + '"}]\n')
    assert main([*RUN, "--messages", str(messages)]) == 2
    assert f"--messages: {messages} line 1 is longer than 1000 bytes" in one_line_error(capfd)
    if os.path.exists("/dev/zero"):
        assert main([*RUN, "--prompts", "/dev/zero"]) == 2
        assert "--prompts: /dev/zero line 1 is longer than 1000 bytes" in one_line_error(capfd)
    exact = tmp_path / "exact.txt"  # the bound itself, its line end and CR aside
    exact.write_bytes(b"y" * 1000 + b"\n" + b"z" * 999 + b"\r\n")
    assert cli._read_lines("--prompts", exact) == ["y" * 1000, "z" * 999]


def test_corrupt_and_unsupported_model_files(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    truncated = model_copy(tmp_path / "t")
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    unsupported = model_copy(tmp_path / "u")  # an operator ONNX Runtime does not have: MatMuX
    (unsupported / "model.onnx").write_bytes(data.replace(b"MatMul", b"MatMuX"))
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(bytes(range(256)) * 8)
    for model in (truncated, unsupported, noise):
        for role in ("--policy", "--reward"):
            argv = [*RUN, "--prompt", "hi"]
            argv[argv.index(role) + 1] = str(model)
            assert main(argv) == 2
            error = one_line_error(capfd)
            assert str(model) in error and ("ONNX Runtime cannot load" in error or "not a valid" in error)
    assert (
        "MatMuX" in (main([*RUN[:2], str(unsupported), *RUN[3:], "--prompt", "hi"]), one_line_error(capfd))[1]
    )


def test_every_failed_prompt_is_reported_on_standard_error_even_when_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A prompt that fails alone (longer than the context) gets a line with its reason, --quiet or not; the
    others finish and the run succeeds."""
    out = tmp_path / "out.jsonl"
    assert main([*RUN, "--prompt", "hi", "--prompt", "x" * 200, "--json", str(out), "--quiet"]) == 0
    assert capfd.readouterr().err == (
        "tiltsmc: error: prompt 1: 200 prompt tokens + max_new_tokens 3 exceed the model's context of 128\n"
    )
    assert [("error" in json.loads(line)) for line in out.read_text().splitlines()] == [False, True]


def test_a_run_whose_every_prompt_fails_says_why_and_keeps_the_old_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Every prompt failed: a failed run (status 1), each reason on standard error (--quiet silences
    progress, not errors), and the old result file left as it was, as after any failed run."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert main([*RUN, "--prompt", "x" * 200, "--prompt", "y" * 150, "--json", str(out), "-q"]) == 1
    assert capfd.readouterr().err.splitlines() == [
        "tiltsmc: error: prompt 0: 200 prompt tokens + max_new_tokens 3 exceed the model's context of 128",
        "tiltsmc: error: prompt 1: 150 prompt tokens + max_new_tokens 3 exceed the model's context of 128",
        "tiltsmc: all 2 prompt(s) failed; no result file written",
    ]
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize("option", ["--chat", "--messages"])
def test_chat_prompts_without_a_chat_template_are_refused_before_the_run(
    option: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The Llama fixture's tokenizer has no chat template: every chat prompt would fail, so --chat and
    --messages are refused once the policy is loaded (status 2), naming the option and the way out."""
    messages = tmp_path / "chats.jsonl"
    messages.write_text('[{"role": "user", "content": "hi"}]\n')
    prompts = ["--chat", "--prompt", "hi"] if option == "--chat" else ["--messages", str(messages)]
    out = tmp_path / "out.jsonl"
    assert main([*RUN, *prompts, "--json", str(out)]) == 2
    error = one_line_error(capfd)
    assert (
        error.startswith(f"tiltsmc: {option}: the policy's tokenizer (") and "has no chat template" in error
    )
    assert "give one with --chat-template FILE" in error and not out.exists()


@pytest.mark.parametrize("option", ["--chat", "--messages"])
def test_chat_prompts_without_jinja2_are_refused_before_the_models_load(
    option: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without jinja2 (the chat extra) every chat prompt failed alone, after both models had loaded: one
    line naming the extra, status 1 (a missing dependency, as ONNX Runtime's), before the models load."""
    from tiltsmc import cli

    def loaded(args: Any) -> Any:
        raise AssertionError("the models were loaded")

    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 now fails
    monkeypatch.setattr(cli, "_load_models_or_fail", loaded)
    messages = tmp_path / "chats.jsonl"
    messages.write_text('[{"role": "user", "content": "hi"}]\n')
    prompts = ["--chat", "--prompt", "hi"] if option == "--chat" else ["--messages", str(messages)]
    out = tmp_path / "out.jsonl"
    assert main([*RUN, *prompts, "--json", str(out)]) == 1
    assert one_line_error(capfd) == (
        f"tiltsmc: {option}: chat prompts need jinja2 to render the chat template: pip install "
        "'tiltsmc[chat]'\n"
    )
    assert not out.exists()


def test_a_messages_line_with_a_null_users_content_is_refused_before_the_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A null content is an assistant's (a tool call): another role's was rendered as "None"; refused as
    the file is read, naming the line and the message, as the server refuses it."""
    messages = tmp_path / "chats.jsonl"
    messages.write_text('[{"role": "system", "content": "s"}, {"role": "user", "content": null}]\n')
    assert main([*RUN, "--messages", str(messages)]) == 2
    assert one_line_error(capfd) == (
        f"tiltsmc: --messages: {messages} line 1: message 1: content: None (JSON null) is only for an "
        "assistant's message (a tool call); a 'user' message needs its text\n"
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('[{"role": "user", "content": "hi", "meta": NaN}]', "NaN is not a JSON number"),
        ('[{"role": "user", "content": "hi", "meta": -Infinity}]', "-Infinity is not a JSON number"),
        ('[{"role": "user", "content": "hi", "meta": 1e400}]', "1e400 is past the range of double-precision"),
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deep"),
        ('[{"role": "user", "content": "a\\udcffb"}]', "\\udcff is a lone surrogate escape, not a character"),
        ('[{"role": "user", "content": "hi", "\\ud800": 1}]', "\\ud800 is a lone surrogate escape"),
    ],
    ids=["nan", "infinity", "1e400", "nested", "surrogate", "surrogate-key"],
)
def test_a_messages_line_json_cannot_write_back_is_refused_before_the_run(
    line: str, reason: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A --messages line that the output (strict JSON, echoing the prompt) could not write is refused up
    front naming the line (NaN, Infinity and 1e400 were read, and the run failed after sampling, losing
    that batch and every later one; nesting past the reader's depth was an unexpected RecursionError)."""
    messages = tmp_path / "chats.jsonl"
    messages.write_text('[{"role": "user", "content": "hi"}]\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert main([*RUN, "--messages", str(messages), "--json", str(out)]) == 2
    error = one_line_error(capfd)
    assert error.startswith(f"tiltsmc: --messages: {messages} line 2: {reason}"), error
    assert not out.exists()


def test_onnx_runtime_error_during_the_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A GPT-2 whose config.json claims 1000 positions but whose graph has 128: ONNX Runtime fails in the
    run (Gather out of bounds) on the long prompt. That prompt fails alone (its line on standard error, its
    record with the error) and the others are written; where it is the only prompt, the run fails (status
    1, "all 1 prompt(s) failed") and the old result file is kept."""
    policy = model_copy(tmp_path, "gpt2-tiny")
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "n_positions": 1000}))
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    argv = [*RUN, "--prompt", "x" * 150, "--json", str(out)]
    argv[argv.index("--policy") + 1] = str(policy)
    assert main(argv) == 1
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2 and "Traceback" not in lines[0], lines
    assert lines[0].startswith("tiltsmc: error: prompt 0: ") and "Gather" in lines[0]
    assert lines[1] == "tiltsmc: all 1 prompt(s) failed; no result file written"
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main([*argv[:-4], "--prompt", "hi", *argv[-4:], "-q"]) == 0
    (error,) = capfd.readouterr().err.splitlines()
    assert error.startswith("tiltsmc: error: prompt 1: ") and "Gather" in error
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1]
    assert "error" not in records[0] and math.isfinite(records[0]["log_z"])
    assert records[1]["error"].startswith("prompt 0: ") and "Gather" in records[1]["error"]
    assert records[1]["collapsed"] is True and records[1]["samples"] == [] and records[1]["log_z"] is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_device(capfd: pytest.CaptureFixture[str]) -> None:
    assert main([*RUN, "--prompt", "hi", "--json", "/dev/full"]) == 1
    assert one_line_error(capfd) == "tiltsmc: --json: cannot write /dev/full: No space left on device\n"


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
def test_a_file_that_cannot_grow(tmp_path: Path) -> None:
    """A file size limit (as a full disk): the results cannot be written; the old file stays as it was."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); "
        "from tiltsmc.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, *RUN, "--prompt", "hi", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    assert completed.stderr == f"tiltsmc: --json: cannot write {out}: File too large\n"
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.skipif(os.name != "posix", reason="SIGPIPE semantics")
def test_a_reader_that_goes_away(tmp_path: Path) -> None:
    """``tiltsmc run ... | head -n 1``: the rest of the run cannot be written; one line, status 1."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {k}\n" for k in range(400)))  # more than a pipe holds
    process = subprocess.Popen(
        [sys.executable, "-m", "tiltsmc.cli", *RUN, "--prompts", str(prompts), "--batch-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    error = process.stderr.read().decode()
    process.stderr.close()
    process.wait(timeout=120)
    assert json.loads(first)["prompt"] == "prompt 0"
    assert process.returncode == 1
    # no --json given: the line does not name it
    assert error == "tiltsmc: standard output was closed by its reader (broken pipe)\n"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--policy", "/nonexistent"], "--policy: /nonexistent does not exist"),
        (["--reward", "/nonexistent"], "--reward: /nonexistent does not exist"),
        (["--reward-output", "nope"], "--reward-output: 'nope' is not an output of model.onnx"),
        (["--reward-label", "5"], "--reward-label: 5 is not a class of 'logits' (1 classes)"),
        (["--reward-classes", "0,1"], "--reward-classes: needs --reward-label (the class whose"),
        (
            ["--reward-label", "0", "--reward-classes", "0,99999999999999999999"],
            "--reward-classes: class index 99999999999999999999 is too large (the largest is "
            "9223372036854775807)",
        ),
        (
            ["--reward-label", "99999999999999999999"],
            "--reward-label: class index 99999999999999999999 is too",
        ),
        (["--reward-position", "delimiter"], "--reward-delimiters: --reward-position delimiter needs the"),
        (["--reward-kv-cache", "on"], "--reward-kv-cache: model.onnx cannot keep a cache"),
        (
            ["--padding-side", "right"],
            "let --padding-side left out try both sides, or pass --check-batching off",
        ),
        (["--cache-in-place", "on"], "--cache-in-place: needs a right-padded policy on the host"),
        (["--max-new-tokens", "500"], "leaves no room for a prompt with --max-new-tokens 500"),
        (["--session-option", "nope=1"], "--session-option: 'nope' is not a field of onnxruntime.Session"),
        (["--provider-option", "Nope:x=1"], "--provider-option: 'Nope' is not a provider ONNX Runtime knows"),
    ],
)
def test_model_load_errors_name_the_options_typed(
    options: list[str], message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The library's load errors name its arguments (``path``, ``output``, ``label=``,
    ``check_batching=False``); the CLI writes the options that set them, so that the line names what the
    user typed (``path`` as --policy or --reward)."""
    argv = [*RUN, "--prompt", "hi", *options]
    if options[0] in ("--policy", "--reward"):  # in place of the fixture
        argv[argv.index(options[0]) + 1] = options[1]
        argv = argv[:-2]
    assert main(argv) == 2
    assert message in one_line_error(capfd)


def non_utf8_folder(tmp_path: Path) -> Path:
    """A copy of the policy fixture in a folder whose name is not UTF-8 (skips where the file system
    refuses such a name)."""
    if os.name != "posix" or sys.platform == "darwin":
        pytest.skip("file names of any bytes are POSIX (not macOS)")
    folder = tmp_path / os.fsdecode(b"p\xff")
    try:
        shutil.copytree(FIXTURES / "llama-tiny", folder)
    except OSError as error:
        pytest.skip(f"the file system refuses a name that is not UTF-8: {error}")
    return folder


@pytest.mark.parametrize("onnx_file", [False, True])
def test_a_model_path_that_is_not_utf8_is_refused_naming_the_option(
    onnx_file: bool, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """ONNX Runtime's binding refused it with a raw "incompatible constructor arguments" error."""
    from tiltsmc.models import OnnxCausalLM

    folder = non_utf8_folder(tmp_path)
    policy = folder / "model.onnx" if onnx_file else folder
    with pytest.raises(ValueError, match=r"^path: .*p\\xff/model.onnx is not UTF-8 text \(byte 0xff\)"):
        OnnxCausalLM(policy)
    argv = [*RUN, "--prompt", "hi"]
    argv[argv.index("--policy") + 1] = str(policy)
    assert main(argv) == 2
    assert one_line_error(capfd).endswith(
        "p\\xff/model.onnx is not UTF-8 text (byte 0xff), which ONNX Runtime cannot open: rename it\n"
    )


def test_the_librarys_own_load_errors_keep_its_argument_names() -> None:
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    with pytest.raises(ValueError, match=r"^output: 'nope' is not an output"):
        OnnxRewardModel(REWARD, output="nope")
    with pytest.raises(ValueError, match=r"or pass check_batching=False to run it anyway$"):
        OnnxCausalLM(POLICY, padding_side="right")


def test_a_value_output_error_names_the_options_typed(capfd: pytest.CaptureFixture[str]) -> None:
    twist = str(FIXTURES / "gpt2-twist-tiny")
    argv = ["run", "--policy", twist, "--value-output", "twist", "--step", "\\n", "--prompt", "10"]
    assert main(argv) == 2
    assert one_line_error(capfd) == (
        "tiltsmc: --value-output: a twist head scores one-token extensions; "
        "load the policy with --step token\n"
    )


@pytest.mark.parametrize(
    ("sampler", "option", "value"),
    [
        ("sp-gsmc", "--particles", "4"),
        ("sp-gsmc", "--resample", "multinomial"),
        ("sp-gsmc", "--ess-threshold", "0.9"),
        ("sp-gsmc", "--bound", "3"),
        ("sp-gsmc", "--mh-steps", "4"),
        ("smc", "--pool-size", "4"),
        ("best-of-n", "--ess-threshold", "0.5"),
        ("mh", "--max-tries", "10"),
        ("rejection", "--mh-steps", "2"),
    ],
)
def test_an_option_the_sampler_does_not_take_is_refused(
    sampler: str, option: str, value: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Given explicitly, an option the chosen sampler does not take is refused before the models load
    (status 2), as the server refuses it; it used to be dropped silently."""
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", POLICY, "--reward", REWARD, "--prompt", "hi", "--json", str(out)]
    assert main([*argv, "--sampler", sampler, option, value]) == 2
    assert one_line_error(capfd).startswith(
        f"tiltsmc: {option}: not an option of --sampler {sampler} (it takes"
    )
    assert not out.exists()


@pytest.mark.parametrize("sampler", ["best-of-n", "rejection"])
def test_eps_is_refused_by_a_sampler_without_a_bellman_reading(
    sampler: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """best-of-n and rejection take no guided steps, so no online Bellman reading: --eps was ignored."""
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", POLICY, "--reward", REWARD, "--prompt", "hi", "--json", str(out)]
    assert main([*argv, "--sampler", sampler, "--eps", "0"]) == 2
    assert one_line_error(capfd) == (
        f"tiltsmc: --eps: --sampler {sampler} takes no guided steps, so it gives no online Bellman reading "
        "to check --eps against (smc, sp-gsmc and mh do)\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("sampler", "options", "expected"),
    [
        ("mh", ["--particles", "3", "--mh-steps", "1", "--resample", "multinomial"], {"num_particles": 3}),
        ("rejection", ["--particles", "8", "--max-tries", "16"], {"batch_size": 8, "max_tries": 16}),
    ],
)
def test_each_sampler_takes_the_servers_options(
    sampler: str, options: list[str], expected: dict[str, Any], tmp_path: Path
) -> None:
    """mh's --particles sets its number of particles and rejection's its draws per round, as the server's
    ``particles`` does (SAMPLER_FIELDS): the CLI takes each sampler's server options, and rejection's
    --num-samples and --max-tries, which the server fixes."""
    out = tmp_path / "out.jsonl"
    argv = [*RUN[:5], "--prompt", "hi", "--json", str(out), "--sampler", sampler, *options]
    assert main(argv) == 0
    recorded = json.loads(out.read_text())["run"]["options"]
    assert {name: recorded[name] for name in expected} == expected
    if sampler == "mh":
        assert recorded["resample"] == "multinomial"
    pytest.importorskip("fastapi")
    from tiltsmc.cli import _RUN_OPTIONS
    from tiltsmc.serving.server import SAMPLER_FIELDS

    for name, fields in SAMPLER_FIELDS.items():
        cli_options = _RUN_OPTIONS[name.replace("_", "-")]
        extra = {"num_samples": "num_samples", "max_tries": "max_tries"} if name == "rejection" else {}
        assert cli_options == {**fields, **extra}, name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--reward-delimiters", "39"],
            "--reward-delimiters: read only with --reward-position delimiter (the reward is read at the last "
            "token here); give that too, or leave them out",
        ),
        (
            ["--reward-position", "last", "--reward-delimiters", "39"],
            "--reward-delimiters: read only with --reward-position delimiter",
        ),
        (
            ["--provider-option", "TensorrtExecutionProvider:trt_fp16_enable=1"],
            "--provider-option: the models run on CPUExecutionProvider, not on TensorrtExecutionProvider: "
            "its options would have no effect",
        ),
        (
            ["--cpu", "--provider-option", "CUDAExecutionProvider:device_id=1"],
            "--provider-option: the models run on CPUExecutionProvider (--cpu), not on CUDAExecutionProvider",
        ),
    ],
)
def test_options_that_would_have_no_effect_are_refused(
    options: list[str], message: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """--reward-delimiters with the reward read at the last token, and a provider's options where the models
    do not run on it, were taken and dropped: refused naming the option and why, status 2, no output."""
    if "Tensorrt" in options[-1] and "CUDAExecutionProvider" in _providers_used():
        pytest.skip("the models run on CUDA here")
    out = tmp_path / "out.jsonl"
    assert main([*RUN, "--prompt", "hi", "--json", str(out), *options]) == 2
    assert one_line_error(capfd).startswith(f"tiltsmc: {message}")
    assert not out.exists()


def _providers_used() -> list[str]:
    from tiltsmc.models import OnnxCausalLM

    providers: list[str] = OnnxCausalLM(POLICY).session.get_providers()
    return providers


def test_cuda_options_where_the_models_fell_back_to_the_cpu_are_a_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Without --cpu the models run on CUDA where a GPU is usable and on the CPU otherwise (documented), so
    that one command line serves both: CUDA's options on a machine without a GPU only warn."""
    if "CUDAExecutionProvider" in _providers_used():
        pytest.skip("the models run on CUDA here")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                *RUN,
                "--prompt",
                "hi",
                "--json",
                str(out),
                "--provider-option",
                "CUDAExecutionProvider:device_id=0",
                "-q",
            ]
        )
        == 0
    )
    assert capfd.readouterr().err == (
        "tiltsmc: warning: --provider-option: the models run on CPUExecutionProvider here (CUDA only where a "
        "GPU is usable), so the options of CUDAExecutionProvider have no effect\n"
    )
    assert prompts_of_file(out) == ["hi"]


def prompts_of_file(path: Path) -> list[Any]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "options",
    [
        ["--reward-label", "1"],
        ["--reward-output", "logits"],
        ["--reward-position", "delimiter", "--reward-delimiters", "39"],
        ["--reward-kv-cache", "off"],
    ],
)
def test_reward_model_options_with_the_policys_own_value_head_are_refused(
    options: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    """With --value-output no reward model is loaded (the policy's head is read): the options of one were
    taken and dropped."""
    value = str(FIXTURES / "gpt2-value-tiny")
    argv = ["run", "--policy", value, "--value-output", "value", "--prompt", "hi", *options]
    assert main(argv) == 2
    assert one_line_error(capfd) == (
        f"tiltsmc: {options[0]}: an option of the reward model --reward loads; with --value-output the "
        "policy's own head is read (as --reward-kind says)\n"
    )


def test_serve_refuses_reward_delimiters_it_would_drop(
    capfd: pytest.CaptureFixture[str], nothing_serves: None
) -> None:
    argv = ["serve", "--policy", POLICY, "--reward", REWARD, "--port", "0", "--reward-delimiters", "39"]
    assert main(argv) == 2
    assert one_line_error(capfd).startswith("tiltsmc: --reward-delimiters: read only with --reward-position")
    assert main([*argv, "--ray"]) == 2  # before Ray starts, whose replicas load the models
    assert one_line_error(capfd).startswith("tiltsmc: --reward-delimiters: read only with --reward-position")


def test_a_reward_model_with_another_vocabulary_is_refused_before_the_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    reward = model_copy(tmp_path, "prm-tiny")
    tokenizer = json.loads((reward / "tokenizer.json").read_text())
    vocabulary = tokenizer["model"]["vocab"]
    vocabulary["z"] = vocabulary.pop("a")
    (reward / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "out.jsonl"
    argv = [*RUN, "--prompt", "hi", "--json", str(out)]
    argv[argv.index("--reward") + 1] = str(reward)
    assert main(argv) == 2
    assert "reward: the reward model's tokenizer differs from the policy's" in one_line_error(capfd)
    assert not out.exists()


def exit_status(argv: list[str]) -> Any:
    """``main(argv)``'s status, whether returned (a ``CliError``) or raised by argparse (``SystemExit``)."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture
def nothing_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray, the HTTP server and the models all fail the test if reached: what is refused is refused first."""
    from tiltsmc import cli
    from tiltsmc.serving import ray as serving_ray
    from tiltsmc.serving import server as serving_server

    def reached(what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{what} was reached")

        return call

    monkeypatch.setattr(serving_ray, "serve_on_ray", reached("serve_on_ray (Ray)"))
    monkeypatch.setattr(serving_server, "serve", reached("the HTTP server"))
    monkeypatch.setattr(cli, "_load_models_or_fail", reached("the models"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--autoscale", "2"], "--autoscale: expected MIN:MAX, got '2'"),
        (["--autoscale", "3:1"], "--autoscale: expected 0 <= MIN <= MAX, MAX >= 1, got 3:1"),
        (["--autoscale", "0:0"], "--autoscale: expected 0 <= MIN <= MAX, MAX >= 1, got 0:0"),
        (["--replicas", "0"], "--replicas: expected an integer >= 1, got 0"),
        (["--replicas", "two"], "--replicas: expected an integer >= 1, got 'two'"),
        # "unexpected error: ValueError: cannot convert float NaN to integer" (status 1)
        (["--replica-cpus", "nan"], "--replica-cpus: expected a finite number >= 0 (0, or at least 0.0001"),
        (["--replica-cpus", "inf"], "--replica-cpus: expected a finite number >= 0"),
        # refused by Ray only after Ray and Serve had started, in a message that named no option
        (["--replica-cpus", "-1"], "--replica-cpus: expected a finite number >= 0"),
        (
            ["--replica-cpus", "0.00001"],
            "--replica-cpus: expected a finite number >= 0 (0, or at least 0.0001",
        ),
        (["--replica-gpus", "-1"], "--replica-gpus: expected a finite number >= 0"),
        (["--replica-gpus", "nan"], "--replica-gpus: expected a finite number >= 0"),
        (
            ["--autoscale", "1:2", "--target-ongoing", "0"],
            "--target-ongoing: expected a finite number > 0, got 0",
        ),
        (["--autoscale", "1:2", "--target-ongoing", "inf"], "--target-ongoing: expected a finite number > 0"),
        (["--autoscale", "1:2", "--target-ongoing", "x"], "--target-ongoing: expected a finite number > 0"),
    ],
)
def test_serve_on_ray_refuses_bad_options_in_one_line(
    options: list[str], message: str, capfd: pytest.CaptureFixture[str], nothing_serves: None
) -> None:
    """Refused as the options are parsed, before Ray starts: one line on standard error naming the option,
    status 2 (the library prints nothing)."""
    argv = ["serve", "--policy", POLICY, "--reward", REWARD, "--ray", *options]
    assert exit_status(argv) == 2
    assert message in one_line_error(capfd)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (
            (3, 9, 18, "final", 0),
            "--ray needs Ray Serve >= 2.56, which needs Python >= 3.10 (this is Python 3.9,",
        ),
        ((3, 11, 7, "final", 0), "--ray needs the ray extra: pip install 'tiltsmc[ray,cpu]' (or ray,gpu)"),
    ],
    ids=["python-3.9", "python-3.11"],
)
def test_serve_on_ray_without_ray_says_what_would_bring_it(
    version: tuple[object, ...],
    message: str,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Ray, ``tiltsmc serve --ray`` named the ray extra on every Python; on 3.9 that extra installs
    no Ray (Ray Serve >= 2.56 needs 3.10), so it says which Python Ray Serve needs instead."""
    from tiltsmc import cli

    def loaded(args: Any) -> Any:
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(cli, "_load_models_or_fail", loaded)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    monkeypatch.setattr(sys, "version_info", version)
    status = exit_status(["serve", "--policy", POLICY, "--reward", REWARD, "--ray", "--port", "8765"])
    monkeypatch.undo()
    assert status == 1
    assert one_line_error(capfd).startswith(f"tiltsmc: {message}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--replicas", "2"], "--replicas: an option of --ray (Ray Serve); give --ray too, or leave it out"),
        (["--replica-cpus", "0.5"], "--replica-cpus: an option of --ray"),
        (["--replica-gpus", "1"], "--replica-gpus: an option of --ray"),
        (["--autoscale", "1:2"], "--autoscale: an option of --ray"),
        (["--target-ongoing", "3"], "--target-ongoing: an option of --ray"),
        (["--address", "auto"], "--address: an option of --ray"),
        # given with their defaults too: given, they say something the command would not do
        (["--replicas", "1", "--replica-cpus", "1"], "--replicas: an option of --ray"),
        (["--ray", "--target-ongoing", "3"], "--target-ongoing: an option of --autoscale (the ongoing"),
        (["--ray", "--autoscale", "1:4", "--replicas", "2"], "--replicas: not with --autoscale, which sets"),
    ],
)
def test_serve_refuses_options_it_would_drop(
    options: list[str], message: str, capfd: pytest.CaptureFixture[str], nothing_serves: None
) -> None:
    """Ray options without --ray, --target-ongoing without --autoscale and --replicas with it were dropped
    silently (the server started without Ray): refused in one line, status 2, as the CLI refuses an
    option the sampler or the --demo models do not take, before Ray, the models or the server start."""
    assert main(["serve", "--demo", "--port", "0", *options]) == 2
    assert one_line_error(capfd).startswith(f"tiltsmc: {message}")


def test_ray_options_left_out_take_build_applications_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """One set of defaults: ``tiltsmc serve --ray`` passes only the options given, so the others are
    ``build_application``'s (its help shows them), and the replica's CPUs that share out the threads too."""
    import inspect

    from tiltsmc.cli import build_parser
    from tiltsmc.serving import ray as serving_ray

    parameters = inspect.signature(serving_ray.build_application).parameters
    assert parameters["replicas"].default is None  # REPLICAS, told apart from one given (autoscaling)
    assert (
        serving_ray.deployment_options(serving_ray.ReplicaOptions({}, serving_ray.Settings()))["num_replicas"]
        == serving_ray.REPLICAS
    )
    assert parameters["num_cpus"].default == serving_ray.REPLICA_CPUS
    assert parameters["num_gpus"].default == serving_ray.REPLICA_GPUS
    parse = build_parser().parse_args
    plain = parse(["serve", "--ray", "--demo"])
    assert serving_ray.application_arguments(plain) == {}
    assert serving_ray.replica_cpus(plain) == serving_ray.REPLICA_CPUS
    given = parse(
        ["serve", "--ray", "--demo", "--replicas", "3", "--replica-cpus", "0.5", "--replica-gpus", "0"]
    )
    assert serving_ray.application_arguments(given) == {"replicas": 3, "num_cpus": 0.5, "num_gpus": 0.0}
    scaled = parse(["serve", "--ray", "--demo", "--autoscale", "0:4", "--target-ongoing", "8"])
    assert serving_ray.application_arguments(scaled) == {
        "autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8.0}
    }
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--replicas REPLICAS replicas (default: {serving_ray.REPLICAS})" in help_text
    assert f"CPUs each replica reserves (default: {serving_ray.REPLICA_CPUS:g})" in help_text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-new-tokens", "5"], "--max-new-tokens: not an option of the bundled --demo models"),
        (["--temperature", "0.5"], "--temperature: not an option of the bundled --demo models"),
        (["--reward-kind", "prob"], "--reward-kind: not an option of the bundled --demo models"),
        (["--session-option", "log_severity_level=3"], "--session-option: not an option of the bundled"),
        (["--session-config", "session.intra_op.allow_spinning=0"], "--session-config: not an option of the"),
        (["--reward", REWARD], "--reward: not an option of the bundled --demo models"),  # was ignored
    ],
)
def test_demo_models_refuse_the_options_they_would_ignore(
    options: list[str], message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The bundled models fix their own settings: an option they would ignore is refused in one line
    (status 2, before any server starts), never silently dropped."""
    assert main(["serve", "--demo", "--port", "0", *options]) == 2
    assert message in one_line_error(capfd)


@pytest.mark.parametrize("value", ["-1", "soon", "inf", "nan"])
def test_serve_refuses_a_bad_release_delay_in_one_line(value: str, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--demo", "--port", "0", f"--release-memory-after={value}"])
    assert exit_info.value.code == 2
    assert "--release-memory-after: expected seconds >= 0 or 'never'" in one_line_error(capfd)


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1e9", ""])
def test_serve_refuses_a_bad_cache_bound_in_one_line(value: str, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--demo", "--port", "0", f"--max-cache-bytes={value}"])
    assert exit_info.value.code == 2
    assert "--max-cache-bytes: expected a positive integer, 'auto' or 'none'" in one_line_error(capfd)


@contextlib.contextmanager
def served_engine(*options: str) -> Iterator[tuple[Any, Any]]:
    """The settings ``tiltsmc serve --demo OPTIONS`` parses and the engine it serves with (closed after)."""
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.server import Settings

    settings = Settings.from_args(build_parser().parse_args(["serve", "--demo", *options]))
    engine = settings.engine(*tiltsmc.tasks.arithmetic.load_models())
    try:
        yield settings, engine
    finally:
        engine.close()


@pytest.mark.parametrize(("value", "seconds"), [(None, 30.0), ("never", None), ("0", 0.0), ("2.5", 2.5)])
def test_serve_passes_its_release_delay_to_the_engine(value: Optional[str], seconds: Optional[float]) -> None:
    """The server's engine releases memory after the option's delay; the default is the engine's own."""
    from tiltsmc.serving.engine import RELEASE_MEMORY_AFTER, Engine

    options = [] if value is None else ["--release-memory-after", value]
    with served_engine(*options) as (settings, engine):
        assert settings.release_memory_after == seconds
        if value is None:
            default = inspect.signature(Engine).parameters["release_memory_after"].default
            assert default == RELEASE_MEMORY_AFTER
        assert engine.release_memory_after == seconds


@pytest.mark.parametrize(("value", "adaptive"), [(None, True), ("on", True), ("off", False)])
def test_serve_passes_adaptive_rows_to_the_engine(value: Optional[str], adaptive: bool) -> None:
    """``--adaptive-rows on|off`` reaches the engine; the default is the engine's own."""
    from tiltsmc.serving.engine import ADAPTIVE_ROWS, Engine

    with served_engine(*([] if value is None else ["--adaptive-rows", value])) as (settings, engine):
        assert settings.adaptive_rows is adaptive
        assert inspect.signature(Engine).parameters["adaptive_rows"].default is ADAPTIVE_ROWS
        assert engine.adaptive_rows is adaptive


def test_serve_refuses_a_bad_adaptive_rows_value(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--demo", "--port", "0", "--adaptive-rows", "maybe"])
    assert exit_info.value.code == 2
    assert "--adaptive-rows: invalid choice: 'maybe'" in one_line_error(capfd)


@pytest.mark.parametrize(("value", "workers"), [(None, 1), ("2", 2)])
def test_serve_passes_its_workers_to_the_engine(value: Optional[str], workers: int) -> None:
    """``--workers`` reaches the engine (each worker steps its own batch); the default is the engine's."""
    from tiltsmc.serving.engine import WORKERS, Engine

    with served_engine(*([] if value is None else ["--workers", value])) as (settings, engine):
        assert settings.workers == workers
        assert inspect.signature(Engine).parameters["workers"].default == WORKERS
        assert engine.workers == workers and len(engine.stats()["workers"]) == workers


def test_serve_shares_the_cores_out_between_its_workers() -> None:
    from tiltsmc.cli import serve_threads
    from tiltsmc.serving.engine import usable_cores

    cores = usable_cores()
    assert serve_threads(None, 1) is None  # ONNX Runtime's default
    assert serve_threads(None, 2) == max(1, cores // 2)
    assert serve_threads(None, 10 * cores) == 1
    assert serve_threads(3, 2) == 3  # --threads wins
    assert serve_threads(None, 2, cores=8) == 4  # a Ray replica's reserved CPUs
    assert serve_threads(None, 4, cores=1) == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "0", "--workers: expected a positive integer"),
        ("--workers", "257", "--workers: expected at most 256 worker threads"),
        ("--max-body-bytes", "0", "--max-body-bytes: expected a positive integer"),
        ("--stream-keepalive", "0", "--stream-keepalive: expected a positive number of seconds"),
        ("--stream-keepalive", "nan", "--stream-keepalive: expected a positive number of seconds"),
        ("--stream-keepalive", "inf", "--stream-keepalive: expected a positive number of seconds"),
    ],
)
def test_serve_refuses_a_bad_count_in_one_line(
    option: str, value: str, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--demo", "--port", "0", option, value]) == 2
    assert message in one_line_error(capfd)


def test_serve_takes_its_body_limit() -> None:
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.server import Limits, Settings

    def limits(*options: str) -> Limits:
        return Settings.from_args(build_parser().parse_args(["serve", "--demo", *options])).limits

    assert limits().max_body_bytes == Limits.max_body_bytes
    assert limits("--max-body-bytes", "1000").max_body_bytes == 1000
    with served_engine("--max-cache-bytes", "5000000") as (settings, engine):
        assert settings.max_cache_bytes == engine.max_cache_bytes == 5_000_000
    with served_engine("--max-cache-bytes", "none") as (settings, engine):
        assert settings.max_cache_bytes is engine.max_cache_bytes is None
    for options in [(), ("--max-cache-bytes", "AUTO")]:  # the default: a share of the memory available
        with served_engine(*options) as (settings, engine):
            assert settings.max_cache_bytes == "auto"
            assert isinstance(engine.max_cache_bytes, int) and engine.max_cache_bytes > 0
            assert engine.stats()["max_cache_bytes"] == engine.max_cache_bytes


@pytest.mark.skipif(os.name != "posix", reason="closes a POSIX file descriptor for the child")
def test_closed_standard_streams_and_the_traceback_switch() -> None:
    """Started with standard error closed (``2>&-``) a run writes its results and nothing else to standard
    output (the error line went there, after an unexpected AttributeError); with standard output closed
    and no --json it is refused before the models load (an AssertionError after the run)."""
    command = [sys.executable, "-m", "tiltsmc.cli", *RUN, "--prompt", "hi"]

    def started(closed: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            stdout=subprocess.DEVNULL if closed == 1 else subprocess.PIPE,
            stderr=subprocess.STDOUT if closed == 2 else subprocess.PIPE,
            text=True, timeout=120, preexec_fn=lambda: os.close(closed),
        )  # fmt: skip

    no_stderr = started(2)
    assert no_stderr.returncode == 0 and [
        json.loads(line)["prompt"] for line in no_stderr.stdout.splitlines()
    ] == ["hi"]
    no_stdout = started(1)
    assert no_stdout.returncode == 2
    assert no_stdout.stderr == "tiltsmc: --json: standard output is closed: give --json FILE\n"


@pytest.mark.parametrize(
    ("value", "shown"), [("1", True), ("yes", True), ("0", False), ("off", False), ("", False)]
)
def test_the_traceback_switch_reads_its_value(
    value: str,
    shown: bool,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TILTSMC_TRACEBACK adds a failed prompt's traceback where set to anything but empty, 0, false, no or
    off (TILTSMC_TRACEBACK=0 showed it: any value did)."""
    policy = model_copy(tmp_path, "gpt2-tiny")  # its config.json claims positions its graph does not have
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "n_positions": 1000}))
    argv = [*RUN, "--prompt", "x" * 150, "--prompt", "hi", "-q"]
    argv[argv.index("--policy") + 1] = str(policy)
    monkeypatch.setenv("TILTSMC_TRACEBACK", value)
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert err.startswith("tiltsmc: error: prompt 0: ") and ("Traceback" in err) == shown, err


def test_chat_options_that_would_be_ignored_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Options are refused, never dropped: --chat-template without chat prompts, --chat with --messages
    (both were taken and ignored)."""
    messages = tmp_path / "chats.jsonl"
    messages.write_text('[{"role": "user", "content": "hi"}]\n')
    template = str(FIXTURES / "chat-tiny" / "chat_template.jinja")
    for extra, error in [
        (["--prompt", "hi", "--chat-template", template], "--chat-template: only chat prompts use it"),
        (
            ["--messages", str(messages), "--chat"],
            "--chat: makes each --prompt / --prompts line a user message",
        ),
    ]:
        assert main([*RUN, *extra]) == 2
        assert one_line_error(capfd).startswith(f"tiltsmc: {error}")


# -- text options that are not UTF-8; mh options of the other proposal form --------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--stop", b"\xe9", "'\\xe9' is not UTF-8 text (byte 0xe9)"),
        ("--stop", b"ok\\n\xff", "'ok\\n\\xff' is not UTF-8 text (byte 0xff)"),
        ("--step", b"\xe9", "'\\xe9' is not UTF-8 text (byte 0xe9)"),
        # an escape that makes a lone surrogate is no text either (it was taken, and could never match)
        ("--stop", b"ok\\udcff", "malformed escape in 'ok\\\\udcff': it makes U+DCFF, a lone surrogate"),
        ("--step", b"\\ud800", "malformed escape in '\\\\ud800': it makes U+D800, a lone surrogate"),
        ("--prompt", b"\xff", "'\\xff' is not UTF-8 text (byte 0xff)"),
        (
            "--prompt",
            b"a" * 100 + b"\xfe" + b"b" * 100,
            f"'...{'a' * 30}\\xfe{'b' * 29}...' is not UTF-8 text (byte 0xfe at byte 100)",
        ),
    ],
)
def test_text_options_that_are_not_utf8_are_refused(
    option: str, value: bytes, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A stop text or a step delimiter with bytes that are not UTF-8 could never match the generated text,
    and were taken silently; such a prompt failed alone with a message naming no byte, its line holding a
    lone surrogate that strict JSON readers refuse. Refused as parsed, naming the option and the byte (and
    where it is in a long prompt), status 2, as --session-option and --prompts files are."""
    argv = [*RUN, option, os.fsdecode(value)]
    if option != "--prompt":
        argv += ["--prompt", "hi"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in one_line_error(capfd)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--particles", "4", "--pool-size", "2"],
            "--pool-size: not used by --sampler mh with --particles 4 (its proposals are SMC runs, which "
            "take --resample and --ess-threshold",
        ),
        (["--resample", "multinomial"], "--resample: not used by --sampler mh with one particle"),
        (["--particles", "1", "--ess-threshold", "1"], "--ess-threshold: not used by --sampler mh with one"),
        (["--resample", "systematic", "--pool-size", "4"], "--resample: not used by --sampler mh with one"),
    ],
)
def test_mh_options_of_the_other_proposal_form_are_refused(
    options: list[str], message: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """mh's proposals are SP-gSMC runs (one particle: --pool-size) or SMC runs (more: --resample,
    --ess-threshold); an option of the other form had no effect, yet was taken and recorded in the run's
    options as used. Refused naming it, status 2, before the models load."""
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", "/nonexistent", "--reward", REWARD, "--prompt", "hi", "--json", str(out)]
    assert main([*argv, "--sampler", "mh", *options]) == 2
    assert one_line_error(capfd).startswith(f"tiltsmc: {message}")
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "recorded"),
    [
        (["--pool-size", "3"], {"num_particles": 1, "pool_size": 3}),
        (["--particles", "3", "--ess-threshold", "1"], {"num_particles": 3, "ess_threshold": 1.0}),
    ],
)
def test_mh_takes_the_options_of_its_proposal_form(
    options: list[str], recorded: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    assert main([*RUN[:5], "--prompt", "hi", "-q", "--json", str(out), "--sampler", "mh", *options]) == 0
    taken = json.loads(out.read_text())["run"]["options"]
    assert {name: taken[name] for name in recorded} == recorded


@pytest.mark.skipif(os.name != "posix", reason="a pipe whose reader has gone (SIGPIPE ignored by Python)")
def test_a_demo_whose_reader_left_says_what_it_wrote(tmp_path: Path) -> None:
    """The demo wrote its files, then its table met a closed pipe: the line said only "broken pipe"."""
    out = tmp_path / "demo"
    read, write = os.pipe()
    argv = ["demo", "--out", str(out), "--levels", "2", "--budgets", "2", "--problems", "1", "-q"]
    process = subprocess.Popen(
        [sys.executable, "-m", "tiltsmc.cli", *argv], stdout=write, stderr=subprocess.PIPE, text=True
    )
    os.close(write)
    os.close(read)
    _, error = process.communicate(timeout=300)
    assert process.returncode == 1
    *before, last = error.splitlines()
    # without matplotlib (the demo extra), a warning that there is no plot comes first
    no_plot = "tiltsmc: warning: demo: matplotlib is not installed"
    assert all(line.startswith(no_plot) for line in before), error
    assert last.startswith(
        "tiltsmc: standard output was closed by its reader (broken pipe); the demo was done: wrote "
    ), error
    assert f"{out / 'demo.json'}" in last and f"{out / 'demo.txt'}" in last


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(("json_option", "prefix"), [([], ""), (["--json", "-"], "--json: ")])
def test_a_full_standard_output_names_json_only_where_it_was_given(
    json_option: list[str], prefix: str
) -> None:
    with open("/dev/full", "w") as full:
        completed = subprocess.run(
            [sys.executable, "-m", "tiltsmc.cli", *RUN, "--prompt", "hi", "-q", *json_option],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert completed.returncode == 1
    assert completed.stderr == f"tiltsmc: {prefix}cannot write standard output: No space left on device\n"


def test_prompts_from_standard_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--prompts -`` and ``--messages -`` read standard input, as a file of prompts is read (a byte-order
    mark and CRs dropped); errors name it; with standard input closed, the option says so."""
    import io

    from tiltsmc import cli

    def stdin(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))

    stdin("\ufeffone\r\n\ntwo\n".encode())
    out = tmp_path / "out.jsonl"
    assert main([*RUN, "--prompts", "-", "--json", str(out)]) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["one", "two"]
    capfd.readouterr()
    stdin(b"d\xe9j\xe0 vu\n")
    assert main([*RUN, "--prompts", "-"]) == 2
    assert "--prompts: standard input is not UTF-8 text (byte 0xe9 on line 1)" in one_line_error(capfd)
    stdin(b"\n \n")
    assert main([*RUN, "--prompts", "-"]) == 2
    assert "--prompts: standard input holds no prompt" in one_line_error(capfd)
    stdin(b'[{"role": "user", "content": "hi"}]\nnot json\n')
    assert main([*RUN, "--messages", "-"]) == 2
    assert "--messages: standard input line 2: " in one_line_error(capfd)
    monkeypatch.setattr(sys, "stdin", None)
    assert main([*RUN, "--prompts", "-"]) == 2
    assert "--prompts: -: standard input is closed" in one_line_error(capfd)
    dash = tmp_path / "-"  # a file named - in a folder is a file
    dash.write_text("from the file\n")
    assert cli._read_lines("--prompts", dash) == ["from the file"]


def test_a_chat_template_file_loses_its_byte_order_mark_and_is_read_within_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--chat-template`` is read as UTF-8 text without a leading byte-order mark (an editor's, which the
    template would otherwise write at the head of every prompt), and at most MAX_LINE_BYTES of it (1000
    here): --chat-template /dev/zero read until the memory ran out."""
    import argparse

    from tiltsmc import cli

    template = tmp_path / "template.jinja"
    template.write_bytes("\ufeff{{ messages[0]['content'] }}\ufeff".encode())
    assert cli._chat_template(argparse.Namespace(chat_template=str(template))) == (
        "{{ messages[0]['content'] }}\ufeff"
    )
    monkeypatch.setattr(cli, "MAX_LINE_BYTES", 1000)
    template.write_bytes(b"x" * 1001)
    with pytest.raises(ValueError, match=f"--chat-template: cannot read {template}: longer than 1000 bytes"):
        cli._chat_template(argparse.Namespace(chat_template=str(template)))
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="longer than 1000 bytes: not a chat template"):
            cli._chat_template(argparse.Namespace(chat_template="/dev/zero"))
    template.write_bytes(b"\xff{{ x }}")
    with pytest.raises(ValueError, match=r"--chat-template: cannot read .*can't decode byte 0xff"):
        cli._chat_template(argparse.Namespace(chat_template=str(template)))
