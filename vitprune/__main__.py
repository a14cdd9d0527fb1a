"""``python -m vitprune`` is the ``vitprune`` command."""

from vitprune.cli.main import main

main()
