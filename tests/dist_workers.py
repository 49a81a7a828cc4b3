"""Worker functions for multi-process tests (importable by spawned gloo processes)."""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.checkpoint import load_checkpoint, save_checkpoint
from olmo_fn.state.train_state import TrainState, empty_train_state, init_train_state

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=24, vocab_size=31)


def full_state() -> TrainState:
    """The same state on every process: seeded params, seeded non-zero moments, counters."""
    state = init_train_state(CFG, seed=5, device="cpu", config={"k": 1}, config_fingerprint="f")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for t in flatten(state.opt_state).values():
            t.copy_(torch.rand(t.shape, generator=gen))
    return TrainState(17, state.params, state.opt_state, 68, 4352, state.config, "f")


def shard(state: TrainState, mesh) -> TrainState:
    """Every leaf as a DTensor sharded on dim 0 (uneven where the size is odd)."""

    def place(t):
        return distribute_tensor(t.detach(), mesh, [Shard(0)]).requires_grad_(t.requires_grad)

    return TrainState(
        state.step,
        state.params.apply(place),
        state.opt_state.apply(place),
        state.data_cursor,
        state.tokens_seen,
        state.config,
        state.config_fingerprint,
    )


def _init(rank: int, world: int, store: Path):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def _finish_together() -> None:
    """Every rank reaches the end before any tears the group down (a rank whose peer already closed
    its gloo connections can abort at exit)."""
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))


def _as_rank(body):
    """A spawnable worker: join the gloo group, run ``body(rank, world, mesh, directory)``, meet the
    others at the end; any failure is written to ``errors/rank{N}`` for the test to report."""

    def worker(rank: int, world: int, store: Path, directory: Path, errors: Path) -> None:
        try:
            mesh = _init(rank, world, store)
            body(rank, world, mesh, directory)
            _finish_together()
        except BaseException:
            (errors / f"rank{rank}").write_text(traceback.format_exc())
        finally:
            # Leave without tearing the gloo group down: its threads can abort the process at exit
            # (SIGABRT, "terminate called without an active exception", seen once in ~30 runs under
            # load), after every collective has finished. The outcome is already in errors/.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    worker.__name__ = worker.__qualname__ = body.__name__.lstrip("_")  # spawn pickles it by name
    return worker


def _save_sharded(rank, world, mesh, directory):
    save_checkpoint(directory, shard(full_state(), mesh))


def _load_sharded(rank, world, mesh, directory):
    """Load into sharded templates and check each local shard against the full tensors."""
    template = shard(empty_train_state(CFG, device="cpu"), mesh)
    loaded = load_checkpoint(directory, template)
    expected = full_state()
    assert (loaded.step, loaded.data_cursor, loaded.tokens_seen) == (17, 68, 4352)
    got = flatten(loaded.params) | {f"opt.{k}": v for k, v in flatten(loaded.opt_state).items()}
    want = flatten(expected.params) | {f"opt.{k}": v for k, v in flatten(expected.opt_state).items()}
    for key, value in got.items():
        local = value.to_local()
        rows = torch.tensor_split(want[key].detach(), world, dim=0)[rank]
        assert torch.equal(local, rows), key
        assert torch.equal(value.full_tensor(), want[key].detach()), key


def _load_damaged(rank, world, mesh, directory):
    """Each rank hashes a share of the files; every rank must raise the error naming the damaged one."""
    from olmo_fn.errors import CheckpointError

    template = shard(empty_train_state(CFG, device="cpu"), mesh)
    try:
        load_checkpoint(directory, template)
    except CheckpointError as exc:
        assert "__1_0.distcp: checksum mismatch" in str(exc), str(exc)
    else:
        raise AssertionError("a damaged checkpoint loaded")


save_sharded = _as_rank(_save_sharded)
load_sharded = _as_rank(_load_sharded)
load_damaged = _as_rank(_load_damaged)
