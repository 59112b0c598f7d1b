"""``python -m nervus`` is the ``nervus`` command."""

from nervus.cli import main

main()
