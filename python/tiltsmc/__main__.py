"""``python -m tiltsmc``: the ``tiltsmc`` command (:func:`tiltsmc.cli.main`)."""

from .cli import main

raise SystemExit(main())
