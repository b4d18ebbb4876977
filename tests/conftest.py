"""Shared fixtures. Markers (gpu, slow) are registered in pyproject.toml, not here."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def restore_num_threads() -> Iterator[Callable[[int], None]]:
    """Yield ``tiltsmc.core.set_num_threads`` and put the thread count back as it was afterwards.

    ``tiltsmc.core`` is imported here, not at module level, so collecting tests that do not need the
    compiled core (``test_tasks.py`` falls back to pure NumPy) still works when it is not built.
    """
    from tiltsmc import core

    saved = core.get_num_threads()
    yield core.set_num_threads
    core.set_num_threads(saved)
