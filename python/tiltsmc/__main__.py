"""``python -m tiltsmc``: the ``tiltsmc`` command (``tiltsmc.cli.main``)."""

from .cli import main

raise SystemExit(main())
