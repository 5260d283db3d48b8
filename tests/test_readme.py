"""The README opens with exactly the two commands, and CI runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    first, second = readme_commands()
    assert first.endswith("scope quickstart") and second.endswith("pytest")
    assert second in (ROOT / ".ci" / "run").read_text().splitlines()
