"""MoE in the train step: the auxiliary losses enter the gradient with their weights, the metrics are
the statistics they claim, what MoE cannot run with is refused in one line, and it trains and resumes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.graph import ModelConfig, init_params
from olmo_fn.graph.model import loss_sums
from olmo_fn.graph.moe_config import MoeConfig
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.instances import make_batch
from olmo_fn.run import main
from olmo_fn.state.moe_terms import moe_metrics
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_step import StepSettings, make_gradient_fn

MOE = MoeConfig(n_experts=4, top_k=2, hidden=16, every=2, shared_hidden=8, lb_loss=0.3, router_z_loss=0.05)
CFG = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=50, moe=MOE)
EOS = 3


def settings(model=CFG, micro_batch_size=2) -> StepSettings:
    return StepSettings(
        model=model,
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(warmup_steps=1),
        total_steps=4,
        micro_batch_size=micro_batch_size,
        z_loss=1e-3,
        compute_dtype=torch.float64,
    )


def params64(model=CFG, seed=0):
    params = init_params(model, seed=seed, dtype=torch.float64)
    return params.apply(lambda t: t.requires_grad_(True))


def random_batch(gen, rows=6, seq=12):
    batch = make_batch(torch.randint(0, CFG.vocab_size, (rows, seq), generator=gen), EOS)
    drop = torch.rand(rows, seq, generator=gen) < 0.2
    return dataclasses.replace(batch, labels=batch.labels.masked_fill(drop, -100))


def naive_objective(params, batch, s: StepSettings, lb_weight: float, rz_weight: float):
    """Σ over micro-batches of (ce + z_loss·z + lb_weight·Σ_layers lb·T + rz_weight·Σ_layers Σ_t lse²)
    / targets of the whole batch, with lb written out from the router probabilities of each layer."""
    n_targets = (batch.labels != -100).sum()
    total = 0.0
    for mb in batch.split(s.micro_batch_size):
        ce, z, _, aux = loss_sums(
            params,
            mb.input_ids,
            mb.labels,
            s.model,
            positions=mb.positions,
            doc_ids=mb.doc_ids,
            with_aux=True,
        )
        total = total + ce + s.z_loss * z
        for layer in aux:
            assert layer % MOE.every == MOE.every - 1  # only the MoE layers report
            total = total + lb_weight * aux[layer]["lb_sum"] + rz_weight * aux[layer]["router_z_sum"]
    return total / n_targets


def test_step_gradient_includes_the_weighted_auxiliary_losses(gen):
    """The step's gradient (3 micro-batches) equals autograd of the objective written out, with the
    balancing and router z-loss weights from the config; without them (a control) it differs."""
    s = settings()
    params = params64()
    batch = random_batch(gen)
    result = make_gradient_fn(s)(params, batch)
    leaves = flatten(params)
    expected = torch.autograd.grad(naive_objective(params, batch, s, 0.3, 0.05), list(leaves.values()))
    for (path, got), want in zip(result.grads.items(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=path)
    control = torch.autograd.grad(naive_objective(params, batch, s, 0.0, 0.0), list(leaves.values()))
    router = list(leaves).index("blocks.1.feed_forward.router")
    assert not torch.allclose(result.grads["blocks.1.feed_forward.router"], control[router], atol=1e-8)


def test_metrics_are_the_statistics_they_name():
    """moe_metrics from hand-made statistics of two layers: loads over the uniform share, the
    per-token losses averaged over layers, the dropped fraction."""
    stats = {
        "1/lb_sum": torch.tensor(40.0),
        "1/router_z_sum": torch.tensor(8.0),
        "1/expert_tokens": torch.tensor([10.0, 30.0, 20.0, 20.0]),
        "1/dropped": torch.tensor(4.0),
        "1/tokens": torch.tensor(20.0),
        "3/lb_sum": torch.tensor(60.0),
        "3/router_z_sum": torch.tensor(4.0),
        "3/expert_tokens": torch.tensor([20.0, 20.0, 20.0, 20.0]),
        "3/dropped": torch.tensor(0.0),
        "3/tokens": torch.tensor(20.0),
    }
    m = moe_metrics(stats, CFG)
    assert m["moe/layer1/tokens"].tolist() == [10.0, 30.0, 20.0, 20.0]
    assert m["moe/layer1/load_max"].item() == pytest.approx(1.5)  # 30 of 80 over a uniform 20
    assert m["moe/layer1/load_min"].item() == pytest.approx(0.5)
    assert m["moe/layer3/load_max"].item() == pytest.approx(1.0)
    assert m["moe/load_max"].item() == pytest.approx(1.5) and m["moe/load_min"].item() == pytest.approx(0.5)
    assert m["moe/lb_loss"].item() == pytest.approx((2.0 + 3.0) / 2)
    assert m["moe/router_z_loss"].item() == pytest.approx((0.4 + 0.2) / 2)
    assert m["moe/dropped"].item() == pytest.approx(4 / 160)
    assert moe_metrics({}, CFG) == {}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--parallel.tp", "2"], "parallel.tp=2 with an MoE model is not supported yet"),
        (["--parallel.pp", "2"], "parallel.pp=2 with an MoE model is not supported yet"),
        (["--compile", "step"], "compile=step with an MoE model is not supported yet"),
        (["--parallel.ep", "2", "--compile", "on"], "compile=on with parallel.ep > 1 is not supported yet"),
        (["--model.moe.top-k", "9"], "model.moe.top_k=9 exceeds model.moe.n_experts=8"),
        (["--model.moe.capacity-factor", "-1"], "model.moe.capacity_factor=-1.0 must be >= 0"),
    ],
)
def test_what_moe_cannot_run_with_is_one_line(tmp_path, capsys, options, expected):
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "olmoe-tiny", *options, "--run-dir", str(run_dir)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not run_dir.exists()


def test_dense_layers_between_moe_layers_keep_their_mlp():
    """every=2: layers 1 and 3 route, 0 and 2 keep w1/w2/w3; counts add up."""
    shapes = flatten(init_params(CFG, device="meta"))
    assert "blocks.0.feed_forward.w1" in shapes and "blocks.0.feed_forward.router" not in shapes
    assert shapes["blocks.3.feed_forward.experts.w2"].shape == (4, 32, 16)
    assert shapes["blocks.3.feed_forward.shared.w1"].shape == (8, 32)
    routers = [path for path in shapes if path.endswith(".router")]
    assert routers == ["blocks.1.feed_forward.router", "blocks.3.feed_forward.router"]


def test_expert_bias_steers_the_choice_not_the_weights(gen):
    """With a bias the top-k are those of scores + bias, weighted by their scores alone; a bias that
    strongly favours experts 0 and 3 makes every token choose them."""
    from olmo_fn.graph.moe import route

    moe = MoeConfig(n_experts=4, top_k=2, hidden=4)
    router = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    bias = torch.tensor([0.3, -0.1, 0.0, 0.2], dtype=torch.float64)
    weights, experts, _ = route(router, x, moe, bias)
    scores = torch.softmax(x @ router.T, dim=-1)
    for t in range(10):
        ranked = sorted(range(4), key=lambda e: -(scores[t, e] + bias[e]).item())[:2]
        assert experts[t].tolist() == ranked
        assert weights[t].tolist() == [scores[t, e].item() for e in ranked]
    _, favoured, _ = route(router, x, moe, torch.tensor([10.0, 0, 0, 10.0], dtype=torch.float64))
    assert sorted(set(favoured.reshape(-1).tolist())) == [0, 3]


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "muon"])
def test_step_moves_expert_biases_by_the_sign_of_the_load_and_never_by_the_optimizer(gen, optimizer):
    """After one update (weight decay on) each bias is exactly its old value + bias_rate ·
    sign(mean load − load), the loads those of the step's batch; the other parameters did move
    (the experts' 3-D stacks by AdamW's rule under Muon, the router as a Muon matrix)."""
    from olmo_fn.state.train_state import TrainState
    from olmo_fn.state.train_step import make_train_step

    model = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, bias_rate=0.05))
    s = dataclasses.replace(settings(model), optim=OptimConfig(name=optimizer, lr=1e-2, weight_decay=0.1))
    params = params64(model)
    with torch.no_grad():
        for layer in (1, 3):
            params["blocks", str(layer), "feed_forward", "expert_bias"].copy_(
                torch.tensor([0.2, -0.1, 0.05, 0.0], dtype=torch.float64)
            )
    before = {k: v.detach().clone() for k, v in flatten(params).items()}
    batch = random_batch(gen)
    stats = make_gradient_fn(s)(params, batch).moe_stats
    from olmo_fn.state.optim import init_opt_state

    state = TrainState(0, params, init_opt_state(params, s.optim), 0, 0, "")
    state, _ = make_train_step(s)(state, batch)
    after = flatten(state.params)
    for layer in (1, 3):
        path = f"blocks.{layer}.feed_forward.expert_bias"
        load = stats[f"{layer}/expert_tokens"].double()
        assert load.sum() == 6 * 12 * 2 and len(set(load.tolist())) > 1  # every assignment counted
        expected = before[path] + 0.05 * torch.sign(load.mean() - load)
        assert torch.equal(after[path], expected), (after[path], expected)
    assert not torch.equal(after["blocks.1.feed_forward.router"], before["blocks.1.feed_forward.router"])
    assert not torch.equal(after["blocks.0.feed_forward_norm"], before["blocks.0.feed_forward_norm"])
    assert not torch.equal(
        after["blocks.3.feed_forward.experts.w2"], before["blocks.3.feed_forward.experts.w2"]
    )


def test_next_steps_offer_convert_only_where_transformers_has_the_model(tmp_path):
    """olmoe-tiny (OLMo 2's reordered-norm block with experts) has no transformers class; OLMoE has."""
    from olmo_fn.graph.presets import PRESETS
    from olmo_fn.summary import finished_summary

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    assert "convert to-hf" not in finished_summary(tmp_path, 1.0, PRESETS["olmoe-tiny"])
    assert "convert to-hf" in finished_summary(tmp_path, 1.0, PRESETS["olmoe-1b-7b"])
    assert "generate --checkpoint" in finished_summary(tmp_path, 1.0, PRESETS["olmoe-tiny"])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--parallel.ep", "3"], "parallel.ep=3 does not divide model.moe.n_experts=8"),
        (["--preset", "olmo2-tiny", "--parallel.ep", "2"], "parallel.ep=2 needs an MoE model"),
        (
            ["--parallel.ep", "2", "--parallel.dp-shard", "1", "--parallel.dp-replicate", "4"],
            "does not divide",
        ),
        (
            ["--parallel.ep", "2", "--model.moe.capacity-factor", "1.25"],
            "parallel.ep=2 with model.moe.capacity_factor=1.25 is not supported yet",
        ),
    ],
)
def test_expert_parallel_that_cannot_work_is_one_line(capsys, options, expected):
    """`plan` names what expert parallel cannot do on 4 processes, before anything starts."""
    argv = ["plan", "--preset", "olmoe-tiny", "--world-size", "4", *options]
    if "--preset" in options:
        argv = ["plan", "--world-size", "4", *options]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines


def test_parameter_counts_say_what_one_token_uses():
    """OLMoE-1B-7B: 6.92 B parameters, of which a token uses all but 56 of 64 experts' three
    matrices in each of 16 layers (1.28 B, as the model card's "1B active")."""
    from olmo_fn.graph.flops import active_params, count_params, params_text
    from olmo_fn.graph.presets import PRESETS

    cfg = PRESETS["olmoe-1b-7b"]
    unused = 16 * (64 - 8) * 3 * 1024 * 2048
    assert active_params(cfg) == count_params(cfg) - unused
    assert 1.2e9 < active_params(cfg) < 1.35e9 and 6.8e9 < count_params(cfg) < 7.0e9
    assert params_text(cfg) == (
        f"{count_params(cfg) / 1e6:,.2f}M params ({(count_params(cfg) - unused) / 1e6:,.2f}M active: "
        "64 experts of 1024, 8 per token)"
    )
    assert params_text(PRESETS["olmo2-tiny"]) == "0.95M params"


def test_expert_parallel_blocks_run_eagerly_under_compile_auto():
    """compile=auto leaves expert-parallel blocks eager (their all-to-all's split sizes are read on the
    host), as it does tensor-parallel ones; compile=on is refused (the CLI case above)."""
    from olmo_fn.runtime import resolve_compile

    assert resolve_compile("auto", torch.device("cuda"), expert_parallel=True) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
