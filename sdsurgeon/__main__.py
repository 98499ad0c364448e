"""`python -m sdsurgeon`: the same as the `sdsurgeon` command."""

# The current folder that `python -m` puts first on sys.path is gone already: the package's
# __init__ drops it before torch is imported, and main() checks again.
from .cli import main

main()
