"""examples/functional_blocks.ipynb runs top to bottom without Jupyter, and computes what it says.

The code cells run in order in one namespace (as a kernel would run them); the tests then check the
facts the notebook prints: both models learn, the swapped-in block computes the parallel block and is
the one that trained, the hand-written step equals make_train_step, generation produced tokens, and
the package itself was left unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import olmo_fn.graph.block as block_module
import olmo_fn.graph.decode as decode_module
import olmo_fn.graph.model as model_module
import olmo_fn.state.train_step as train_step_module
from olmo_fn.graph import logits

from reference import allowed, attention, perturbed_params, random_doc_ids, rms_norm, swiglu

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "functional_blocks.ipynb"


def notebook_cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text())["cells"]


def code_sources() -> list[str]:
    return ["".join(cell["source"]) for cell in notebook_cells() if cell["cell_type"] == "code"]


def run_cells(sources: list[str], namespace: dict) -> dict:
    for i, source in enumerate(sources):
        exec(compile(source, f"{NOTEBOOK.name}, code cell {i}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def nb():
    """The namespace after running every code cell once (one thread, matplotlib without a display)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MPLBACKEND", "Agg")
            namespace = run_cells(code_sources(), {"__name__": "__notebook__"})
    finally:
        torch.set_num_threads(threads)
    yield namespace
    if namespace.get("plt") is not None:
        namespace["plt"].close("all")


def test_the_notebook_is_nbformat_4_with_outputs_cleared_and_explained():
    data = json.loads(NOTEBOOK.read_text())
    assert data["nbformat"] == 4
    cells = data["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} holds outputs"
            assert i > 0 and cells[i - 1]["cell_type"] == "markdown", (
                f"code cell {i} has no explanation before it"
            )
            lines = "".join(cell["source"]).splitlines()
            assert not [ln for ln in lines if ln.lstrip().startswith(("%", "!"))]  # plain Python only


def test_both_models_learn(nb):
    steps, vocab = nb["STEPS"], nb["cfg"].vocab_size
    assert abs(nb["initial_loss"] - math.log(vocab)) < 0.1  # an untrained model guesses about uniformly
    for losses in (nb["stock_losses"], nb["parallel_losses"]):
        assert len(losses) == steps and all(math.isfinite(x) for x in losses)
        assert abs(losses[0] - math.log(vocab)) < 0.1
        assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def test_the_hand_written_step_equals_make_train_step(nb):
    """The same functions on the same numbers: parameters and optimizer state bit for bit (checked
    here from the two states, not from the notebook's own comparison)."""
    from olmo_fn.graph.param_tree import flatten

    library, ours = nb["library"], nb["ours"]
    for name, a, b in (("params", library.params, ours.params), ("opt", library.opt_state, ours.opt_state)):
        a, b = flatten(a), flatten(b)
        assert a.keys() == b.keys()
        for path in a:
            assert torch.equal(a[path], b[path]), (name, path)
    assert nb["step_difference"] == 0.0


def test_the_swapped_block_is_what_trained(nb):
    cfg, steps = nb["cfg"], nb["STEPS"]
    assert nb["calls_in_training"] == cfg.n_layers * steps
    assert nb["swap_changes_logits"] > 1e-2
    # Parameters trained through the parallel block fit it better than the block they did not train with.
    assert nb["held_out_own_block"] < nb["held_out_stock_block"] - 0.1


def parallel_reference(params, ids, positions, doc_ids, cfg):
    """A float64 model whose every block is ``x + attn(norm_a(x)) + mlp(norm_f(x))``, written here."""
    x = params["embeddings"].double()[ids]
    mask = allowed(doc_ids)
    for i in range(cfg.n_layers):
        p = params["blocks"][str(i)]
        attn = attention(p["attention"], rms_norm(x, p["attention_norm"], cfg.norm_eps), positions, mask, cfg)
        mlp = swiglu(p["feed_forward"], rms_norm(x, p["feed_forward_norm"], cfg.norm_eps))
        x = x + attn + mlp
    return rms_norm(x, params["lm_head"]["norm"], cfg.norm_eps) @ params["lm_head"]["w_out"].double().T


def test_the_notebooks_block_is_the_parallel_block(nb, gen):
    cfg = nb["cfg"]
    params = perturbed_params(cfg, seed=3)  # float64, norm weights away from 1
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
    doc_ids = random_doc_ids(2, 12, gen, p_boundary=0.3)
    starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    index = torch.arange(12).expand(2, 12)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    got = logits(params, ids, cfg, positions=positions, doc_ids=doc_ids, block_fn=nb["parallel_block"])
    expected = parallel_reference(params, ids, positions, doc_ids, cfg)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # the RoPE tables are fp32


def test_generation_produced_tokens(nb):
    new, vocab = nb["MAX_NEW"], nb["cfg"].vocab_size
    for completion in (nb["cached"], nb["parallel_completion"]):
        assert len(completion) == new and all(0 <= t < vocab for t in completion)
    recomputed = nb["generate_naive"](nb["stock_state"].params, nb["prompt"], nb["reordered_norm_block"], new)
    assert recomputed == nb["cached"] and nb["same_as_cached"] is True


def test_the_package_is_left_unchanged(nb):
    assert {
        "reordered_norm": block_module.reordered_norm_block,
        "pre_norm": block_module.pre_norm_block,
    } == block_module.BLOCKS
    for module in (model_module, train_step_module, decode_module):
        assert module.block_for is block_module.block_for
    assert block_module.block_for(nb["cfg"]) is block_module.reordered_norm_block


def test_the_plot_holds_both_loss_curves(nb):
    pytest.importorskip("matplotlib")
    (ax,) = nb["loss_figure"].axes
    curves = [list(line.get_ydata()) for line in ax.get_lines()]
    assert curves == [nb["stock_losses"], nb["parallel_losses"]]


def test_without_matplotlib_the_plot_cell_says_so(nb, monkeypatch):
    plot_cell = next(s for s in code_sources() if "matplotlib" in s)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    namespace = {k: v for k, v in nb.items() if k not in ("plt", "loss_figure")}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_cells([plot_cell], namespace)
    assert "matplotlib is not installed" in out.getvalue()
    assert namespace["plt"] is None and "loss_figure" not in namespace
