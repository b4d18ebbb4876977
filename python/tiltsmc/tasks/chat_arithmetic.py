r"""The arithmetic chains of ``tiltsmc.tasks.arithmetic`` posed to a chat model, one line per step.

A problem (a start value ``a_0`` and ``T`` operations ``±d``, every running value in ``[0, 99]``; made by
``tiltsmc.tasks.arithmetic.make_problems``) is asked in words as a user message, after one worked
example exchange that shows the form of an answer (a chat model's own way of learning a format)::

    user       Start with 57. Add 8, then subtract 3, then add 9. ...
    assistant  57 + 8 = 65
               65 - 3 = 62
               62 + 9 = 71

Line ``t`` is the ``t``-th *reasoning step*: ``a_{t-1} ± d_t = a_t``. With the policy's step delimiter
``"\n"`` a sampler's step is a line. ``check`` reads an answer line by line: the number of leading right lines
``k`` (step ``t`` is right when its line is exactly ``a_{t-1} ± d_t = a_t``, the operand being the true
running value, up to spaces: ASCII spaces, tabs and carriage returns, no other Unicode space), and whether the
answer is complete (``T`` right lines and nothing but blank lines after). A number must be written as
``solution`` writes it: ASCII decimal digits (as in ``tiltsmc.tasks.arithmetic``: fullwidth or Arabic-Indic
digits make a wrong line), no leading zeros, and a ``-`` only before a running value below 0 (so ``"057"`` and
``"-0"`` are wrong). Lines are compared as text, never converted to ints, so no answer, however long its
numbers, makes ``check`` raise. ``verify`` is
the exact terminal reward ``r``: 1 for a complete, right answer, else 0.

Error rates measured from samples of ``p`` (``bench/real_model.py``): the *per-step* error rate at step
``t`` is the hazard ``P(line t wrong | lines 1..t-1 right)`` (the first wrong line is ``t``), and the
*whole-answer* error rate is ``1 - E_p[r]``. Were the hazard a constant ``h``, ``E_p[r] = (1 - h)^T``
up to the format of the end.

This module needs only numpy; prompts are chat messages (``{"role", "content"}`` dicts)
rendered by the model's chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .arithmetic import MAX_STEPS, Problem, check_problem_count
from .arithmetic import make_problems as make_chains

__all__ = [
    "SIZES",
    "Check",
    "Problem",
    "check",
    "example",
    "examples",
    "make_problems",
    "messages",
    "problem_of",
    "right_so_far",
    "solution",
    "step_line",
    "user_message",
    "verify",
    "verify_chat",
]

# Problem sizes: "small" (start 1..9, operands 1..5, values in 0..20), "two-digit" (the bundled task's
# chains: start 10..89, operands 1..9, values in 0..99), both with mixed operations, and "counting" (start
# 1..15, one operand 1..5 added at every step: an arithmetic progression, asked as "Add d, T times", with
# two worked examples). SmolLM2-135M-Instruct loses track of mixed operations (most answers go wrong by the
# second line); counting is the size it gets mostly right line by line (bench/real_model.py).
SIZES: dict[str, dict[str, Any]] = {
    "small": {"start": (1, 9), "max_value": 20, "max_operand": 5, "repeated": False, "shots": 1},
    "two-digit": {"start": (10, 89), "max_value": 99, "max_operand": 9, "repeated": False, "shots": 1},
    "counting": {"start": (1, 15), "max_value": 99, "max_operand": 5, "repeated": True, "shots": 2},
}
MAX_COUNTING_STEPS = 16  # the largest start plus 16 steps of 5 stays within two digits
_EXAMPLE_SEED = 20_241_204  # the worked examples are fixed: prompts of one size and T differ in the question
# The spaces a line may have around its parts, and all a blank line may hold: ASCII space, tab and carriage
# return (a "\r\n" line end); \s and str.strip() would also take a no-break, ideographic or other space.
_SPACES = " \t\r"
# a step line "a ± d = c", spaces allowed around each part: the running values may be negative, the operand
# not; ASCII digits only (\d would take any script's), compared as text with the numbers solution() writes
_S = r"[ \t\r]*"
_LINE = re.compile(rf"^{_S}(-?[0-9]+){_S}([+-]){_S}([0-9]+){_S}={_S}(-?[0-9]+){_S}$")
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>")
_WORDS = {"+": "add", "-": "subtract"}


def _check_size(size: Any) -> dict[str, Any]:
    """``SIZES[size]``; TypeError for a ``size`` that is not a str, ValueError for an unknown one."""
    if not isinstance(size, str):
        raise TypeError(f"size: expected a str, one of {', '.join(SIZES)}; got {type(size).__name__}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    return SIZES[size]


def _check_problem(problem: Any) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a tiltsmc.tasks.arithmetic.Problem, got {type(problem).__name__}")
    return problem


def make_problems(num_steps: int, count: int, rng: Any = None, size: str = "small") -> list[Problem]:
    """``count`` random chains of ``num_steps`` operations of a given ``size`` (a key of ``SIZES``);
    ``rng`` is anything ``numpy.random.default_rng`` takes."""
    shape = _check_size(size)
    if not shape["repeated"]:
        return make_chains(
            num_steps,
            count,
            rng,
            start=shape["start"],
            max_value=shape["max_value"],
            max_operand=shape["max_operand"],
        )
    check_problem_count(num_steps, count, MAX_COUNTING_STEPS)
    try:
        generator = np.random.default_rng(rng)
    except (TypeError, ValueError) as error:
        raise type(error)(f"rng: cannot seed a generator from {rng!r:.40} ({error})") from None
    low, high = shape["start"]
    problems = []
    for _ in range(int(count)):
        start = int(generator.integers(low, high + 1))
        digit = int(generator.integers(1, shape["max_operand"] + 1))
        problems.append(Problem(start, (("+", digit),) * int(num_steps)))
    return problems


def examples(num_steps: int, size: str = "small") -> list[Problem]:
    """The worked examples shown before a question of ``num_steps`` steps (``SIZES[size]["shots"]`` of
    them): of the same length and size (a chat model copies the examples' number of lines), fixed, with
    different starts and first operations (a model shown one operand twice tends to copy it)."""
    shots = _check_size(size)["shots"]
    chosen: list[Problem] = []
    seed = _EXAMPLE_SEED
    while len(chosen) < shots:
        (candidate,) = make_problems(num_steps, 1, seed, size)
        seed += 1
        if all(
            candidate.start != shown.start and candidate.operations[0] != shown.operations[0]
            for shown in chosen
        ):
            chosen.append(candidate)
    return chosen


def example(num_steps: int, size: str = "small") -> Problem:
    """The first worked example shown before a question of ``num_steps`` steps (see ``examples``)."""
    return examples(num_steps, size)[0]


def step_line(before: int, sign: str, digit: int, after: int) -> str:
    """Step ``a_{t-1} ± d_t = a_t`` as a right answer writes it: ``"57 + 8 = 65"``."""
    return f"{before} {sign} {digit} = {after}"


def solution(problem: Problem) -> str:
    """The right answer: ``T`` lines joined by newlines."""
    values = _check_problem(problem).values
    return "\n".join(
        step_line(values[t], sign, digit, values[t + 1]) for t, (sign, digit) in enumerate(problem.operations)
    )


def user_message(problem: Problem) -> str:
    """The question in words, with the form of the answer. A chain that repeats one operation is asked
    as "Add d, T times"."""
    if not _check_problem(problem).operations:
        raise ValueError("problem: has no operations to ask for")
    operations = set(problem.operations)
    if len(operations) == 1 and problem.num_steps > 1:
        ((sign, digit),) = operations
        return (
            f"Start with {problem.start}. {_WORDS[sign].capitalize()} {digit}, {problem.num_steps} times. "
            f"Write one line per step, as 'a {sign} b = c', and nothing else."
        )
    steps = ", then ".join(f"{_WORDS[sign]} {digit}" for sign, digit in problem.operations)
    steps = steps[0].upper() + steps[1:]
    return (
        f"Start with {problem.start}. {steps}. Work it out one step per line, each line written as "
        "'a + b = c' or 'a - b = c', and write nothing else."
    )


def messages(problem: Problem, size: str = "small") -> list[dict[str, str]]:
    """The chat of a problem: the worked example exchanges (``examples`` of the problem's length and
    ``size``), then the question."""
    _check_problem(problem)
    _check_size(size)
    chat = []
    for shown in examples(problem.num_steps, size):
        chat += [
            {"role": "user", "content": user_message(shown)},
            {"role": "assistant", "content": solution(shown)},
        ]
    return [*chat, {"role": "user", "content": user_message(problem)}]


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
    text = text.rstrip(_SPACES + "\n")
    for token in _END_OF_TURN:
        if text.endswith(token):
            return text[: -len(token)]
    return text


def check(problem: Problem, text: str) -> Check:
    """Read an answer line by line against the exact running values (see the module docstring): a line
    is right when it is ``step_line``'s up to spaces. Any str is read (TypeError only for a ``text``
    that is not a str, or a ``problem`` that is not a ``Problem``)."""
    _check_problem(problem)
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    lines = [line for line in _strip_end(text).split("\n") if line.strip(_SPACES)]
    values = problem.values
    right = 0
    for t, (sign, digit) in enumerate(problem.operations):
        if t >= len(lines):
            break
        match = _LINE.match(lines[t])
        # as text: the numbers as solution() writes them (no leading zeros, no "-0", ASCII digits), and
        # no int() of a number of thousands of digits (which raises)
        if match is None or match.groups() != (str(values[t]), sign, str(digit), str(values[t + 1])):
            break
        right += 1
    return Check(problem.num_steps, right, right == problem.num_steps and len(lines) == problem.num_steps)


def right_so_far(problem: Problem, text: str, ended: bool = False) -> float:
    """The label of a prefix for a value model: 1.0 when every line of ``text`` is the right line of
    ``problem`` so far (and, once ``ended``, the answer is complete: ``verify``), else 0.0."""
    if ended:
        return verify(problem, text)
    checked = check(problem, text)
    lines = [line for line in _strip_end(text).split("\n") if line.strip(_SPACES)]
    return float(len(lines) <= problem.num_steps and checked.right_steps == len(lines))


def verify(problem: Union[Problem, Any], text: str) -> float:
    """The exact terminal reward ``r``: 1.0 for a complete, right answer (every line right, nothing
    else), else 0.0, for any str ``text`` (TypeError only for a ``text`` that is not a str)."""
    return 1.0 if check(problem, text).complete else 0.0


# numbers of at most 6 digits (the task's are of 1 or 2; int() refuses a string of thousands of digits)
_QUESTION = re.compile(r"^Start with ([0-9]{1,6})\. (.*?)\. (?:Write|Work) ")
_REPEATED = re.compile(r"^(Add|Subtract) ([0-9]{1,6}), ([0-9]{1,6}) times$")
_OPERATION = re.compile(r"^(add|subtract) ([0-9]{1,6})$")


def problem_of(question: str) -> Problem:
    """The problem a question of ``user_message`` poses (its inverse); ValueError for any other text,
    among which a repeated operation asked fewer than 2 or more than ``MAX_STEPS`` times and a chain of
    more than ``MAX_STEPS`` operations (``user_message`` writes neither)."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected a str, got {type(question).__name__}")
    match = _QUESTION.match(question)
    if match is None:
        raise ValueError(f"question: not a question of this task: {question[:60]!r}")
    signs = {"add": "+", "subtract": "-"}
    repeated = _REPEATED.match(match[2])
    if repeated is not None:
        times = int(repeated[3])
        if not 2 <= times <= MAX_STEPS:
            raise ValueError(f"question: expected an operation repeated 2..{MAX_STEPS} times, got {times}")
        operation = (signs[repeated[1].lower()], int(repeated[2]))
        return Problem(int(match[1]), (operation,) * times)
    parts = match[2].split(", then ")
    if len(parts) > MAX_STEPS:
        raise ValueError(f"question: expected at most {MAX_STEPS} operations, got {len(parts)}")
    operations = []
    for part in parts:
        found = _OPERATION.match(part.lower())
        if found is None:
            raise ValueError(f"question: cannot read the operation {part[:40]!r}")
        operations.append((signs[found[1]], int(found[2])))
    return Problem(int(match[1]), tuple(operations))


def verify_chat(prompt: Any, text: str) -> float:
    """``verify`` as a reward model's ``verifier(prompt, text)``: the problem read from the chat's last
    user message (``messages``' question)."""
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict):
        raise TypeError(
            "prompt: expected the chat messages of a problem (tiltsmc.tasks.chat_arithmetic.messages)"
        )
    return verify(problem_of(str(prompt[-1].get("content", ""))), text)
