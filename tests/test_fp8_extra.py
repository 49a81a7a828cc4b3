"""torchao is the fp8 extra: a run that does not ask for float8 never imports it, and one that asks
without it installed is refused in one line naming the extra, before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from olmo_fn.run import main

from outcomes import one_error_line


def test_a_run_without_fp8_never_imports_torchao(tmp_path):
    """train and bench in a fresh interpreter; torchao (installed here) stays out of sys.modules."""
    pytest.importorskip("torchao")  # otherwise the test could not fail
    code = f"""
import sys
from olmo_fn.run import main
common = ["--steps", "2"]
train = ["--schedule.warmup-steps", "1", "--threads", "1"]
assert main(["train", *common, *train, "--global-batch-size", "2", "--data.seq-len", "32",
             "--eval.interval", "0", "--run-dir", {str(tmp_path / "run")!r}]) == 0
assert main(["bench", *common, "--preset", "olmo2-tiny", "--seq-len", "32", "--micro-batch-size", "2",
             "--warmup", "1", "--compile", "off"]) == 0
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "torchao")
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fp8_without_torchao_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now fails, as if not installed
    for name in [m for m in sys.modules if m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    run_dir = tmp_path / "run"
    assert main(["train", "--fp8", "tensorwise", "--steps", "60", "--run-dir", str(run_dir)]) == 2
    assert "fp8=tensorwise needs torchao: pip install 'olmo_fn[fp8]'" in one_error_line(
        capsys.readouterr().err
    )
    assert not run_dir.exists()
    assert main(["bench", "--fp8", "rowwise", "--steps", "2"]) == 2
    assert "fp8=rowwise needs torchao: pip install 'olmo_fn[fp8]'" in one_error_line(capsys.readouterr().err)
