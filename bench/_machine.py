"""The machine a benchmark ran on, recorded in every JSON result: one description for all of bench/."""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np


def load_average() -> Optional[tuple[float, float, float]]:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def build_stamp() -> Optional[str]:
    """The compiled core measured, with its modification time (it may be rebuilt between runs)."""
    module = sys.modules.get("tiltsmc._core")
    if module is None or not module.__file__:
        return None
    path = Path(module.__file__)
    return f"{path} ({time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(path.stat().st_mtime))})"


def git_commit() -> Optional[str]:
    """The commit measured (``+dirty`` with uncommitted changes): of the checkout the ``tiltsmc`` imported
    comes from (another tree's on ``PYTHONPATH``, to measure older code), else of this script's; None
    outside a git checkout."""
    import tiltsmc

    for where in (Path(tiltsmc.__file__).resolve().parent, Path(__file__).resolve().parent):
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        return head + ("+dirty" if dirty else "")
    return None


def machine_info(**extra: Any) -> dict[str, Any]:
    """Platform, CPU model (from /proc/cpuinfo), cores, versions, tiltsmc's threads and build, the commit
    measured, load."""
    cpu = platform.processor()
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    try:
        import tiltsmc

        version: Optional[str] = tiltsmc.__version__
        threads: Optional[int] = tiltsmc.core.get_num_threads()
    except ImportError:
        version, threads = None, None
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tiltsmc": version,
        "tiltsmc_num_threads": threads,
        "tiltsmc_build": build_stamp(),
        "git_commit": git_commit(),
        "loadavg": load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info.update(extra)
    return info


def model_run_record(benchmark: str, args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """The JSON of a benchmark of ONNX models: its name, the machine (with ONNX Runtime's version), its
    arguments (paths as text), then ``fields``."""
    import onnxruntime

    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {
        "benchmark": benchmark,
        "machine": machine_info(onnxruntime=onnxruntime.__version__),
        "args": arguments,
        **fields,
    }
