"""``python -m trainkit``: the same as the ``trainkit`` command."""

from trainkit.cli import main

main()
