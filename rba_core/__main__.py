"""Entry point for ``python -m rba_core`` (the ``rba`` console script is the same)."""

from rba_core.cli import main_exit

main_exit()
