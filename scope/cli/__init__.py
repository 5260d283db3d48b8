"""The ``scope`` command, assembled here from one module per command group.

Imports run one way: the command modules import ``common`` (options, the error wrapper, output) and the
library, this module imports the command modules, and nothing in the app imports this module (only the
entry points: the console script, ``python -m scope`` and the reference page, reference.py).
Every command that computes figures prints them as JSON with ``--json``.
"""

from __future__ import annotations

import typer

from scope.cli import analyze, dashboard, features, interop, steer, store, train

app = typer.Typer(help="scope: mechanistic interpretability for Gemma-family models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

# `scope --help` lists the commands in this order, then the groups in theirs.
app.command()(store.hooks)
app.command()(store.cache)
app.command()(train.train)
app.command()(train.quickstart)
app.command("eval")(train.eval_)
app.command()(train.finetune)
app.command("features")(features.features)
app.command()(interop.push)
app.command()(interop.pull)
app.add_typer(store.store_app, name="store")
app.add_typer(interop.import_app, name="import")
app.add_typer(interop.export_app, name="export")
app.add_typer(analyze.analyze_app, name="analyze")
app.add_typer(dashboard.dashboard_app, name="dashboard")
app.add_typer(steer.steer_app, name="steer")


def main() -> None:  # pragma: no cover - console entry for `python -m scope` and `python -m scope.cli`
    """Run the ``scope`` command."""
    app(prog_name="scope")
