"""The README shows the snippets the integration tests run, word for word."""
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SNIPPETS = sorted((ROOT / "docs" / "snippets").glob("*.py"))


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_readme_shows_the_tested_snippet(snippet):
    assert snippet.read_text().strip() in (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("pip install torch==2.13.0")]
    assert len(commands) == 2 and commands[0].endswith("lowbit accuracy") and "python -m pytest" in commands[1]
    assert "grep -m1 -E '^pip install .*python -m pytest' README.md" in (ROOT / ".ci" / "run").read_text()
