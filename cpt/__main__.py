"""`python -m cpt ...` is the same as the `cpt` console script."""

from cpt.cli import main

main()
