"""Tasks with exact answers (``docs/theory/test-bed.md``): the test bed of the samplers and diagnostics.

[`MarkovDFATask`][tiltsmc.tasks.MarkovDFATask] is a Markov base policy over a small vocabulary with a reward
computed by a finite automaton; ``V*``, ``Z``, the target's marginals and the Bellman error of any twist are
exact (dynamic programming in the log domain) for any horizon. It needs only NumPy. ``hard_instance`` builds
the paper's lower-bound construction (``docs/theory/tilted-target.md``) as such a task with its twist.
"""

from __future__ import annotations

from .hard_instance import HardInstance, hard_instance
from .markov_dfa import BellmanError, MarkovDFATask

__all__ = ["BellmanError", "HardInstance", "MarkovDFATask", "hard_instance"]
