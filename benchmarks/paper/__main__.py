"""``python -m benchmarks.paper``: see ``benchmarks.paper.suite``."""

from benchmarks.paper.suite import main

raise SystemExit(main())
