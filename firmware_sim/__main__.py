"""``python -m firmware_sim``: see :mod:`firmware_sim.cli`."""

from .cli import main

raise SystemExit(main())
