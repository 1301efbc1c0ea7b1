"""``python -m models``: the same as the ``seqmixers`` command."""

import sys

from models.cli import main

sys.exit(main())
