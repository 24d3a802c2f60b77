"""The `logitcache` command: dump, info, stats, verify, merge, ensemble, export. Thin: parse flags, call
the library, print. Every CACHE argument is a directory or a URL (s3://, gs://, az://,
memory://).

The commands live by job: `logitcache.cli.dump` (write a cache), `logitcache.cli.inspect`
(info, stats, verify: read one), `logitcache.cli.share` (merge, ensemble, export: make one from others);
this module gathers them into the app, in the order `--help` lists them.
"""

from __future__ import annotations

import typer

from logitcache.cli.common import run_app
from logitcache.cli.dump import dump
from logitcache.cli.inspect import info, stats, verify
from logitcache.cli.share import ensemble, export, merge

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Run a teacher once, cache its soft targets, and inspect caches.",
)
for command in (dump, info, stats, verify, merge, ensemble, export):
    app.command()(command)


def main() -> None:
    run_app(app, "logitcache")


if __name__ == "__main__":
    main()
