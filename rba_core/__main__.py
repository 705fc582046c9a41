"""Entry point for ``python -m rba_core`` (the ``rba`` console script is the same)."""

import sys

from rba_core.cli import main

sys.exit(main())
