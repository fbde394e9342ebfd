"""`python -m qdylora.cli ...` is `qdylora ...`."""

from . import main

main()
