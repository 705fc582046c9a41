"""Entry point for ``python -m rba_core``."""

import sys

from rba_core.cli import main

sys.exit(main())
