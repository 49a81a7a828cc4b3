"""olmo_fn against Hugging Face transformers' Olmo2ForCausalLM (eager), side by side on a CPU.

Same shapes (OLMo2-14M with a 4,096 vocabulary, seq 256, micro-batch 4), the same optimizer
(AdamW, clipping at 1.0), random tokens, alternating the two in fresh processes for several rounds
so that both see the same machine. Prints one JSON line per run and a summary.

    python experiments/bench_vs_transformers.py [--rounds 3] [--steps 30] [--threads N] [--olmo-fn-args=...]

Run it with the machine otherwise idle: two-core timings collapse when another process is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

TRANSFORMERS_STEP = r"""
import json, sys, time, torch, transformers
steps, warmup, seed = int(sys.argv[1]), int(sys.argv[2]), 0
config = transformers.Olmo2Config(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
    intermediate_size=512, vocab_size=4096, rope_theta=500000.0, rms_norm_eps=1e-6,
    attn_implementation="sdpa", pad_token_id=None, bos_token_id=None, eos_token_id=None,
)
torch.manual_seed(seed)
model = transformers.Olmo2ForCausalLM(config).train()
opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
gen = torch.Generator().manual_seed(seed)
def step():
    ids = torch.randint(0, 4096, (4, 256), generator=gen)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
for _ in range(warmup):
    step()
t0 = time.perf_counter()
for _ in range(steps - warmup):
    loss = step()
seconds = (time.perf_counter() - t0) / (steps - warmup)
print(json.dumps({
    "tokens_per_s": round(4 * 256 / seconds, 1), "final_loss": round(loss.item(), 4),
    "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
    "transformers": transformers.__version__,
}))
"""

OLMO_FN_ARGS = [
    "--preset", "olmo2-14m", "--model.vocab-size", "4096", "--seq-len", "256", "--micro-batch", "4",
    "--optim.implementation", "foreach",
]  # fmt: skip


def run(command: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: unset)")
    parser.add_argument(
        "--olmo-fn-args",
        default="",
        help="extra bench options for olmo_fn, e.g. --olmo-fn-args=--no-document-masking",
    )
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    ours = [sys.executable, "-m", "olmo_fn.run", "bench", *OLMO_FN_ARGS, "--steps", str(args.steps),
            "--warmup", str(args.warmup), *args.olmo_fn_args.split()]  # fmt: skip
    theirs = [sys.executable, "-c", TRANSFORMERS_STEP, str(args.steps), str(args.warmup)]
    results: dict[str, list[float]] = {"olmo_fn": [], "transformers": []}
    for round_ in range(args.rounds):
        for name, command in (("olmo_fn", ours), ("transformers", theirs)):
            figures = run(command, env)
            results[name].append(figures["tokens_per_s"])
            print(json.dumps({"round": round_ + 1, "impl": name, **figures}), flush=True)
    summary = {name: {"median": statistics.median(v), "runs": v} for name, v in results.items()}
    ratio = summary["olmo_fn"]["median"] / summary["transformers"]["median"]
    print(json.dumps({"summary": summary, "olmo_fn_over_transformers": round(ratio, 3)}))


if __name__ == "__main__":
    main()
