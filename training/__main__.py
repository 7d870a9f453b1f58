"""``python -m hbi_training``: the ``hbi-train`` command line."""

from hbi_training.cli import main

main()
