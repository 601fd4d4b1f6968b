"""The tree stays formatted with the project's black and isort settings (pyproject.toml), as CI checks."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_black_and_isort_leave_the_tree_unchanged() -> None:
    for tool in (["black", "--check", "-q"], ["isort", "--check-only", "-q"]):
        result = subprocess.run([sys.executable, "-m", *tool, "scripts", "tests"], cwd=ROOT, capture_output=True,
                                text=True)  # fmt: skip
        assert result.returncode == 0, f"{tool[0]} would reformat:\n{result.stdout}{result.stderr}"
