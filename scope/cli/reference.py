"""The CLI reference page (docs/cli.md), generated from the ``scope`` command itself.

``python -m scope.cli.reference > docs/cli.md`` rewrites it; a test checks that the committed page
matches the commands, so the reference never drifts from the code. It reads the assembled app, so
it sits above ``scope/cli/__init__.py`` (as ``python -m scope`` does); nothing in the app imports it.
"""

from __future__ import annotations

import typer

from scope.cli import app

HEADER = """# Command-line reference

Generated from the `scope` command by `python -m scope.cli.reference > docs/cli.md`; every
command also prints this with `--help`. Commands that compute figures print them as JSON with
`--json`. Bad input exits with status 2 and one line naming the bad value.
"""


def _section(cmd, path: list[str], depth: int) -> list[str]:
    ctx = cmd.make_context(" ".join(path), [], resilient_parsing=True)
    lines = [f"{'#' * min(depth, 4)} `{' '.join(path)}`", ""]
    if cmd.help:
        lines += [cmd.help.strip(), ""]
    subcommands = getattr(cmd, "commands", None)
    if subcommands:
        for name in sorted(subcommands):
            lines += _section(subcommands[name], [*path, name], depth + 1)
        return lines
    lines += ["```", " ".join([*path, *cmd.collect_usage_pieces(ctx)]), "```", ""]
    rows = []
    for param in cmd.params:
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, text = record
        text = (text or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{names}` | {text} |")
    if rows:
        lines += ["| argument / option | meaning |", "| --- | --- |", *rows, ""]
    return lines


def cli_markdown() -> str:
    """Markdown for every ``scope`` command and sub-command, with arguments, options and defaults."""
    root = typer.main.get_command(app)
    lines = [HEADER]
    for name in sorted(root.commands):
        lines += _section(root.commands[name], ["scope", name], 2)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(cli_markdown(), end="")
