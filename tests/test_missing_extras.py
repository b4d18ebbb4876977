"""Without an optional extra, each front end says which extra to install, in one line, before any work.

"Without it" is a real import failure in a separate interpreter: ``sys.modules[name] = None`` (set by a
``sitecustomize`` module, or before the code run with ``-c``) makes ``import name`` raise
ModuleNotFoundError exactly as where the package is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiltsmc.serving import ray as serving_ray

SERVE_EXTRA = "pip install 'tiltsmc[serve,cpu]' (or serve,gpu)"
RAY_EXTRA = "pip install 'tiltsmc[ray,cpu]' (or ray,gpu)"


def _without(modules: list[str]) -> str:
    """Python code after which ``import`` of each of ``modules`` fails."""
    return "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in modules)


def _python(modules: list[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _without(modules) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _refusal(modules: list[str], call: str) -> str:
    """``type | message`` of the exception ``call`` raises without ``modules``."""
    done = _python(
        modules,
        f"""
        try:
            {call}
        except Exception as error:
            print(type(error).__name__, "|", error)
        else:
            print("no error")
        """,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("missing", ["fastapi", "prometheus_client", "pydantic"])
def test_create_app_without_the_serve_extra_names_it(missing: str) -> None:
    """The public ``create_app`` raised a bare ModuleNotFoundError (``No module named 'fastapi'``): an
    ImportError naming the extra, in the words ``tiltsmc serve`` uses."""
    call = "from tiltsmc.serving.server import create_app; create_app(None)"
    assert _refusal([missing], call) == f"ImportError | create_app needs the serve extra: {SERVE_EXTRA}"


def test_build_application_without_ray_names_the_extra() -> None:
    """``build_application`` did a bare ``import ray``: an ImportError that says how to get Ray Serve, as
    ``tiltsmc serve --ray`` says it (on this Python)."""
    call = (
        "from tiltsmc.serving.ray import ReplicaOptions, build_application; "
        "from tiltsmc.serving.server import Settings; build_application(ReplicaOptions({}, Settings()))"
    )
    if sys.version_info >= (3, 10):
        expected = f"build_application needs the ray extra: {RAY_EXTRA}"
    else:  # where the extra installs no Ray
        expected = serving_ray._missing_ray("build_application")
    assert _refusal(["ray"], call) == f"ImportError | {expected}"


@pytest.mark.parametrize("version", [(3, 9), (3, 9, 18, "final", 0)])
def test_without_ray_on_python_3_9_the_message_says_python_3_10(version: tuple[object, ...]) -> None:
    """On Python 3.9 the ray extra installs no Ray (Ray Serve >= 2.56 needs 3.10): the message said to
    install that extra, which could not help; it says which Python Ray Serve needs."""
    for what in ("--ray", "build_application"):
        message = serving_ray._missing_ray(what, version)  # type: ignore[arg-type]
        assert message.startswith(f"{what} needs Ray Serve >= 2.56, which needs Python >= 3.10"), message
        assert "this is Python 3.9" in message and "pip install" not in message, message


@pytest.mark.parametrize("version", [(3, 10), (3, 13, 1)])
def test_without_ray_from_python_3_10_the_message_names_the_extra(version: tuple[int, ...]) -> None:
    assert serving_ray._missing_ray("--ray", version) == f"--ray needs the ray extra: {RAY_EXTRA}"


def test_the_demo_without_onnxruntime_names_its_extra_in_one_line(tmp_path: Path) -> None:
    """``tiltsmc demo`` printed ``unexpected error: ImportError`` and named the ``cpu`` extra: one line
    naming ``tiltsmc[demo]``, status 1 as ``tiltsmc run`` without ONNX Runtime, before anything is written."""
    (tmp_path / "sitecustomize.py").write_text(_without(["onnxruntime"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "tiltsmc.cli", "demo", "--out", str(out), "--levels", "2", "--budgets", "2",
         "--problems", "1"],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr == (
        "tiltsmc: demo needs ONNX Runtime and none is installed: pip install 'tiltsmc[demo]'\n"
    ), done.stderr
    assert done.stdout == "" and not out.exists()


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_serve_without_its_extra_is_refused_before_the_models_load(missing: str, tmp_path: Path) -> None:
    """``tiltsmc serve`` found uvicorn missing only after it had loaded the models (seconds to minutes of
    a real model): refused first, naming the extra. The policy here does not exist: an error about it
    would mean the models were reached first."""
    absent = tmp_path / "no-such-policy"
    done = _python(
        [missing],
        f"""
        from tiltsmc.cli import main
        raise SystemExit(main(["serve", "--policy", {str(absent)!r}, "--reward", {str(absent)!r}]))
        """,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"tiltsmc: serve needs the serve extra: {SERVE_EXTRA}", done.stderr
