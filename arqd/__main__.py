"""``python -m arqd`` is the ``arqd`` command."""

from arqd.cli import main

main()
