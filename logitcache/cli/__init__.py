"""The `logitcache` command line: thin commands that parse, call the library and print.

`run_app` and `human_bytes` are shared with the `trainer` CLI; `main` imports the commands (and
with them typer's whole app) only when the command line is actually run.
"""

from logitcache.cli.common import human_bytes, run_app

__all__ = ["human_bytes", "main", "run_app"]


def main() -> None:
    from logitcache.cli.commands import main as run

    run()
