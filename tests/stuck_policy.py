"""A policy whose step never returns, for the scripts (each in an interpreter of its own) that check that
an engine or a server does not wait for ever on a model call longer than any grace period.

A script starts with ``SCRIPT_HEAD``, which puts this folder on ``sys.path`` and imports ``Stuck`` and
``TASK`` from here."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tiltsmc.tasks import MarkovDFATask

TASK = MarkovDFATask.random(4, 3, 6, rng=0)

SCRIPT_HEAD = (
    f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom stuck_policy import TASK, Stuck\n"
)


class Stuck:
    """``TASK``'s policy, but its ``propose`` never returns: it sets ``entered`` (and with ``announce``
    prints "inside the step") and waits for ever. Every particle starts from the empty prompt."""

    token_level = True
    supports_engine = True

    def __init__(self, announce: bool = False) -> None:
        self.policy = TASK.policy()
        self.vocab_size = self.policy.vocab_size
        self.announce = announce
        self.entered = threading.Event()

    def start(self, prompts: Any, num_particles: int) -> Any:
        return self.policy.start([()] * len(prompts), num_particles)

    def propose(self, particles: Any, rng: Any) -> Any:
        self.entered.set()
        if self.announce:
            print("inside the step", flush=True)
        threading.Event().wait()  # never returns
