"""Loading a model runs no program and reads no file outside the model's folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "models"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell scripts as the fake programs")
def test_loading_models_runs_no_program_found_through_path(tmp_path: Path) -> None:
    """ctypes.util.find_library runs ldconfig, gcc, cc and ld found through PATH: fakes placed first on
    PATH record whether anything ran while both models load, CUDA is probed and a run samples."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    ran = tmp_path / "ran.txt"
    for name in ("gcc", "cc", "ld", "ldconfig", "x86_64-linux-gnu-gcc", "objdump", "nvidia-smi"):
        script = fakes / name
        script.write_text(f"#!/bin/sh\necho {name} >> '{ran}'\nexit 1\n")
        script.chmod(0o755)
    code = textwrap.dedent(
        f"""
        import numpy as np, tiltsmc
        from tiltsmc import core
        from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
        from tiltsmc.models._ort import cuda_device_usable
        cuda_device_usable()
        core.cuda_available()
        policy = OnnxCausalLM({str(FIXTURES / "llama-tiny")!r}, max_new_tokens=2)
        reward = OnnxRewardModel({str(FIXTURES / "prm-tiny")!r}, kind="logit")
        tiltsmc.smc(policy, reward, ["ab"], num_particles=2, rng=np.random.default_rng(0))
        """
    )
    environment = {**os.environ, "PATH": f"{fakes}{os.pathsep}{os.environ.get('PATH', '')}"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert not ran.exists(), f"programs ran while loading: {ran.read_text().split()}"
