"""Packaging: ONNX Runtime comes from an extra (``cpu`` or ``gpu``), never from the base install, and a
model load without it says which extra to install.

"Without it" is a real import failure in a separate interpreter: ``sys.modules["onnxruntime"] = None``
(set by a ``sitecustomize`` module for the CLI) makes ``import onnxruntime`` raise ModuleNotFoundError
exactly as where the package is not installed."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

FIXTURES = Path(__file__).parent / "fixtures" / "models"
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
NO_RUNTIME = "import sys\nsys.modules['onnxruntime'] = None  # import onnxruntime now fails\n"


def _python(code: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_RUNTIME + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


def _names_both_extras(message: str) -> None:
    assert "tiltsmc[cpu]" in message and "tiltsmc[gpu]" in message, message
    assert "onnxruntime-gpu" in message, message


@pytest.mark.parametrize(
    "load",
    [
        f"from tiltsmc.models import OnnxCausalLM\nOnnxCausalLM({str(FIXTURES / 'llama-tiny')!r})",
        f"from tiltsmc.models import OnnxRewardModel\nOnnxRewardModel({str(FIXTURES / 'prm-tiny')!r})",
        "from tiltsmc.tasks import arithmetic\narithmetic.load_models()",
    ],
    ids=["OnnxCausalLM", "OnnxRewardModel", "demo-models"],
)
def test_a_model_load_without_onnxruntime_names_the_extras(load: str) -> None:
    code = (
        "import tiltsmc\ntry:\n"
        + textwrap.indent(load, "    ")
        + textwrap.dedent(
            """
        except ImportError as error:
            print(type(error).__name__, error.name, "|", error)
        else:
            print("loaded")
        """
        )
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ImportError onnxruntime | "), done.stdout
    _names_both_extras(done.stdout)


def test_the_core_and_the_exact_tasks_work_without_onnxruntime() -> None:
    done = _python(
        """
        import numpy as np
        import tiltsmc
        from tiltsmc.tasks import MarkovDFATask

        task = MarkovDFATask.random(3, 2, 4, rng=0)
        result = tiltsmc.smc(task.policy(), task.twist(), prompts=[()] * 2, num_particles=8, rng=0)
        print(result.log_z.shape, np.isfinite(result.log_z).all())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2,) True", done.stdout


def test_the_cli_without_onnxruntime_says_which_extra_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_RUNTIME)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "tiltsmc.cli", "run", "--policy", str(FIXTURES / "llama-tiny"),
         "--reward", str(FIXTURES / "prm-tiny"), "--prompt", "2+2=", "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiltsmc: tiltsmc needs ONNX Runtime"), done.stderr
    _names_both_extras(lines[0])
    assert done.stdout == ""


def _requirements() -> dict[str, list[Requirement]]:
    """The installed distribution's requirements by extra ('' for the base install)."""
    by_extra: dict[str, list[Requirement]] = {}
    for line in importlib.metadata.requires("tiltsmc") or []:
        requirement = Requirement(line)
        extras = [
            extra
            for extra in importlib.metadata.metadata("tiltsmc").get_all("Provides-Extra") or []
            if requirement.marker is not None and requirement.marker.evaluate({"extra": extra})
        ]
        if requirement.marker is None or not extras:
            by_extra.setdefault("", []).append(requirement)
        for extra in extras:
            by_extra.setdefault(extra, []).append(requirement)
    return by_extra


def test_the_runtime_comes_from_one_extra_only() -> None:
    """optimum's convention: no runtime in the base install, ``cpu`` -> onnxruntime, ``gpu`` ->
    onnxruntime-gpu; the extras that run models themselves bring the CPU build; the server extras bring
    none (paired with ``cpu`` or ``gpu``); no extra brings both builds."""
    by_extra = _requirements()
    runtimes = {extra: {r.name for r in reqs} & RUNTIMES for extra, reqs in by_extra.items()}
    assert runtimes.get("", set()) == set(), by_extra.get("")
    assert runtimes["cpu"] == {"onnxruntime"} and runtimes["gpu"] == {"onnxruntime-gpu"}
    for extra in ("demo", "test", "dev", "bench"):
        assert runtimes[extra] == {"onnxruntime"}, extra
    for extra in ("serve", "ray"):
        assert runtimes[extra] == set(), extra


def test_project_metadata_urls_and_licence() -> None:
    metadata = importlib.metadata.metadata("tiltsmc")
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL") or [])
    assert set(urls) >= {"Homepage", "Source", "Issues", "Documentation"}, urls
    assert all(url.startswith("https://github.com/tiltsmc/tiltsmc") for url in urls.values()), urls
    licence = Path(__file__).parents[1] / "LICENSE"
    assert licence.read_text().startswith("MIT License")
    assert metadata["License"] == "MIT" or metadata["License-Expression"] == "MIT"
    assert "License :: OSI Approved :: MIT License" in (metadata.get_all("Classifier") or [])
