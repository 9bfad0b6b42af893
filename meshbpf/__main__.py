"""`python -m meshbpf` is the `meshbpf` command."""

from .cli import main

main()
