"""The README starts with two commands, the demo and the tests; CI runs exactly the second,
read from the README."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _block_after(heading: str) -> str:
    """The bash block that follows the README paragraph starting with `heading`."""
    readme = (REPO / "README.md").read_text()
    match = re.search(rf"^{re.escape(heading)}.*?^```bash\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    assert match, f"README.md: no bash block after '{heading}'"
    return match.group(1).strip()


def test_the_readme_commands_exist_and_ci_runs_the_test_command() -> None:
    demo, tests = _block_after("Run the demo"), _block_after("Run the tests")
    assert (demo, tests) == ("scripts/demo", "scripts/test")
    for command in (demo, tests):
        assert os.access(REPO / command, os.X_OK), f"{command} is not executable"

def test_ci_runs_the_readmes_test_command() -> None:
    """.ci/run reads the block under "Run the tests" from the README and runs it: the awk
    program it uses must find exactly that block."""
    ci = (REPO / ".ci" / "run").read_text()
    program = re.search(r"awk '([^']*)' README.md", ci)
    assert program, ".ci/run no longer reads the test command from README.md"
    found = subprocess.run(["awk", program.group(1), "README.md"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == _block_after("Run the tests")
    assert 'exec bash -euo pipefail -c "$command"' in ci
