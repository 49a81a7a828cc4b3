"""The README's commands stay true: CI runs its test command verbatim, and its notebook example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [
        ln
        for ln in (ROOT / ".ci/run").read_text().splitlines()
        if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_lines) == 1
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert ci_lines[0] in first_block.splitlines()
    assert "python -m olmo_fn.run train" in first_block


def test_notebook_example_runs():
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"## In a notebook\n+```python\n(.*?)```", readme, re.S)
    namespace: dict = {}
    exec(example, namespace)
    assert tuple(namespace["out"].shape) == (2, 64, namespace["cfg"].vocab_size)


def test_every_test_the_readme_names_exists():
    """A promise in the README names the test that proves it; that test must exist."""
    readme = (ROOT / "README.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", readme)
    assert len(named) >= 10
    for path, name in named:
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), (
            f"README names {path}::{name}, which does not exist"
        )
