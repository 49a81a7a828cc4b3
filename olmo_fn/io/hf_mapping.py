"""Hugging Face transformers <-> olmo_fn: parameter names and model configs.

Covers ``Olmo2ForCausalLM`` (``olmo2``), ``Olmo3ForCausalLM`` (``olmo3``), ``LlamaForCausalLM``
(``llama``), ``Qwen3ForCausalLM`` (``qwen3``: Llama's block with per-head QK-norm) and
``OlmoeForCausalLM`` (``olmoe``: Llama's block with OLMo's QK-norm and a mixture-of-experts
feed-forward in every layer), with SwiGLU or GeGLU MLPs and default, linear, Llama 3 or YaRN RoPE.
The one place these mappings live: import, export and the logit-parity tests use them.
Both sides store matrices ``(out, in)``, so tensors move across unchanged. The norms are named by
what they do in olmo_fn (``attention_norm`` and ``feed_forward_norm`` in both block kinds) and by
where they sit in Hugging Face, so their names differ between OLMo and Llama.
Experts are stacked on dim 0 in olmo_fn (``experts.w1`` is (n_experts, hidden, d_model)); checkpoints
on the Hub and transformers' ``save_pretrained`` hold one tensor per expert (``experts.{j}.gate_proj``),
which export writes and import stacks. Import also reads transformers 5.x's in-memory layout (all
experts in one tensor, gate and up concatenated as ``gate_up_proj``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Literal

import torch
from tensordict import TensorDict

from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.moe_config import MoeConfig
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.graph.rope import RopeScaling

HfArch = Literal["olmo2", "olmo3", "llama", "qwen3", "olmoe"]
ARCHITECTURES: dict[str, str] = {
    "olmo2": "Olmo2ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
HIDDEN_ACTS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
"""transformers' ``hidden_act`` of each `ModelConfig.mlp_activation`."""

_COMMON = [
    ("embeddings", "model.embed_tokens.weight"),
    ("blocks.{i}.attention.w_q", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attention.w_k", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attention.w_v", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attention.w_out", "model.layers.{i}.self_attn.o_proj.weight"),
    ("lm_head.norm", "model.norm.weight"),
    ("lm_head.w_out", "lm_head.weight"),
]
_MLP = [
    ("blocks.{i}.feed_forward.w1", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.feed_forward.w3", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.feed_forward.w2", "model.layers.{i}.mlp.down_proj.weight"),
]
_MOE = [  # a Hugging Face name with {j}: one tensor per expert j, stacked on dim 0 in olmo_fn
    ("blocks.{i}.feed_forward.router", "model.layers.{i}.mlp.gate.weight"),
    ("blocks.{i}.feed_forward.experts.w1", "model.layers.{i}.mlp.experts.{j}.gate_proj.weight"),
    ("blocks.{i}.feed_forward.experts.w3", "model.layers.{i}.mlp.experts.{j}.up_proj.weight"),
    ("blocks.{i}.feed_forward.experts.w2", "model.layers.{i}.mlp.experts.{j}.down_proj.weight"),
]
_FUSED_MOE = [  # read only: transformers 5.x in memory, every expert in one tensor, split on dim 1
    (
        "model.layers.{i}.mlp.experts.gate_up_proj",  # (n_experts, 2 * hidden, d_model): gate, then up
        ("blocks.{i}.feed_forward.experts.w1", "blocks.{i}.feed_forward.experts.w3"),
    ),
    ("model.layers.{i}.mlp.experts.down_proj", ("blocks.{i}.feed_forward.experts.w2",)),
]
_OLMO_NORMS = [
    ("blocks.{i}.attention.q_norm", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blocks.{i}.attention.k_norm", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blocks.{i}.attention_norm", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.feed_forward_norm", "model.layers.{i}.post_feedforward_layernorm.weight"),
]
_LLAMA_NORMS = [
    ("blocks.{i}.attention_norm", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.feed_forward_norm", "model.layers.{i}.post_attention_layernorm.weight"),
]
_NAMES = {
    "olmo2": _COMMON + _MLP + _OLMO_NORMS,
    "olmo3": _COMMON + _MLP + _OLMO_NORMS,
    "llama": _COMMON + _MLP + _LLAMA_NORMS,
    "qwen3": _COMMON + _MLP + _LLAMA_NORMS + _OLMO_NORMS[:2],
    "olmoe": _COMMON + _MOE + _LLAMA_NORMS + _OLMO_NORMS[:2],
}
_FUSED = {"olmoe": _FUSED_MOE}


def _compile(pattern: str) -> re.Pattern:
    regex = (
        re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{j}"), r"(?P<j>\d+)")
    )
    return re.compile("^" + regex + "$")


_RULES = {
    arch: ([(_compile(a), b) for a, b in names], [(_compile(b), a) for a, b in names])
    for arch, names in _NAMES.items()
}
_FUSED_RULES = {arch: [(_compile(name), paths) for name, paths in _FUSED.get(arch, [])] for arch in _NAMES}


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> tuple[str, int | None] | None:
    """(renamed, expert index j or None) by the first rule matching `name`; a target's ``{j}`` is kept
    when `name` has no expert index."""
    for pattern, target in rules:
        match = pattern.match(name)
        if match:
            groups = match.groupdict()
            j = groups.pop("j", None)
            return target.format(j="{j}", **groups), None if j is None else int(j)
    return None


def to_hf_name(path: str, arch: HfArch) -> str:
    """Hugging Face name of the parameter at dotted olmo_fn `path`; for experts stacked on dim 0 it
    holds ``{j}``, to be formatted with each expert's index."""
    renamed = _rename(path, _RULES[arch][0])
    if renamed is None:
        raise CheckpointError(f"parameter {path!r} has no Hugging Face {arch} counterpart")
    return renamed[0]


def from_hf_name(name: str, arch: HfArch) -> str:
    """Dotted olmo_fn path of the Hugging Face parameter `name` (for one expert's tensor: the path of
    the stacked leaf it is a slice of)."""
    return _from_hf(name, arch)[0]


def _from_hf(name: str, arch: HfArch) -> tuple[str, int | None]:
    renamed = _rename(name, _RULES[arch][1])
    if renamed is None:
        raise CheckpointError(f"Hugging Face tensor {name!r} is not part of a {ARCHITECTURES[arch]} model")
    return renamed


def params_to_hf(params: TensorDict | Mapping, arch: HfArch) -> dict[str, torch.Tensor]:
    """A transformers state dict of architecture `arch` holding `params`' tensors (stacked experts
    split into one tensor per expert, as checkpoints store them)."""
    state = {}
    for path, t in flatten(params).items():
        name = to_hf_name(path, arch)
        if "{j}" in name:
            state.update({name.format(j=j): t[j] for j in range(t.shape[0])})
        else:
            state[name] = t
    return state


def params_from_hf(state_dict: Mapping[str, torch.Tensor], arch: HfArch, *, tied: bool = False) -> TensorDict:
    """The parameter tree held by a transformers state dict. With `tied` embeddings there is no
    lm_head.w_out (a saved ``lm_head.weight``, the same matrix, is dropped). Experts come one tensor
    per expert (stacked here) or fused as transformers 5.x holds them in memory (split here)."""
    flat: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for name, t in state_dict.items():
        if _is_buffer(name):
            continue
        fused = _split_fused(name, t, arch)
        if fused is not None:
            _add(flat, fused)
            continue
        path, j = _from_hf(name, arch)
        if j is None:
            _add(flat, {path: t})
        else:
            per_expert[path][j] = t
    _add(flat, {path: _stack_experts(path, tensors, arch) for path, tensors in per_expert.items()})
    if tied:
        flat.pop("lm_head.w_out", None)
    return unflatten(flat)


def _add(flat: dict[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
    """Add `new` to `flat`, refusing a parameter given twice (per expert and fused)."""
    for path, t in new.items():
        if path in flat:
            raise CheckpointError(
                f"Hugging Face state dict holds {path!r} twice (per-expert and fused tensors)"
            )
        flat[path] = t


def _split_fused(name: str, t: torch.Tensor, arch: HfArch) -> dict[str, torch.Tensor] | None:
    """{path: part} of a fused expert tensor, split into equal parts on dim 1; None if `name` is not one."""
    for pattern, paths in _FUSED_RULES[arch]:
        match = pattern.match(name)
        if match:
            if t.ndim != 3 or t.shape[1] % len(paths):
                raise CheckpointError(
                    f"Hugging Face tensor {name!r} of shape {tuple(t.shape)} does not split into "
                    f"{len(paths)} equal parts on dim 1"
                )
            parts = t.chunk(len(paths), dim=1)
            return {
                p.format(**match.groupdict()): part.contiguous() for p, part in zip(paths, parts, strict=True)
            }
    return None


def _stack_experts(path: str, tensors: dict[int, torch.Tensor], arch: HfArch) -> torch.Tensor:
    """One stacked (n_experts, ...) leaf of per-expert tensors numbered 0..n_experts-1."""
    name = to_hf_name(path, arch)
    missing = sorted(set(range(max(tensors) + 1)) - set(tensors))
    if missing:
        raise CheckpointError(
            f"Hugging Face tensor {name.format(j=missing[0])!r} is missing "
            f"(experts {missing} of 0..{max(tensors)})"
        )
    shapes = {tuple(t.shape) for t in tensors.values()}
    if len(shapes) != 1:
        raise CheckpointError(f"Hugging Face tensors {name!r} differ in shape by expert: {sorted(shapes)}")
    return torch.stack([tensors[j] for j in range(len(tensors))])


def _is_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def arch_for(cfg: ModelConfig) -> HfArch:
    """The Hugging Face architecture that computes what `cfg` does."""
    if cfg.moe.enabled:
        problems = olmoe_problems(cfg)
        if problems:
            raise CheckpointError(
                f"this MoE model has no Hugging Face equivalent (OlmoeForCausalLM): {'; '.join(problems)}"
            )
        return "olmoe"
    if cfg.block == "pre_norm":
        if cfg.window_pattern:
            raise CheckpointError("a pre-norm model with sliding windows has no Hugging Face equivalent")
        if cfg.qk_norm and cfg.qk_norm_scope == "all_heads":
            raise CheckpointError(
                "a pre-norm model with QK-norm over all heads has no Hugging Face equivalent "
                "(Qwen3 norms each head: model.qk_norm_scope=per_head)"
            )
        return "qwen3" if cfg.qk_norm else "llama"
    if not cfg.qk_norm or cfg.qk_norm_scope != "all_heads":
        raise CheckpointError(
            "Hugging Face OLMo always applies QK-norm over all heads; model.qk_norm=False or "
            "qk_norm_scope=per_head has no equivalent"
        )
    return "olmo3" if any(cfg.layer_windows) else "olmo2"


def olmoe_problems(cfg: ModelConfig) -> list[str]:
    """What OlmoeForCausalLM cannot compute of the MoE model `cfg`, each naming the field and value."""
    moe, problems = cfg.moe, []
    if cfg.block != "pre_norm":
        problems.append(f"model.block={cfg.block!r} (OLMoE's block is pre_norm)")
    if not cfg.qk_norm or cfg.qk_norm_scope != "all_heads":
        what = "model.qk_norm=False" if not cfg.qk_norm else f"model.qk_norm_scope={cfg.qk_norm_scope!r}"
        problems.append(f"{what} (OLMoE norms q and k over all heads)")
    if cfg.window_pattern:
        problems.append(f"model.window_pattern={cfg.window_pattern!r} (OLMoE attends fully)")
    if moe.every != 1:
        problems.append(f"model.moe.every={moe.every} (OLMoE has experts in every layer)")
    if moe.score != "softmax":
        problems.append(f"model.moe.score={moe.score!r} (OLMoE's router scores are a softmax)")
    if moe.shared_hidden:
        problems.append(f"model.moe.shared_hidden={moe.shared_hidden} (OLMoE has no shared expert)")
    if moe.capacity_factor:
        problems.append(f"model.moe.capacity_factor={moe.capacity_factor} (OLMoE is dropless)")
    if moe.bias_rate:
        problems.append(f"model.moe.bias_rate={moe.bias_rate} (OLMoE's router has no expert bias)")
    return problems


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` of `cfg`'s RoPE."""
    s = cfg.rope_scaling
    rope: dict[str, Any] = {
        "rope_type": "default" if s.kind == "none" else s.kind,
        "rope_theta": cfg.rope_theta,
    }
    if s.kind != "none":
        rope["factor"] = s.factor
    if s.kind in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = s.original_max_len
    if s.kind == "llama3":
        rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "yarn":
        rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        if s.attention_factor is not None:
            rope["attention_factor"] = s.attention_factor
    return rope


def hf_config(cfg: ModelConfig, arch: HfArch | None = None, **extra: Any) -> dict[str, Any]:
    """A transformers ``config.json`` (as a dict) describing the same model as `cfg`."""
    arch = arch or arch_for(cfg)
    if arch != arch_for(cfg):
        raise CheckpointError(f"this model is a Hugging Face {arch_for(cfg)} model, not {arch}")
    rope = rope_parameters(cfg)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.moe.hidden if arch == "olmoe" else cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": HIDDEN_ACTS[cfg.mlp_activation],
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # read by transformers 4.x
        "rope_parameters": rope,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
    }
    if cfg.rope_scaling.kind != "none":  # transformers 4.x reads the scaling from here
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if cfg.rope_scaling.kind in ("llama3", "yarn"):
            config["max_position_embeddings"] = int(
                cfg.rope_scaling.original_max_len * cfg.rope_scaling.factor
            )
    if arch in ("llama", "qwen3"):
        config.update(mlp_bias=False, head_dim=cfg.d_head)
    if arch == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None)
    if arch == "olmoe":
        config.update(
            num_experts=cfg.moe.n_experts,
            num_experts_per_tok=cfg.moe.top_k,
            norm_topk_prob=cfg.moe.normalize_top_k,
            router_aux_loss_coef=cfg.moe.lb_loss,
            output_router_logits=False,
            clip_qkv=None,
        )
    if arch == "olmo3":
        sizes = {w for w in cfg.layer_windows if w}
        if len(sizes) != 1:
            raise CheckpointError(
                f"Hugging Face Olmo3 has one sliding-window size, this model has {sorted(sizes)}"
            )
        config["sliding_window"] = sizes.pop()
        config["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
        config["rope_parameters"] = {"full_attention": rope, "sliding_attention": dict(rope)}
    config.update(extra)
    return config


def model_config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> tuple[ModelConfig, HfArch]:
    """The ModelConfig of a transformers config, refusing (with the field named) what olmo_fn cannot
    compute exactly."""
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )

    def refuse_if(condition: bool, what: str) -> None:
        if condition:
            raise CheckpointError(f"{where}: {what} is not supported")

    _check_sizes(config, where)
    d_model, heads = config["hidden_size"], config["num_attention_heads"]
    acts = {hf: ours for ours, hf in HIDDEN_ACTS.items()}
    act = config.get("hidden_act", "silu")
    refuse_if(act not in acts, f"hidden_act={act!r} (supported: {', '.join(acts)})")
    refuse_if(bool(config.get("attention_bias")), "attention_bias=true")
    refuse_if(bool(config.get("mlp_bias")), "mlp_bias=true")
    refuse_if(bool(config.get("use_sliding_window")), "use_sliding_window=true")
    refuse_if(config.get("clip_qkv") is not None, f"clip_qkv={config.get('clip_qkv')!r}")
    head_dim = config.get("head_dim")
    refuse_if(
        head_dim not in (None, d_model // heads), f"head_dim={head_dim} != hidden_size/num_attention_heads"
    )
    theta, scaling = _rope(config, where)
    windows: tuple[int, ...] = ()
    if arch == "olmo3":
        layer_types = config.get("layer_types") or []
        window = config.get("sliding_window")
        windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
        refuse_if(len(windows) != config["num_hidden_layers"], "layer_types of the wrong length")
    try:
        cfg = ModelConfig(
            d_model=d_model,
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            mlp_hidden=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            qk_norm=arch != "llama",
            qk_norm_scope="per_head" if arch == "qwen3" else "all_heads",
            mlp_activation=acts[act],
            init_std=config.get("initializer_range", 0.02),
            block="pre_norm" if arch in ("llama", "qwen3", "olmoe") else "reordered_norm",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe=_moe_config(config) if arch == "olmoe" else MoeConfig(),
            **_window_fields(windows),
        )
    except ConfigError as err:  # a value transformers accepted but olmo_fn cannot compute
        raise CheckpointError(f"{where}: {err}") from None
    return cfg, arch


def _moe_config(config: Mapping[str, Any]) -> MoeConfig:
    """The experts of an OLMoE config: in every layer, softmax scores, dropless, no shared expert."""
    return MoeConfig(
        n_experts=config["num_experts"],
        top_k=config["num_experts_per_tok"],
        hidden=config["intermediate_size"],
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
        lb_loss=config.get("router_aux_loss_coef", 0.01),
    )


_REQUIRED_SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)
_MOE_SIZES = ("num_experts", "num_experts_per_tok")
"""Required of an ``olmoe`` config besides `_REQUIRED_SIZES`."""


def _check_sizes(config: Mapping[str, Any], where: str) -> None:
    """Every size field present and a positive integer; every constant a finite positive number."""

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    required = _REQUIRED_SIZES + (_MOE_SIZES if config.get("model_type") == "olmoe" else ())
    missing = [name for name in required if name not in config]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)} (required to build the model)")
    optional = [n for n in ("num_key_value_heads", "head_dim") if config.get(n) is not None]
    for name in (*required, *optional):
        if not positive_int(config[name]):
            raise CheckpointError(f"{where}: {name}={config[name]!r} must be a positive integer")
    for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
        value = config.get(name)
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf")
        ):
            raise CheckpointError(f"{where}: {name}={value!r} must be a finite positive number")


_ROPE_KEYS = {
    "none": set(),
    "linear": {"factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "truncate",
    },
}
_ROPE_BOOKKEEPING = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope(config: Mapping[str, Any], where: str) -> tuple[float, RopeScaling]:
    """The RoPE theta and scaling of a config (transformers 4.x ``rope_scaling`` or 5.x
    ``rope_parameters``, one for all layers), refusing scalings olmo_fn does not compute."""
    params = config.get("rope_parameters")
    if params is None:
        params = {"rope_theta": config.get("rope_theta", 10_000.0), **(config.get("rope_scaling") or {})}
        name = "rope_scaling"
    else:
        name = "rope_parameters"
        per_type = list(params.values()) if all(isinstance(v, dict) for v in params.values()) else [params]
        if any(p != per_type[0] for p in per_type):
            raise CheckpointError(f"{where}: {name} {dict(params)} differ by layer type (one RoPE only)")
        params = per_type[0]
    kind = params.get("rope_type", params.get("type")) or "default"
    kind = "none" if kind == "default" else kind
    if kind not in _ROPE_KEYS:
        raise CheckpointError(
            f"{where}: {name} rope_type={kind!r} is not supported (default, linear, llama3 or yarn)"
        )
    extra = set(params) - _ROPE_KEYS[kind] - _ROPE_BOOKKEEPING
    if extra or params.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported = sorted(extra) or ["partial_rotary_factor"]
        raise CheckpointError(f"{where}: {name} with {', '.join(unsupported)} is not supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10_000.0)))
    fields = {"kind": kind}
    if kind != "none":
        fields["factor"] = float(params["factor"])
    if kind in ("llama3", "yarn"):
        original = params.get("original_max_position_embeddings")
        if original is None:
            raise CheckpointError(
                f"{where}: {name} of rope_type {kind} needs original_max_position_embeddings"
            )
        fields["original_max_len"] = int(original)
    for ours, theirs in (
        ("low_freq_factor", "low_freq_factor"),
        ("high_freq_factor", "high_freq_factor"),
        ("beta_fast", "beta_fast"),
        ("beta_slow", "beta_slow"),
        ("attention_factor", "attention_factor"),
        ("truncate", "truncate"),
    ):
        if params.get(theirs) is not None:
            fields[ours] = params[theirs]
    try:
        return theta, RopeScaling(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {name} {dict(params)}: {err}") from None


def _window_fields(windows: tuple[int, ...]) -> dict[str, Any]:
    """The shortest (window_pattern, full_last_layer) that reproduces per-layer `windows`."""
    if not any(windows):
        return {}
    n = len(windows)
    for full_last in (True, False):
        for length in range(1, n + 1):
            candidate = ModelConfig(n_layers=n, window_pattern=windows[:length], full_last_layer=full_last)
            if candidate.layer_windows == windows:
                return {"window_pattern": windows[:length], "full_last_layer": full_last}
    raise AssertionError("unreachable: the full list always reproduces itself")
