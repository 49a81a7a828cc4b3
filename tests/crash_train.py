"""Run `python -m olmo_fn.run train ...` and SIGKILL the process at a chosen moment (a test helper).

python tests/crash_train.py after-step K  -- train ARGS...   # killed right after step K's update
python tests/crash_train.py hang-after-step K -- train ARGS... # stops answering after step K (a hung rank)
python tests/crash_train.py in-save K     -- train ARGS...   # killed while checkpoint step K is
                                                             # written: DCP files on disk, no
                                                             # manifest, not renamed into place

Under torchrun (``torchrun ... tests/crash_train.py after-step K -- train ...``), CRASH_RANK=R in
the environment kills only rank R; the others go on until the launcher stops them.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def die() -> None:
    if os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def hang() -> None:
    if os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        time.sleep(3600)


def main() -> None:
    mode, when, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: crash_train.py MODE K -- ARGS"
    when = int(when)

    import olmo_fn.state.checkpoint as checkpoint
    import olmo_fn.train as train

    from faults import stop_after_step

    if mode == "after-step":
        stop_after_step(train, when, die)
    elif mode == "hang-after-step":
        stop_after_step(train, when, hang)
    elif mode == "in-save":
        write_manifest = checkpoint.write_manifest

        def killing_write_manifest(directory, manifest):
            if manifest["step"] == when:
                die()
            write_manifest(directory, manifest)

        checkpoint.write_manifest = killing_write_manifest
    else:
        raise SystemExit(f"unknown mode {mode}")

    from olmo_fn.run import main as run_main

    sys.exit(run_main(args))


if __name__ == "__main__":
    main()
