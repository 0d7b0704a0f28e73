"""``python -m rapidmq_edge.cli``."""

from .main import main

raise SystemExit(main())
