r"""The arithmetic chains of ``tiltsmc.tasks.arithmetic`` posed to a chat model, one line per step.

A problem (a start value ``a_0`` and ``T`` operations ``±d``, every running value in ``[0, 99]``; made by
``tiltsmc.tasks.arithmetic.make_problems``) is asked in words as a user message, after one worked
example exchange that shows the form of an answer (a chat model's own way of learning a format)::

    user       Start with 57. Add 8, then subtract 3, then add 9. ...
    assistant  57 + 8 = 65
               65 - 3 = 62
               62 + 9 = 71

Line ``t`` is the ``t``-th *reasoning step*: ``a_{t-1} ± d_t = a_t``. With the policy's step delimiter
``"\n"`` a sampler's step is a line. ``check`` reads an answer line by line: the number of leading
right lines ``k`` (step ``t`` is right when its line is exactly ``a_{t-1} ± d_t = a_t``, the operand being
the true running value, up to spaces), and whether the answer is complete (``T`` right lines and nothing
but blank lines after). ``verify`` is the exact terminal reward ``r``: 1 for a complete, right
answer, else 0.

Error rates measured from samples of ``p`` (``bench/real_model.py``): the *per-step* error rate at step
``t`` is the hazard ``P(line t wrong | lines 1..t-1 right)`` (the first wrong line is ``t``), and the
*whole-answer* error rate is ``1 - E_p[r]``. Were the hazard a constant ``h``, ``E_p[r] = (1 - h)^T``
up to the format of the end.

This module needs only the standard library; prompts are chat messages (``{"role", "content"}`` dicts)
rendered by the model's chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from .arithmetic import Problem
from .arithmetic import make_problems as make_chains

__all__ = [
    "SIZES",
    "Check",
    "Problem",
    "check",
    "example",
    "make_problems",
    "messages",
    "solution",
    "step_line",
    "user_message",
    "verify",
]

# Problem sizes: "small" (start 1..9, operands 1..5, values in 0..20: a 135M chat model gets most single
# steps right) and "two-digit" (the bundled task's chains: start 10..89, operands 1..9, values in 0..99).
SIZES: dict[str, dict[str, Any]] = {
    "small": {"start": (1, 9), "max_value": 20, "max_operand": 5},
    "two-digit": {"start": (10, 89), "max_value": 99, "max_operand": 9},
}
_EXAMPLE_SEED = 20_241_204  # the worked examples are fixed: prompts of one size and T differ in the question
_LINE = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>")
_WORDS = {"+": "add", "-": "subtract"}


def make_problems(num_steps: int, count: int, rng: Any = None, size: str = "small") -> list[Problem]:
    """``count`` random chains of ``num_steps`` operations of a given ``size`` (a key of ``SIZES``);
    ``rng`` is anything ``numpy.random.default_rng`` takes."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    return make_chains(num_steps, count, rng, **SIZES[size])


def example(num_steps: int, size: str = "small") -> Problem:
    """The worked example shown before a question of ``num_steps`` steps: one of the same length and size
    (a chat model copies the example's number of lines), fixed."""
    return make_problems(num_steps, 1, _EXAMPLE_SEED, size)[0]


def step_line(before: int, sign: str, digit: int, after: int) -> str:
    """Step ``a_{t-1} ± d_t = a_t`` as a right answer writes it: ``"57 + 8 = 65"``."""
    return f"{before} {sign} {digit} = {after}"


def solution(problem: Problem) -> str:
    """The right answer: ``T`` lines joined by newlines."""
    values = problem.values
    return "\n".join(
        step_line(values[t], sign, digit, values[t + 1]) for t, (sign, digit) in enumerate(problem.operations)
    )


def user_message(problem: Problem) -> str:
    """The question in words, with the form of the answer."""
    steps = ", then ".join(f"{_WORDS[sign]} {digit}" for sign, digit in problem.operations)
    steps = steps[0].upper() + steps[1:]
    return (
        f"Start with {problem.start}. {steps}. Work it out one step per line, each line written as "
        "'a + b = c' or 'a - b = c', and write nothing else."
    )


def messages(problem: Problem, size: str = "small") -> list[dict[str, str]]:
    """The chat of a problem: the worked example exchange (``example`` of the problem's length and
    ``size``), then the question."""
    shown = example(problem.num_steps, size)
    return [
        {"role": "user", "content": user_message(shown)},
        {"role": "assistant", "content": solution(shown)},
        {"role": "user", "content": user_message(problem)},
    ]


@dataclass(frozen=True)
class Check:
    """What ``check`` read: ``right_steps`` leading right lines of ``num_steps``; ``complete`` when
    all ``num_steps`` are right and nothing but blank lines follows them."""

    num_steps: int
    right_steps: int
    complete: bool

    @property
    def first_error(self) -> Optional[int]:
        """The first wrong step (1-based), or None when every step is right (the end may still be
        wrong: extra text after the last line)."""
        return None if self.right_steps == self.num_steps else self.right_steps + 1


def _strip_end(text: str) -> str:
    """``text`` without a trailing end-of-turn token (decoded with special tokens, a finished answer ends
    with one)."""
    text = text.rstrip()
    for token in _END_OF_TURN:
        if text.endswith(token):
            return text[: -len(token)]
    return text


def check(problem: Problem, text: str) -> Check:
    """Read an answer line by line against the exact running values (see the module docstring)."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a tiltsmc.tasks.arithmetic.Problem, got {type(problem).__name__}")
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    lines = [line for line in _strip_end(text).split("\n") if line.strip()]
    values = problem.values
    right = 0
    for t, (sign, digit) in enumerate(problem.operations):
        if t >= len(lines):
            break
        match = _LINE.match(lines[t])
        if match is None or (int(match[1]), match[2], int(match[3]), int(match[4])) != (
            values[t],
            sign,
            digit,
            values[t + 1],
        ):
            break
        right += 1
    return Check(problem.num_steps, right, right == problem.num_steps and len(lines) == problem.num_steps)


def verify(problem: Union[Problem, Any], text: str) -> float:
    """The exact terminal reward ``r``: 1.0 for a complete, right answer (every line right, nothing
    else), else 0.0."""
    return 1.0 if check(problem, text).complete else 0.0
