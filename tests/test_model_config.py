"""Model configuration checked when a model is loaded: the errors name the file (or argument) and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = FIXTURES / "llama-tiny", FIXTURES / "prm-tiny"


@pytest.mark.parametrize(
    ("providers", "error", "message"),
    [
        (["CUDAExecutonProvider"], ValueError, "'CUDAExecutonProvider' is not a provider ONNX Runtime knows"),
        (["DmlExecutionProvider", "CPUExecutionProvider"], ValueError, "not in this ONNX Runtime build"),
        ("CPUExecutionProvider", TypeError, "expected a list of provider names"),
        ([], ValueError, "expected at least one provider"),
        ([("CPUExecutionProvider", "threads")], TypeError, "a provider name or a \\(name, options\\) pair"),
    ],
)
def test_unknown_providers_are_refused_not_replaced_by_the_cpu(
    providers: object, error: type[Exception], message: str
) -> None:
    """ONNX Runtime itself only warns (a banner, or a UserWarning) and runs on the CPU."""
    with pytest.raises(error, match=f"^providers: .*{message}"):
        OnnxCausalLM(POLICY, providers=providers)  # type: ignore[arg-type]
    with pytest.raises(error, match=f"^providers: .*{message}"):
        OnnxRewardModel(REWARD, providers=providers)  # type: ignore[arg-type]


def test_known_providers_load() -> None:
    policy = OnnxCausalLM(POLICY, providers=[("CPUExecutionProvider", {})])
    assert policy.session.get_providers() == ["CPUExecutionProvider"]
    reward = OnnxRewardModel(REWARD, providers=("CPUExecutionProvider",))
    assert reward.session.get_providers() == ["CPUExecutionProvider"]
