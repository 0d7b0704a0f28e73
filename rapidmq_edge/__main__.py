"""Allow ``python -m rapidmq_edge`` as an alias for the ``rapidmq-edge`` command."""

from rapidmq_edge.cli import main

raise SystemExit(main())
