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
    "MAX_OPERAND",
    "MAX_PROBLEMS",
    "MAX_STEPS",
    "MAX_VALUE",
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
MAX_VALUE = 99  # running values are written with two digits
MAX_OPERAND = 9  # operands with one
MAX_PROBLEMS = 100_000  # make_problems' largest count (the demo's --problems cap)
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
        """The bundled task's prompt, ``"57 a+8 b-3 c+9\\n"``: at most ``MAX_STEPS`` labelled operations
        (ValueError for more: they have no label)."""
        if len(self.operations) > MAX_STEPS:
            raise ValueError(
                f"operations: the prompt labels at most {MAX_STEPS} operations, got {len(self.operations)}"
            )
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
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index: expected an int, got {type(index).__name__}")
    if not 0 <= index < MAX_STEPS:
        raise ValueError(f"index: expected 0..{MAX_STEPS - 1} (the steps with a label), got {index}")
    return f"{LABELS[index]}:{before:02d}{sign}{digit}={after:02d}"


def _check_int(value: Any, name: str, low: int, high: Optional[int] = None) -> int:
    """An int (Python or NumPy, not a bool) in ``low..high``: TypeError for another type, ValueError for a
    value out of range, each naming the argument. (This module imports nothing of tiltsmc: the training
    script loads it by path.)"""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r:.40}")
    if value < low or (high is not None and value > high):
        wanted = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
        raise ValueError(f"{name}: expected {wanted}, got {value!r}")
    return int(value)


def check_problem_count(num_steps: Any, count: Any, max_steps: int) -> None:
    """Refuse a ``num_steps`` outside ``1..max_steps`` or a ``count`` outside ``1..MAX_PROBLEMS``
    (100,000, the demo's cap), naming the argument (TypeError for a value that is not an int, ValueError
    for one out of range)."""
    _check_int(num_steps, "num_steps", 1, max_steps)
    _check_int(count, "count", 1, MAX_PROBLEMS)


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
    ``rng`` is anything ``numpy.random.default_rng`` takes. ``count`` is in ``1..MAX_PROBLEMS``
    (100,000) and ``num_steps`` in ``1..MAX_STEPS``.

    The start value is uniform in ``start`` (inclusive), operands in ``1..max_operand``, and every running
    value stays in ``[0, max_value]`` (the defaults are the bundled task's two-digit chains; smaller ones
    make easier problems for other models, e.g. ``tiltsmc.tasks.chat_arithmetic``). The prompt and the
    solution write values with two digits and operands with one, so ``max_operand`` is in
    ``1..MAX_OPERAND`` (9) and ``max_value`` in ``max_operand..MAX_VALUE`` (99): every problem made here is
    read back by ``verify`` and ``parse_answer``. ``start`` is a pair of ints ``(low, high)`` with
    ``0 <= low <= high <= max_value``. Each is refused otherwise, naming it (TypeError for a wrong type,
    ValueError for a wrong value)."""
    check_problem_count(num_steps, count, MAX_STEPS)
    max_operand = _check_int(max_operand, "max_operand", 1, MAX_OPERAND)
    max_value = _check_int(max_value, "max_value", max_operand, MAX_VALUE)
    if isinstance(start, (str, bytes)) or not isinstance(start, (tuple, list)):
        raise TypeError(f"start: expected a pair of ints (low, high), got {type(start).__name__}")
    if len(start) != 2:
        raise ValueError(f"start: expected a pair of ints (low, high), got {len(start)} values {start!r}")
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in start):
        raise TypeError(f"start: expected a pair of ints (low, high), got {start!r}")
    low, high = int(start[0]), int(start[1])
    if not 0 <= low <= high <= max_value:
        raise ValueError(f"start: expected 0 <= low <= high <= max_value ({max_value}), got {start!r}")
    try:
        generator = np.random.default_rng(rng)
    except (TypeError, ValueError) as error:
        raise type(error)(f"rng: cannot seed a generator from {rng!r:.40} ({error})") from None
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
    """The result of the last complete line of a solution (``...=NN``), or None if there is none. A
    trailing ``<eos>`` (text decoded with special tokens) is dropped first, as ``verify`` drops it."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    text = text.removesuffix("<eos>")
    lines = [line for line in text.strip("\n").split("\n") if line]
    if not lines:
        return None
    _, equals, result = lines[-1].rpartition("=")
    if not equals or not _is_digits(result, 2):
        return None
    return int(result)


def _is_digits(text: str, length: int) -> bool:
    """``text`` is ``length`` ASCII digits (``str.isdigit`` also takes ``"²"``, which ``int`` refuses)."""
    return len(text) == length and all(c in "0123456789" for c in text)


def _problem_from_prompt(prompt: str) -> Problem:
    """The problem of a prompt of this task: its form read (``_parse_prompt``) and its running values
    checked (``_check_values``); ValueError naming ``prompt`` otherwise."""
    problem = _parse_prompt(prompt)
    _check_values(problem)
    return problem


def _parse_prompt(prompt: str) -> Problem:
    """The problem a prompt writes (its form only: a two-digit start, labelled one-digit operations)."""
    head, *ops = prompt.strip("\n").split(" ")
    if not _is_digits(head, 2) or not ops:
        raise ValueError(f"prompt: not an arithmetic-chain prompt: {prompt!r:.200}")
    if len(ops) > MAX_STEPS:
        raise ValueError(
            f"prompt: not an arithmetic-chain prompt: {len(ops)} operations (at most {MAX_STEPS}): "
            f"{prompt!r:.200}"
        )
    operations = []
    for t, op in enumerate(ops):
        if len(op) != 3 or op[0] != LABELS[t] or op[1] not in "+-" or not _is_digits(op[2], 1):
            raise ValueError(f"prompt: operation {t + 1} is malformed in {prompt!r:.200}")
        operations.append((op[1], int(op[2])))
    return Problem(int(head), tuple(operations))


def _check_values(problem: Problem) -> None:
    """Refuse (ValueError naming ``prompt``) a problem whose running values leave ``0..MAX_VALUE``: this
    task's solutions write each with two digits, and ``make_problems`` keeps every one in range."""
    for t, value in enumerate(problem.values):
        if not 0 <= value <= MAX_VALUE:
            where = "the start" if t == 0 else f"the running value after operation {t}"
            raise ValueError(
                f"prompt: not a problem of this task: {where} is {value}, outside 0..{MAX_VALUE} "
                f"(every running value has two digits): {problem.prompt!r:.200}"
            )


def _parsed_or_none(prompt: str) -> Optional[Problem]:
    try:
        return _parse_prompt(prompt)
    except ValueError:
        return None


def verify(prompt: Union[str, Problem], text: str) -> float:
    """The terminal reward ``r``: 1.0 when every line is a right step and so the answer is right, else 0.0.

    The working is checked, not only the answer: two slips that cancel (a forgotten carry, then a
    forgotten borrow) give the right number from a wrong solution, and score 0.

    Raises:
        TypeError: ``prompt`` is not a str or a ``Problem``, or ``text`` not a str.
        ValueError: ``prompt`` is not a prompt of this task (``"prompt: ..."``; e.g. no operations or more
            than ``MAX_STEPS``, a start or a running value outside 0 to ``MAX_VALUE`` (99), given as a str
            or as a ``Problem``).
    """
    if not isinstance(prompt, (str, Problem)):
        raise TypeError(f"prompt: expected a str or a Problem, got {type(prompt).__name__}")
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    if isinstance(prompt, Problem):
        problem = prompt
        # the same rule as for a str: a Problem is one of this task's when its prompt reads back as it
        if not problem.operations:
            raise ValueError("prompt: not a problem of this task: no operations (at least 1)")
        if len(problem.operations) > MAX_STEPS:
            raise ValueError(
                f"prompt: not a problem of this task: {len(problem.operations)} operations "
                f"(at most {MAX_STEPS}, the steps with a label)"
            )
        if _parsed_or_none(problem.prompt) != problem:
            raise ValueError(
                f"prompt: not a problem of this task: {problem!r:.200} (a start of 0 to 99 and operations "
                "('+' or '-', 0 to 9))"
            )
        _check_values(problem)
    else:
        problem = _problem_from_prompt(prompt)
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
