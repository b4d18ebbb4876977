"""``tiltsmc run --json PATH``: files written as users expect (atomic replacement that keeps the mode, hard
links and symbolic links; FIFOs, devices and standard output as streams), bad locations refused before any
model is loaded, and no temporary file left behind by a failure or a signal."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiltsmc import cli
from tiltsmc._files import create_beside
from tiltsmc.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = str(FIXTURES / "llama-tiny"), str(FIXTURES / "prm-tiny")
RUN = ["run", "--policy", POLICY, "--reward", REWARD, "--max-new-tokens", "3", "--particles", "2"]
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX files and signals")
not_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tiltsmc-" in p.name)


@contextlib.contextmanager
def reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``process``, killed and waited for on the way out where it is still running (after a failed
    assertion, a test leaves no run behind)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def prompts_of(text: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in text.splitlines()]


@posix_only
def test_a_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    out.chmod(0o640)
    before = out.stat()
    assert main([*RUN, "--prompt", "hi", "--prompt", "ab", "--json", str(out)]) == 0
    after = out.stat()
    assert prompts_of(out.read_text()) == ["hi", "ab"]
    assert stat.S_IMODE(after.st_mode) == 0o640  # mkstemp's 0600 before
    assert after.st_ino != before.st_ino  # renamed over it: readers of the old file keep the old content
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert leftovers(tmp_path) == []


@posix_only
def test_a_new_file_gets_the_umask_mode(tmp_path: Path) -> None:
    out = tmp_path / "new.jsonl"
    umask = os.umask(0o027)
    try:
        assert main([*RUN, "--prompt", "hi", "--json", str(out)]) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # 0666 & ~0027, as a shell's > creates it
    assert prompts_of(out.read_text()) == ["hi"] and leftovers(tmp_path) == []


@posix_only
def test_a_file_with_hard_links_is_rewritten_in_place(tmp_path: Path) -> None:
    out, other = tmp_path / "out.jsonl", tmp_path / "link.jsonl"
    out.write_text("old content, longer than nothing\n" * 50)
    out.chmod(0o604)
    os.link(out, other)
    inode = out.stat().st_ino
    assert main([*RUN, "--prompt", "hi", "--json", str(out)]) == 0
    assert out.stat().st_ino == inode and out.stat().st_nlink == 2
    assert other.read_text() == out.read_text() and prompts_of(out.read_text()) == ["hi"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o604 and leftovers(tmp_path) == []


@contextlib.contextmanager
def bind_mounted(source: Path, target: Path) -> Iterator[None]:
    """``source`` bind-mounted over ``target`` (Docker's ``-v host.jsonl:/out.jsonl``); skips where that
    cannot be done (not root, no ``mount``, a container without the right)."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a bind mount needs root and mount")
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount --bind failed: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_bind_mounted_file_is_rewritten_in_place(tmp_path: Path) -> None:
    # rename over a mount point fails (EBUSY): the lines are copied over its content instead
    host, out = tmp_path / "host.jsonl", tmp_path / "out.jsonl"
    host.write_text("old content, longer than nothing\n" * 50)
    out.write_text("old\n")
    with bind_mounted(host, out):
        assert main([*RUN, "--prompt", "hi", "--json", str(out)]) == 0
        assert prompts_of(out.read_text()) == ["hi"] and leftovers(tmp_path) == []
    assert prompts_of(host.read_text()) == ["hi"] and out.read_text() == "old\n"


@posix_only
def test_a_symbolic_link_stays_a_link_to_the_new_results(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.jsonl"
    target.write_text("old\n")
    target.chmod(0o644)
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    assert main([*RUN, "--prompt", "hi", "--json", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert prompts_of(target.read_text()) == ["hi"] and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(tmp_path) == leftovers(tmp_path / "real") == []


def test_a_failed_run_keeps_the_old_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A run that fails after the output is opened (a model file ONNX Runtime cannot load) leaves the old
    file as it was and no temporary file."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a model")
    assert main([*RUN[:2], str(bad), *RUN[3:], "--prompt", "hi", "--json", str(out)]) == 2
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []
    assert capfd.readouterr().err.count("\n") == 1


@posix_only
def test_a_file_the_run_reads_is_refused_as_its_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--json`` naming the prompts file, the chat template, or a file of a model's folder (by another path,
    or a hard link) is refused before anything is loaded, the file as it was (the results replaced it:
    status 0, the model folder broken)."""
    policy = tmp_path / "policy"
    shutil.copytree(POLICY, policy)
    prompts, template = tmp_path / "prompts.txt", tmp_path / "template.jinja"
    prompts.write_text("hi\n")
    template.write_text((FIXTURES / "chat-tiny" / "chat_template.jinja").read_text())
    os.link(policy / "tokenizer.json", tmp_path / "tokenizer-link.json")
    chat = ["--chat", "--chat-template", str(template)]
    for source, output, option in [
        (["--prompts", str(prompts)], prompts, "--prompts"),
        (["--prompts", str(prompts), *chat], template, "--chat-template"),
        (["--prompt", "hi"], policy / "model.onnx", "--policy"),
        (["--prompt", "hi"], tmp_path / "policy" / ".." / "policy" / "config.json", "--policy"),
        (["--prompt", "hi"], tmp_path / "tokenizer-link.json", "--policy"),
    ]:
        before = output.read_bytes()
        command = ["run", "--policy", str(policy), *RUN[3:], *source, "--json", str(output)]
        assert main(command) == 2
        err = capfd.readouterr().err
        assert err.startswith(f"tiltsmc: --json: {output} is a file {option} reads ("), err
        assert output.read_bytes() == before and leftovers(output.parent) == []


@posix_only
def test_a_fifo_is_streamed_to_its_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[str] = []

    def read() -> None:
        with open(fifo, encoding="utf-8") as handle:
            received.extend(handle)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = main([*RUN, "--prompt", "hi", "--prompt", "ab", "--batch-size", "1", "--json", str(fifo)])
    finally:
        if reader.is_alive() and stat.S_ISFIFO(os.stat(fifo).st_mode):
            reader.join(timeout=60)
    assert code == 0 and stat.S_ISFIFO(fifo.stat().st_mode)  # still a FIFO, not replaced by a file
    assert [json.loads(line)["prompt"] for line in received] == ["hi", "ab"]
    assert leftovers(tmp_path) == []


@posix_only
@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_character_device_is_written_not_replaced(capfd: pytest.CaptureFixture[str]) -> None:
    before = os.stat("/dev/null")
    assert main([*RUN, "--prompt", "hi", "--json", "/dev/null"]) == 0
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert "to /dev/null" in capfd.readouterr().err


@pytest.mark.parametrize("spec", ["-", "/dev/stdout"])
def test_standard_output(spec: str, capfd: pytest.CaptureFixture[str]) -> None:
    if spec != "-" and not Path(spec).exists():
        pytest.skip(f"no {spec}")
    assert main([*RUN, "--prompt", "hi", "--prompt", "ab", "--json", spec]) == 0
    assert prompts_of(capfd.readouterr().out) == ["hi", "ab"]


@posix_only
@pytest.mark.parametrize("spec", ["/dev/fd/0", "/proc/self/fd/0", "/dev/stdin"])
def test_standard_input_open_for_reading_is_refused_as_the_output(spec: str, tmp_path: Path) -> None:
    """``--json /dev/fd/0`` (standard input, opened for reading: here a file): refused before any model is
    loaded, status 2 (its first write failed with "Bad file descriptor", status 1, after the run);
    ``/dev/stdin`` likewise (it replaced the file given as standard input)."""
    if not Path(spec).exists():
        pytest.skip(f"no {spec}")
    given = tmp_path / "given.txt"
    given.write_text("keep\n")
    argv = [*RUN, "--prompt", "hi", "--json", spec]
    with given.open("rb") as stdin:
        completed = subprocess.run(
            [sys.executable, "-m", "tiltsmc.cli", *argv],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr == f"tiltsmc: --json: {spec} is standard input, which is not open for writing\n"
    assert given.read_text() == "keep\n" and completed.stdout == ""


def interrupted_at_batch(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """``tiltsmc run``'s batch ``batch`` (from 0) is interrupted by Ctrl-C; the ones before run."""
    sample = cli._sample
    started = []

    def sample_until(*args: object, **kwargs: object) -> object:
        started.append(True)
        if len(started) > batch:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "_sample", sample_until)


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_an_interrupted_run_says_what_it_left_on_standard_output(
    batch: int, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Results streamed to standard output before Ctrl-C stay there, and the last line says so (it said
    "no result file written" whatever had been written)."""
    interrupted_at_batch(monkeypatch, batch)
    argv = [*RUN, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "1", "-q"]
    assert main(argv) == 130
    out, err = capfd.readouterr()
    assert prompts_of(out) == ["a", "b", "c"][:batch]
    left = f"{batch} result line(s) already written" if batch else "nothing written"
    assert err == f"tiltsmc: interrupted; {left} to standard output\n"


def test_an_interrupted_run_writes_no_result_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    interrupted_at_batch(monkeypatch, 1)
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    argv = [*RUN, "--prompt", "a", "--prompt", "b", "--batch-size", "1", "-q", "--json", str(out)]
    assert main(argv) == 130
    assert capfd.readouterr().err == "tiltsmc: interrupted; no result file written\n"
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []


@posix_only
def test_a_signal_after_lines_were_streamed_says_so(tmp_path: Path) -> None:
    """SIGTERM after some result lines went to standard output: the last line counts them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {k}\n" for k in range(400)))
    command = [sys.executable, "-m", "tiltsmc.cli", *RUN, "--prompts", str(prompts), "--batch-size", "1"]
    with reaped(
        subprocess.Popen(
            [*command, "--max-new-tokens", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    ) as process:
        assert process.stdout is not None
        first = process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        rest, error = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM
    lines = [line for line in (first + rest).split("\n") if line.endswith("}")]  # whole lines
    assert prompts_of("\n".join(lines))[:1] == ["prompt 0"]
    # the count, or its range where the signal came while a batch was being written (the reader may have
    # got it in part): the reader got a whole line before the signal, and the count covers what it got
    last = re.fullmatch(
        r"tiltsmc: stopped by SIGTERM; (\d+)(?: to (\d+))? result line\(s\) (?:already )?written to "
        r"standard output(?: \(stopped while writing a batch\))?",
        error.splitlines()[-1],
    )
    assert last is not None, error
    low, high = int(last[1]), int(last[2] or last[1])
    assert high >= 1 and low <= len(lines) <= high, error


def test_an_interruption_while_a_batch_is_written_gives_the_range(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C inside the flush of the second batch: the reader may have got none, part or all of it, and
    the last line says so (it counted a batch only once its flush had returned, so a signal right after
    the flush said one line fewer than the reader had: "nothing written" after a whole line)."""

    class InterruptedFlush(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            if self.flushes == 2:
                raise KeyboardInterrupt

    stdout = InterruptedFlush()
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = [*RUN, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "1", "-q"]
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        "tiltsmc: interrupted; 1 to 2 result line(s) written to standard output (stopped while writing a "
        "batch)\n"
    )
    assert prompts_of(stdout.getvalue()) == ["a", "b"]


def test_a_directory_is_refused_before_any_model_is_loaded(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    missing_policy = str(tmp_path / "no-such-model")  # would fail too, but the output is checked first
    argv = ["run", "--policy", missing_policy, "--reward", REWARD, "--prompt", "hi", "--json", str(tmp_path)]
    assert main(argv) == 2
    assert capfd.readouterr().err == f"tiltsmc: --json: {tmp_path} is a directory\n"
    assert main([*argv[:-1], str(tmp_path / "absent" / "out.jsonl")]) == 2
    error = capfd.readouterr().err
    assert error.startswith("tiltsmc: --json: cannot create ") and error.endswith("does not exist\n")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_folder_where_no_file_can_be_created_is_refused_before_the_run(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """/proc takes no new files, even from root (for whom permission bits are no obstacle)."""
    argv = ["run", "--policy", "/nonexistent", "--reward", REWARD, "--prompt", "hi"]
    assert main([*argv, "--json", "/proc/tiltsmc-results.jsonl"]) == 2
    error = capfd.readouterr().err
    assert error.startswith("tiltsmc: --json: cannot ") and error.count("\n") == 1


@not_root
def test_unwritable_locations_are_refused_before_the_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    readonly = tmp_path / "readonly.jsonl"
    readonly.write_text("keep\n")
    readonly.chmod(0o444)
    argv = ["run", "--policy", "/nonexistent", "--reward", REWARD, "--prompt", "hi", "--json"]
    try:
        assert main([*argv, str(locked / "out.jsonl")]) == 2
        assert "is not writable" in capfd.readouterr().err
        assert main([*argv, str(readonly)]) == 2
        assert "not writable" in capfd.readouterr().err and readonly.read_text() == "keep\n"
    finally:
        locked.chmod(0o700)


# tiltsmc run in a process whose multiprocessing starts its processes through a fork server, as Python
# 3.14 does by default on Linux: a semaphore made there (tqdm's lock did) starts a resource tracker, which
# reports it on standard error as leaked when a signal stops the run.
FORKSERVER = (
    "import multiprocessing, sys; multiprocessing.set_start_method('forkserver'); "
    "from tiltsmc.cli import main; sys.exit(main(sys.argv[1:]))"
)


@posix_only
@pytest.mark.parametrize(
    ("signum", "start"),
    [
        (signal.SIGTERM, "-m"),
        (getattr(signal, "SIGHUP", signal.SIGTERM), "-m"),
        (signal.SIGTERM, "forkserver"),
    ],
)
def test_a_signal_mid_run_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, signum: int, start: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {k}\n" for k in range(400)))
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    launch = ["-m", "tiltsmc.cli"] if start == "-m" else ["-c", FORKSERVER]
    command = [sys.executable, *launch, *RUN, "--prompts", str(prompts), "--batch-size", "1"]
    with reaped(
        subprocess.Popen(
            [*command, "--max-new-tokens", "40", "--json", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    ) as process:
        deadline = time.monotonic() + 60
        while not leftovers(tmp_path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftovers(tmp_path), "the run never created its temporary file"
        time.sleep(1.0)  # the models load, sampling starts
        assert process.poll() is None, "the run ended before the signal"
        process.send_signal(signum)
        _, error = process.communicate(timeout=60)
    assert process.returncode == -signum  # ended by the signal, as the shell expects
    assert error == f"tiltsmc: stopped by {signal.Signals(signum).name}; no result file written\n"
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []


NOHUP = (
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "  # as nohup leaves it
    "from tiltsmc.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP")
def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    """Under ``nohup`` (SIGHUP ignored) the run goes on to write its results."""
    out = tmp_path / "out.jsonl"
    with reaped(
        subprocess.Popen(
            [sys.executable, "-c", NOHUP, *RUN, "--prompt", "hi", "--json", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    ) as process:
        deadline = time.monotonic() + 60
        while not leftovers(tmp_path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGHUP)
        _, error = process.communicate(timeout=60)
    assert process.returncode == 0, error
    assert prompts_of(out.read_text()) == ["hi"] and leftovers(tmp_path) == []


@posix_only
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the exception dropped
def test_a_signal_whose_exception_a_finalizer_swallowed_still_stops_the_run() -> None:
    """A terminating signal handled while a finalizer runs raises there, and Python prints and drops the
    exception: the run still stops before it writes results (``raise_if_signalled``)."""

    class Holder:
        pass

    with cli.signals_raise():
        cli.raise_if_signalled()  # nothing received yet
        holder = Holder()
        weakref.finalize(holder, signal.raise_signal, signal.SIGTERM)
        del holder  # the handler runs inside the finalizer: its Signalled is lost
        with pytest.raises(cli.Signalled) as raised:
            cli.raise_if_signalled()
        assert raised.value.signum == signal.SIGTERM
    with cli.signals_raise():  # a new run starts clean
        cli.raise_if_signalled()


# -- a signal after the results were written; hard links on a full disk; names the temporary file needs --


@pytest.mark.parametrize("where", ["as the commit ends", "while the summary is logged"])
def test_ctrl_c_after_the_file_was_written_says_the_run_was_done(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C once the results replaced the file (held back during the rename, it comes right after it;
    or while the summary is logged): the last line said "no result file written" (or "nothing written to
    FILE") though the file held every result."""
    if where == "as the commit ends":
        commit = cli.ResultOutput.commit

        def commit_then_interrupted(self: cli.ResultOutput) -> None:
            commit(self)
            raise KeyboardInterrupt

        monkeypatch.setattr(cli.ResultOutput, "commit", commit_then_interrupted)
    else:

        def summary_interrupted(readings: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(cli.OnlineBellman, "combine", staticmethod(summary_interrupted))
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert main([*RUN, "--prompt", "a", "--prompt", "b", "-q", "--json", str(out)]) == 130
    error = capfd.readouterr().err
    assert error == f"tiltsmc: interrupted; the run was done: 2 result line(s) written to {out}\n"
    assert prompts_of(out.read_text()) == ["a", "b"] and leftovers(tmp_path) == []


# SIGTERM sent by the run to itself as soon as its --json file is committed (a real signal, held back
# during the rename and delivered as that ends)
TERMINATED_AFTER_COMMIT = (
    "import os, signal, sys; from tiltsmc import cli; commit = cli.ResultOutput.commit\n"
    "def commit_then_terminated(self):\n"
    "    commit(self); os.kill(os.getpid(), signal.SIGTERM)\n"
    "cli.ResultOutput.commit = commit_then_terminated; sys.exit(cli.main(sys.argv[1:]))"
)


@posix_only
def test_a_signal_after_the_file_was_written_says_the_run_was_done(tmp_path: Path) -> None:
    """SIGTERM right after the commit still ends the run by SIGTERM, and its last line says the file
    holds the results (it said "no result file written")."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    completed = subprocess.run(
        [sys.executable, "-c", TERMINATED_AFTER_COMMIT, *RUN, "--prompt", "hi", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == -signal.SIGTERM
    last = completed.stderr.splitlines()[-1]
    assert last == f"tiltsmc: stopped by SIGTERM; the run was done: 1 result line(s) written to {out}"
    assert prompts_of(out.read_text()) == ["hi"] and leftovers(tmp_path) == []


def hard_linked(tmp_path: Path, content: str) -> tuple[Path, Path]:
    """A file holding ``content`` and a second hard link to it."""
    out, other = tmp_path / "out.jsonl", tmp_path / "link.jsonl"
    out.write_text(content)
    os.link(out, other)
    return out, other


@posix_only
@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="posix_fallocate")
def test_a_full_disk_is_found_before_a_file_with_hard_links_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The space of the new content is reserved before the file is rewritten in place: no room leaves it
    as it was, as exit status 1 promises (it was truncated, then written until the disk was full)."""
    out, other = hard_linked(tmp_path, "old\n")

    def no_space(descriptor: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    assert main([*RUN, "--prompt", "hi", "--json", str(out)]) == 1
    assert capfd.readouterr().err == f"tiltsmc: --json: cannot write {out}: No space left on device\n"
    assert out.read_text() == other.read_text() == "old\n" and leftovers(tmp_path) == []


# A file size limit of 100 bytes (as a full disk): the limit binds every file of the process, and the lines
# are spooled to a temporary file before the file is rewritten in place, so it is set as that starts (as
# signals are held back for it), or, with 'spool', from the start (the spool cannot be written).
# os.posix_fallocate removed with 'no-fallocate'.
SIZE_LIMITED = (
    "import os, resource, sys; from tiltsmc import cli; held_back = cli.signals_deferred\n"
    "def limited():\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); return held_back()\n"
    "cli.signals_deferred = limited\n"
    "if sys.argv[1] == 'spool': resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
    "if sys.argv[1] == 'no-fallocate': del os.posix_fallocate\n"
    "sys.exit(cli.main(sys.argv[2:]))"
)


@posix_only
@pytest.mark.parametrize("limited", ["posix_fallocate", "no-fallocate", "spool"])
def test_a_file_with_hard_links_that_cannot_grow(limited: str, tmp_path: Path) -> None:
    """A size limit (a real one, as a full disk): where the space can be reserved, the file keeps its
    content (it was cut to the first 100 bytes of the results); where it cannot, the error says that the
    file was partly rewritten (it said nothing of it); a spool that cannot be written leaves the file as
    it was, one line saying why (an unexpected error: its close in the cleanup raised again)."""
    if limited == "posix_fallocate" and not hasattr(os, "posix_fallocate"):
        pytest.skip("posix_fallocate")
    out, other = hard_linked(tmp_path, "old\n")
    completed = subprocess.run(
        [sys.executable, "-c", SIZE_LIMITED, limited, *RUN, "--prompt", "hi", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    if limited != "no-fallocate":
        assert completed.stderr == f"tiltsmc: --json: cannot write {out}: File too large\n"
        assert out.read_text() == "old\n"
    else:
        assert completed.stderr == (
            f"tiltsmc: --json: cannot write {out}: File too large; the file was partly rewritten (its space "
            "could not be reserved beforehand): its old content is lost\n"
        )
    assert other.read_text() == out.read_text() and leftovers(tmp_path) == []


@posix_only
def test_a_file_with_hard_links_longer_than_the_results_is_cut_to_them(tmp_path: Path) -> None:
    """Rewritten in place over the old content from its start (space reserved), then cut at the new end."""
    out, other = hard_linked(tmp_path, "old content\n" * 10_000)
    assert main([*RUN, "--prompt", "hi", "--json", str(out)]) == 0
    assert prompts_of(out.read_text()) == ["hi"] and other.read_text() == out.read_text()


@pytest.mark.parametrize("name", ["results/", "out.jsonl/"])
def test_a_path_ending_in_a_slash_is_refused_as_a_folder(
    name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--json PATH/`` names a folder, as a shell's ``>`` reads it: refused before any model is loaded (a
    regular file PATH was created, or replaced)."""
    existing = tmp_path / "out.jsonl"
    existing.write_text("keep\n")
    spec = f"{tmp_path}/{name}"
    argv = ["run", "--policy", str(tmp_path / "no-such-model"), "--reward", REWARD, "--prompt", "hi"]
    assert main([*argv, "--json", spec]) == 2
    assert capfd.readouterr().err == f"tiltsmc: --json: {spec} names a folder; give a file name\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"] and existing.read_text() == "keep\n"


def name_limit(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


@pytest.mark.parametrize("size", [237, 238, 255])
def test_a_file_name_of_up_to_255_bytes_is_written(size: int, tmp_path: Path) -> None:
    """The temporary file's name, 18 bytes longer than the file's, is cut to the longest name the file
    system takes (names of 238 to 255 bytes were refused, though a shell's > writes them), at a
    character's end."""
    if name_limit(tmp_path) < size:
        pytest.skip("the file system takes shorter names")
    name = "é" * (size // 2) + "n" * (size % 2)  # two bytes a character: a cut could split one
    out = tmp_path / name
    assert main([*RUN, "--prompt", "hi", "-q", "--json", str(out)]) == 0
    assert prompts_of(out.read_text()) == ["hi"] and [p.name for p in tmp_path.iterdir()] == [name]
    descriptor, temporary = create_beside(out)
    os.close(descriptor)
    assert len(os.fsencode(temporary.name)) <= name_limit(tmp_path) and temporary.parent == tmp_path
    assert temporary.name.startswith(".éé") and temporary.name.encode("utf-8")  # whole characters


@posix_only
def test_signals_are_held_back_while_deferred_though_other_threads_run() -> None:
    """A SIGTERM sent while signals are held back (a rename and its bookkeeping, a file rewritten in place)
    is handled after, though the main thread's blocking it only hands it to another thread (ONNX Runtime
    runs some): Python ran its handler in the main thread at once, inside the block (the file was renamed
    over the target and the run's last line said "no result file written")."""
    idle = threading.Event()
    other = threading.Thread(target=idle.wait)
    other.start()
    steps = []
    try:
        with cli.signals_raise(), pytest.raises(cli.Signalled):
            with cli.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # Python's handler runs at the next instructions, where it runs
                steps.append("held back")
            steps.append("not reached")
    finally:
        idle.set()
        other.join()
    assert steps == ["held back"]


def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (signals sent to it alone); its standard output."""
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@posix_only
def test_an_event_loops_signal_handler_hears_a_deferred_signal_once() -> None:
    """Under asyncio's ``add_signal_handler`` (its wakeup descriptor), a SIGTERM sent while signals are
    held back reaches the loop's handler once, after the block: the C handler told the loop at once and
    the signal raised again told it a second time (2 calls)."""
    output = _run_python(
        "import asyncio, os, signal\n"
        "from tiltsmc._files import signals_deferred\n"
        "async def main():\n"
        "    calls = []\n"
        "    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: calls.append(1))\n"
        "    with signals_deferred():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    await asyncio.sleep(0.3)\n"
        "    print(len(calls))\n"
        "asyncio.run(main())\n"
    )
    assert output.strip() == "1"


@posix_only
def test_every_handler_is_put_back_though_a_signal_interrupts_their_restoring() -> None:
    """A Ctrl-C that arrives just as SIGINT's own handler is put back raises KeyboardInterrupt out of the
    block; SIGTERM's handler is put back all the same and the SIGTERM held back is delivered (it stayed
    the recorder, and later SIGTERMs were swallowed)."""
    output = _run_python(
        "import os, signal, time\n"
        "from tiltsmc._files import signals_deferred\n"
        "seen = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: seen.append('TERM'))\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's, whatever an import set\n"
        "real = signal.signal\n"
        "def then_ctrl_c(signum, handler):\n"
        "    previous = real(signum, handler)\n"
        "    if signum == signal.SIGINT and handler is signal.default_int_handler:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return previous\n"
        "signal.signal = then_ctrl_c\n"
        "try:\n"
        "    with signals_deferred():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "except KeyboardInterrupt:\n"
        "    seen.append('INT')\n"
        "finally:\n"
        "    signal.signal = real\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.1)\n"
        "print(seen)\n"
    )
    assert output.strip() == "['TERM', 'INT', 'TERM']", output
