"""`python -m sdsurgeon`: the same as the `sdsurgeon` command."""

from .cli import main

main()
