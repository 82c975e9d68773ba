"""`python -m cfgen ...` (what `accelerate launch -m cfgen` runs)."""

from cfgen.cli import main

main()
