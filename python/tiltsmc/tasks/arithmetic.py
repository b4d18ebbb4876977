r"""The bundled reasoning task: a chain of additions and subtractions, solved one line per step.

A problem is a start value ``a_0`` in ``[10, 89]`` and ``T`` labelled operations ``±d`` (``d`` in 1..9)
chosen so that every running value ``a_t = a_{t-1} ± d_t`` stays in ``[0, 99]``. The prompt lists them; a
solution writes one line per operation, each a *reasoning step*, two-digit numbers throughout:

    prompt     "57 a+8 b-3 c+9\n"
    solution   "a:57+8=65\n"  "b:65-3=62\n"  "c:62+9=71"   then <eos>

The answer is the last line's result; [`verify`][tiltsmc.tasks.arithmetic.verify] is the exact terminal reward
``r`` (1 when every line is right, so the answer is ``a_T``; else 0). The bundled policy (trained by
``scripts/train_demo.py``) makes mistakes like a person: it forgets carries and borrows more often than it
slips on a plain step, so the chance that a whole solution is right falls geometrically with ``T``. So
``V*_t`` (the chance of a right solution from a prefix) is ``0`` after a mistake and the product of the
remaining steps' success chances before one.

This module needs only the standard library and NumPy (the training script imports it by path);
[`load_models`][tiltsmc.tasks.arithmetic.load_models] builds the ONNX Runtime policy and process reward model
shipped in ``tiltsmc/tasks/arithmetic_models``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

if TYPE_CHECKING:
    from ..models.onnx_lm import OnnxCausalLM
    from ..models.protocols import RewardModel

__all__ = [
    "LABELS",
    "MAX_STEPS",
    "MODELS_DIR",
    "VOCAB",
    "Problem",
    "check_problem_count",
    "format_line",
    "load_models",
    "make_problems",
    "parse_answer",
    "verify",
]

MAX_STEPS = 16
LABELS = "abcdefghijklmnop"  # step t is labelled LABELS[t - 1]
# One token per character; <pad> 0, <eos> 1, <unk> 2 (the tokenizer needs one; it never occurs).
VOCAB: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<unk>",
    *"0123456789",
    "+",
    "-",
    "=",
    ":",
    " ",
    "\n",
    *LABELS,
)
PAD_ID, EOS_ID = 0, 1
MODELS_DIR = Path(__file__).with_name("arithmetic_models")


@dataclass(frozen=True)
class Problem:
    """A start value and ``T`` operations ``(sign, digit)``; ``values[t]`` is the exact running value."""

    start: int
    operations: tuple[tuple[str, int], ...]

    @property
    def num_steps(self) -> int:
        return len(self.operations)

    @property
    def values(self) -> tuple[int, ...]:
        running = [self.start]
        for sign, digit in self.operations:
            running.append(running[-1] + digit if sign == "+" else running[-1] - digit)
        return tuple(running)

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def prompt(self) -> str:
        ops = " ".join(f"{LABELS[t]}{sign}{digit}" for t, (sign, digit) in enumerate(self.operations))
        return f"{self.start:02d} {ops}\n"

    def solution(self) -> str:
        """The correct solution text (lines joined by newlines; no end-of-sequence token)."""
        values = self.values
        return "\n".join(
            format_line(t, values[t], sign, digit, values[t + 1])
            for t, (sign, digit) in enumerate(self.operations)
        )


def format_line(index: int, before: int, sign: str, digit: int, after: int) -> str:
    """Step ``index + 1`` as written by a solver: ``"{label}:{before}{sign}{digit}={after}"``."""
    return f"{LABELS[index]}:{before:02d}{sign}{digit}={after:02d}"


def check_problem_count(num_steps: Any, count: Any, max_steps: int) -> None:
    """Refuse a ``num_steps`` outside ``1..max_steps`` or a ``count`` below 1, naming the argument."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps: expected an int, got {type(num_steps).__name__}")
    if not 1 <= num_steps <= max_steps:
        raise ValueError(f"num_steps: expected 1..{max_steps}, got {num_steps}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count: expected an int >= 1, got {count!r}")


def make_problems(
    num_steps: int,
    count: int,
    rng: Any = None,
    *,
    start: tuple[int, int] = (10, 89),
    max_value: int = 99,
    max_operand: int = 9,
) -> list[Problem]:
    """``count`` random problems of ``num_steps`` operations (uniform over the allowed ones at each step);
    ``rng`` is anything ``numpy.random.default_rng`` takes.

    The start value is uniform in ``start`` (inclusive), operands in ``1..max_operand``, and every running
    value stays in ``[0, max_value]`` (the defaults are the bundled task's two-digit chains; smaller ones
    make easier problems for other models, e.g. ``tiltsmc.tasks.chat_arithmetic``)."""
    check_problem_count(num_steps, count, MAX_STEPS)
    if isinstance(max_operand, bool) or not isinstance(max_operand, (int, np.integer)) or max_operand < 1:
        raise ValueError(f"max_operand: expected an int >= 1, got {max_operand!r}")
    if isinstance(max_value, bool) or not isinstance(max_value, (int, np.integer)) or max_value < max_operand:
        raise ValueError(f"max_value: expected an int >= max_operand ({max_operand}), got {max_value!r}")
    low, high = (int(v) for v in start)
    if not 0 <= low <= high <= max_value:
        raise ValueError(f"start: expected 0 <= low <= high <= max_value ({max_value}), got {start!r}")
    generator = np.random.default_rng(rng)
    problems = []
    for _ in range(int(count)):
        value = int(generator.integers(low, high + 1))
        first, operations = value, []
        for _ in range(int(num_steps)):
            allowed = [("+", d) for d in range(1, max_operand + 1) if value + d <= max_value]
            allowed += [("-", d) for d in range(1, max_operand + 1) if value - d >= 0]
            sign, digit = allowed[int(generator.integers(len(allowed)))]
            operations.append((sign, digit))
            value = value + digit if sign == "+" else value - digit
        problems.append(Problem(first, tuple(operations)))
    return problems


def parse_answer(text: str) -> Optional[int]:
    """The result of the last complete line of a solution (``...=NN``), or None if there is none."""
    lines = [line for line in text.strip("\n").split("\n") if line]
    if not lines:
        return None
    _, equals, result = lines[-1].rpartition("=")
    if not equals or len(result) != 2 or not result.isdigit():
        return None
    return int(result)


def _problem_from_prompt(prompt: str) -> Problem:
    head, *ops = prompt.strip("\n").split(" ")
    if len(head) != 2 or not head.isdigit() or not ops:
        raise ValueError(f"prompt: not an arithmetic-chain prompt: {prompt!r}")
    operations = []
    for t, op in enumerate(ops):
        if len(op) != 3 or op[0] != LABELS[t] or op[1] not in "+-" or not op[2].isdigit():
            raise ValueError(f"prompt: operation {t + 1} is malformed in {prompt!r}")
        operations.append((op[1], int(op[2])))
    return Problem(int(head), tuple(operations))


def verify(prompt: Union[str, Problem], text: str) -> float:
    """The terminal reward ``r``: 1.0 when every line is a right step and so the answer is right, else 0.0.

    The working is checked, not only the answer: two slips that cancel (a forgotten carry, then a
    forgotten borrow) give the right number from a wrong solution, and score 0.
    """
    problem = prompt if isinstance(prompt, Problem) else _problem_from_prompt(prompt)
    text = text.removesuffix("<eos>")  # present when decoded with special tokens (skip_special_tokens=False)
    return 1.0 if text.strip("\n") == problem.solution() else 0.0


def load_models(
    models_dir: Union[str, os.PathLike[str], None] = None,
    *,
    intra_op_num_threads: Optional[int] = None,
    providers: Optional[Any] = None,
    memory_arena: bool = True,
    joint: bool = True,
    gqa: Optional[bool] = None,
) -> tuple[OnnxCausalLM, RewardModel]:
    """The bundled policy (a step is one line) and process reward model (``log Vh`` = log-sigmoid of its
    logit at a prefix's last token; the exact [`verify`][tiltsmc.tasks.arithmetic.verify] at the end).

    The reward model is the policy's frozen decoder with a logistic head trained on the policy's own
    rollouts (Monte Carlo outcome targets); its error feature is whether written tokens differ from the
    policy's most likely ones (see ``scripts/train_demo.py``). With ``joint`` (the default) both come from
    one graph (``joint/``: the policy's with the head in it), so a step runs the trunk once: the policy
    is loaded with ``value_output="value"`` and the reward is a
    ``tiltsmc.models.joint.PolicyValue`` reading it; else the separate ``policy/`` and ``prm/``
    (the reward an ``tiltsmc.models.onnx_reward.OnnxRewardModel`` re-encoding every prefix). Both
    give the same values (to float rounding) and samples. With ``gqa`` (and ``joint``), the joint graph in
    ONNX Runtime's GroupQueryAttention layout (``joint-gqa/``, the same weights): its rows right-padded and
    its KV cache written in place, the same values to float rounding and so, but for a rare draw that
    rounding tips, the same samples; a step 1.3 - 1.4x faster on a 2-core CPU. ``gqa=None`` (the default)
    takes it where the session runs on the CPU (where the cache is written in place), the optimum layout
    where it runs on CUDA."""
    from ..models._ort import picks_cuda
    from ..models.joint import PolicyValue
    from ..models.onnx_lm import OnnxCausalLM
    from ..models.onnx_reward import OnnxRewardModel

    folder = Path(models_dir) if models_dir is not None else MODELS_DIR
    if gqa and not joint:
        raise ValueError("gqa: the GroupQueryAttention layout is the joint graph's (joint=True)")
    if gqa is None:
        gqa = joint and not picks_cuda(providers)
    joint_name = "joint-gqa" if gqa else "joint"
    for name in (joint_name,) if joint else ("policy", "prm"):
        if not (folder / name / "model.onnx").is_file():
            raise FileNotFoundError(
                f"models_dir: {folder / name / 'model.onnx'} is missing (scripts/train_demo.py writes it)"
            )
    policy = OnnxCausalLM(
        folder / (joint_name if joint else "policy"),
        max_new_tokens=10 * MAX_STEPS + 2,
        step="\n",
        providers=providers,
        intra_op_num_threads=intra_op_num_threads,
        memory_arena=memory_arena,
        value_output="value" if joint else None,
    )
    if joint:
        return policy, PolicyValue(policy, kind="logit", verifier=verify)
    reward = OnnxRewardModel(
        folder / "prm",
        kind="logit",
        position="last",
        verifier=verify,
        providers=providers,
        intra_op_num_threads=intra_op_num_threads,
        pad_token_id=PAD_ID,
        memory_arena=memory_arena,
    )
    return policy, reward
