"""`python -m moerge.cli`: the same as the `moerge` command."""

from moerge.cli.main import run

run()
