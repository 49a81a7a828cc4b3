"""What a test checks after running a command: the error it printed, and whether a directory changed."""

from __future__ import annotations

from pathlib import Path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, to compare before and after a refused command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    """The stderr of a command refused before it did anything: exactly one ``error:`` line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def last_error_line(err: str) -> str:
    """The stderr of a command that printed progress before failing: one ``error:`` line, the last."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if line.startswith("error: ")] == lines[-1:], (
        err
    )
    return lines[-1]
