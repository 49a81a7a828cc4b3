"""Fault injection for tests: stop a training run right after a chosen update."""

from __future__ import annotations

from collections.abc import Callable


def stop_after_step(train_module, step: int, action: Callable[[], None], setattr=setattr) -> None:
    """Patch ``train_module.make_train_step`` so that `action` runs right after update `step`.

    `action` raises (KeyboardInterrupt, as on Ctrl-C) or kills the process (SIGKILL); pass
    ``monkeypatch.setattr`` as `setattr` to have the patch undone after the test.
    """
    make = train_module.make_train_step

    def make_stopping(*args):
        step_fn = make(*args)

        def stopping(state, batch):
            state, metrics = step_fn(state, batch)
            if state.step == step:
                action()
            return state, metrics

        return stopping

    setattr(train_module, "make_train_step", make_stopping)
