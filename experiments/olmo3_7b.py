"""OLMo 3 7B (Olmo-3-1025-7B), pre-training stage 1: dolma3 data at 8192 tokens per sequence and 4 M
tokens per step, with sliding-window attention in three of every four layers.

Sources, OLMo-core's ``src/scripts/official/OLMo3/OLMo-3-1025-7B-pretrain-1.py`` (the official script):

- model: ``TransformerConfig.olmo3_7B``: OLMo 2 7B's shapes (d_model 4096, 32 layers, 32 heads, MLP
  11008, dolma2 vocab padded to 100352) with the sliding-window pattern (4096, 4096, 4096, full), the
  last layer forced to full attention: the olmo3-7b preset.
- sequence length 8192, global batch ``8192 * 512`` = 4,194,304 tokens (512 instances).
- AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.1, no weight decay on the embeddings only (norms
  are decayed); eps 1e-8 (OLMo-core's default).
- ``SkipStepAdamWConfig``: a step whose loss or gradient norm is more than 6 standard deviations
  above the mean of the last 128 steps is skipped, once 64 steps are known (OLMo-core's
  ``rolling_interval_length=128``, ``sigma_factor=6``, ``max(20, 128 // 2)``): ``--spike.*`` here.
  OLMo-core's window also holds the skipped steps; this one holds only the applied ones.
- ``CosWithWarmup(warmup_steps=2000)`` over ``max_duration = 5e12`` tokens: 2000 warmup steps, cosine
  to 0.1 x the peak at ceil(5e12 / 4,194,304) = 1,192,093 steps.
- z-loss weight 1e-5, gradients clipped at global norm 1.0, per-rank micro-batch 2 instances
  (``rank_microbatch_size = 2 * 8192`` tokens); checkpoints every 1000 steps, evaluation every 10,000.

Not expressed here: the official run stopped this schedule at step 597,046 (``hard_stop``) and went on
with one stretched to 7 T tokens (``OLMo-3-1025-7B-pretrain-2.py``); a run here decays over exactly
its own steps. Its data loader seed (34521) orders OLMo-core's data, not this library's.

Ours, not from the sources: the seed, the data location (``data/dolma3/``: OLMo-core token files of
dolma2-tokenized text, uint32, EOS 100257, PAD 100277, and the dolma2 ``tokenizer.json``), keeping the
newest two checkpoints (OLMo-core keeps all), evaluation only once ``--eval.paths`` names held-out
files, plain FSDP where OLMo-core uses HSDP, and a warmup that gives update k ``peak * (k + 1) / 2000``.

    python -m olmo_fn.run plan --config experiments/olmo3_7b.py --world-size 64 --parallel.cp 2
"""

import math
import sys

from olmo_fn.config import TrainConfig
from olmo_fn.evaluate import EvalConfig
from olmo_fn.graph.presets import get_preset
from olmo_fn.io.loader import DataConfig
from olmo_fn.recipe import recipe_main
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.spikes import SpikeConfig

SEQ_LEN = 8192
BATCH_INSTANCES = 512
TOTAL_TOKENS = 5 * 10**12
DATA_DIR = "data/dolma3"


def config() -> TrainConfig:
    return TrainConfig(
        preset="olmo3-7b",
        model=get_preset("olmo3-7b"),
        data=DataConfig(
            paths=(f"{DATA_DIR}/*.npy",),
            eos_token_id=100257,
            pad_token_id=100277,
            seq_len=SEQ_LEN,
            tokenizer=f"{DATA_DIR}/tokenizer.json",
        ),
        optim=OptimConfig(
            name="adamw", lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, no_decay=("embeddings",)
        ),
        schedule=ScheduleConfig(warmup_steps=2000, decay="cosine", min_lr_ratio=0.1),
        steps=math.ceil(TOTAL_TOKENS / (BATCH_INSTANCES * SEQ_LEN)),
        global_batch_size=BATCH_INSTANCES,
        micro_batch_size=2,
        spike=SpikeConfig(sigmas=6.0, window=128, min_steps=64),
        z_loss=1e-5,
        max_grad_norm=1.0,
        checkpoint=CheckpointConfig(interval=1000, keep_last=2),
        eval=EvalConfig(interval=10_000),
    )


if __name__ == "__main__":
    sys.exit(recipe_main(config))
