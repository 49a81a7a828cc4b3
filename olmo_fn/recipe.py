"""Recipes: Python files that build a config, used with ``--config FILE.py`` or run on their own.

A recipe file defines ``config()`` (no arguments) returning a `TrainConfig` (or, for a model ladder,
a `LadderConfig`) and usually ends with::

    if __name__ == "__main__":
        sys.exit(recipe_main(config))

so that ``python experiments/olmo2_1b.py --help`` lists every option with the recipe's values as the
defaults, and ``python experiments/olmo2_1b.py --steps 10`` trains with one of them changed. The same
file is a template for the library's command line: ``python -m olmo_fn.run train --config
experiments/olmo2_1b.py`` starts from ``config()``, and flags override it (TrainConfig recipes).

Recipes are self-contained on purpose: each writes out every number it takes from a published run
(optimizer, schedule, batch, clipping, ...) next to its source, so a reader can check and copy one
file; the tests check each against its own published table rather than sharing a helper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import tyro

from olmo_fn.config import TrainConfig, config_from_json
from olmo_fn.errors import ConfigError, OlmoFnError, one_line
from olmo_fn.graph.flops import params_text
from olmo_fn.graph.presets import get_preset
from olmo_fn.init_from import with_init_source
from olmo_fn.ladder import LadderConfig, plan_rungs

RECIPE_FUNCTION = "config"
"""The function a Python config file must define: ``config() -> TrainConfig`` (or LadderConfig)."""
RecipeConfig = TrainConfig | LadderConfig
"""What a recipe's ``config()`` may return."""


def config_from_file(path: str | Path) -> TrainConfig:
    """The TrainConfig a ``--config`` file holds: a ``.py`` recipe's ``config()``, else JSON."""
    return load_recipe(path) if Path(path).suffix == ".py" else config_from_json(path)


def load_recipe(path: str | Path, kind: type = TrainConfig) -> RecipeConfig:
    """Import the Python file at `path` as a module of its own and return its ``config()``.

    Every failure is a one-line ConfigError naming the file: missing, failing to import, without a
    ``config`` function, or returning something other than a `kind`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    name = f"olmo_fn_recipe_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses defined in the file look their module up here
    try:
        spec.loader.exec_module(module)
    except OlmoFnError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{path}: importing it failed: {one_line(exc)}") from exc
    build = getattr(module, RECIPE_FUNCTION, None)
    if not callable(build):
        raise ConfigError(
            f"{path}: a Python config file must define {RECIPE_FUNCTION}() -> TrainConfig "
            "(see the recipes in experiments/)"
        )
    try:
        cfg = build()
    except OlmoFnError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{path}: {RECIPE_FUNCTION}() failed: {one_line(exc)}") from exc
    if not isinstance(cfg, kind):
        hint = f"; run it on its own: python {path}" if isinstance(cfg, RecipeConfig) else ""
        raise ConfigError(
            f"{path}: {RECIPE_FUNCTION}() returned {type(cfg).__name__}, not a {kind.__name__}{hint}"
        )
    return cfg


def describe_run(cfg: TrainConfig) -> str:
    """What training `cfg` does, in a few lines: model, tokens, optimizer and schedule, data."""
    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    optim, schedule = cfg.optim, cfg.schedule
    decay = "constant" if schedule.decay == "constant" else f"{schedule.decay} to {schedule.min_lr_ratio:g} x"
    data = ", ".join(cfg.data.paths) or (
        f"{len(cfg.data.sources)} mixed sources" if cfg.data.sources else "the embedded stdlib corpus"
    )
    micro = f", micro-batch {cfg.micro_batch_size}" if cfg.micro_batch_size else ""
    spike = f", skip spikes over {cfg.spike.sigmas:g} sigma" if cfg.spike.sigmas else ""
    start = f"from the weights of {cfg.init_from}, " if cfg.init_from else ""
    return "\n".join(
        [
            f"model     {start}{cfg.preset}: {params_text(cfg.model)}, d_model "
            f"{cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads",
            f"tokens    {cfg.steps:,} steps x {cfg.global_batch_size} x {cfg.data.seq_len} = "
            f"{tokens_per_step:,} per step, {_short(cfg.steps * tokens_per_step)} in all{micro}",
            f"optimizer {optim.name} lr {optim.lr:g}, betas ({optim.beta1:g}, {optim.beta2:g}), weight decay "
            f"{optim.weight_decay:g}, {schedule.warmup_steps:,} warmup steps, {decay}; z-loss "
            f"{cfg.z_loss:g}, clip {cfg.max_grad_norm}{spike}",
            f"data      {data} (tokenizer {cfg.data.tokenizer})",
            f"run dir   {cfg.run_dir or 'runs/<preset>-<date>-<time>'}",
        ]
    )


def describe_ladder(cfg: LadderConfig) -> str:
    """What running the ladder `cfg` does: its rungs, their tokens, the fit and the prediction."""
    rungs = plan_rungs(cfg)
    fit = "L(N, D) = E + A N^-alpha + B D^-beta" if len(cfg.tokens_per_param) > 1 else "L(N) = E + A N^-alpha"
    held = [r.name for r in rungs if r.held_out]
    return "\n".join(
        [
            f"rungs     {len(rungs)}: "
            + ", ".join(f"{r.name} ({r.n:,} params, {r.steps:,} steps)" for r in rungs),
            f"tokens    {_short(sum(r.tokens for r in rungs))} in all, {cfg.global_batch_size} x "
            f"{cfg.seq_len} per step, on the embedded stdlib corpus",
            f"fit       {fit}"
            + (f", {', '.join(held)} held out and predicted" if held else "")
            + (f"; predicts {cfg.target}" if cfg.target else ""),
            f"out       {cfg.out}",
        ]
    )


def describe(cfg: RecipeConfig) -> str:
    """`describe_run` or `describe_ladder`, by the kind of config."""
    return describe_ladder(cfg) if isinstance(cfg, LadderConfig) else describe_run(cfg)


def _short(n: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.{max(0, 2 - int(math.log10(n / scale)))}f}{unit}"
    return str(n)


def take_option(args: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` or ``name=VALUE`` from `args` (last one wins) and return VALUE."""
    value = None
    i = 0
    while i < len(args):
        if args[i] == name:
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value")
            value = args[i + 1]
            del args[i : i + 2]
        elif args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
            del args[i]
        else:
            i += 1
    return value


def with_model_flags(cfg: TrainConfig, preset: str | None, init_from: str | None) -> TrainConfig:
    """`cfg` after ``--preset`` (the whole model) and then ``--init-from`` (the source's model and
    tokenizer), which apply before tyro's ``--model.*`` flags change single fields."""
    if preset is not None:
        cfg = dataclasses.replace(cfg, preset=preset, model=get_preset(preset))
    if init_from is not None:
        cfg = with_init_source(cfg, init_from, preset=preset)
    return cfg


def parse_recipe_args(
    default: RecipeConfig, args: Sequence[str], *, prog: str, description: str
) -> RecipeConfig:
    """`default` with the flags in `args` applied (tyro). For a TrainConfig, as on the library's command
    line: ``--preset NAME`` replaces the whole model first, ``--init-from SOURCE`` takes the source's
    model (and tokenizer), and ``--model.*`` flags then change single fields."""
    args = list(args)
    if isinstance(default, TrainConfig):
        preset = take_option(args, "--preset")
        default = with_model_flags(default, preset, take_option(list(args), "--init-from"))
    return tyro.cli(type(default), default=default, args=args, prog=prog, description=description)


def recipe_main(config: Callable[[], RecipeConfig], argv: Sequence[str] | None = None) -> int:
    """Run a recipe as a program: ``config()`` is the default, flags override it, ``--help`` lists them
    (with the recipe's docstring). Prints what the run will do, then trains (a TrainConfig) or runs the
    ladder (a LadderConfig). Errors of the library's families print as one line (``--debug`` shows the
    traceback); returns the exit status."""
    from olmo_fn.parallelize.mesh import launched_world
    from olmo_fn.run import discard_stdout, run

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    module = sys.modules.get(config.__module__)
    where = getattr(module, "__file__", None)
    prog = f"python {_display_path(where)}" if where else "recipe"
    description = ((module.__doc__ or "") if module else "").strip() + "\n\nAlso: --debug shows tracebacks."
    try:
        default = config()
        if not isinstance(default, RecipeConfig):
            raise ConfigError(
                f"{prog}: {RECIPE_FUNCTION}() returned {type(default).__name__}, "
                "not a TrainConfig or LadderConfig"
            )
        cfg = parse_recipe_args(default, args, prog=prog, description=description)
        if launched_world()[0] == 0:
            verb = "will run the ladder" if isinstance(cfg, LadderConfig) else "will train"
            print(f"{prog} {verb}:\n{describe(cfg)}", file=sys.stderr, flush=True)
        run(cfg)
    except OlmoFnError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... --help | head`): stop quietly
        discard_stdout()
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _display_path(path: str) -> str:
    """`path` relative to the working directory when it is below it, else as given."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
