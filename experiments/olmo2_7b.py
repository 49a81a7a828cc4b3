"""OLMo 2 7B: 4 T tokens of dolma2 data at 4 M tokens per step, as OLMo-core trains it.

Sources, OLMo-core's ``src/scripts/train/OLMo2/OLMo2-7B.py`` (its 7B pre-training script):

- model: ``TransformerConfig.olmo2_7B``, the olmo2-7b preset (d_model 4096, 32 layers, 32 heads,
  MLP 11008, dolma2 vocab padded to 100352, QK-norm, RoPE theta 500000, RMSNorm eps 1e-6).
- sequence length 4096, global batch ``1024 * 4096`` = 4,194,304 tokens (1024 instances);
  ``MAX_DURATION = 4e12`` tokens, so ceil(4e12 / 4,194,304) = 953,675 steps.
- AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.1, no weight decay on the embeddings only (norms
  are decayed); eps 1e-8 (OLMo-core's default).
- ``SkipStepAdamWConfig``: a step whose loss or gradient norm is more than 6 standard deviations
  above the mean of the last 128 steps is skipped, once 64 steps are known (OLMo-core's
  ``rolling_interval_length=128``, ``sigma_factor=6``, ``max(20, 128 // 2)``): ``--spike.*`` here.
  OLMo-core's window also holds the skipped steps; this one holds only the applied ones.
- ``CosWithWarmup(warmup_steps=2000)``: 2000 warmup steps, cosine to 0.1 x the peak at the end.
- z-loss weight 1e-5, gradients clipped at global norm 1.0, per-rank micro-batch 2 instances
  (``rank_microbatch_size = 2 * 4096`` tokens).
- checkpoints: OLMo-core saves every 250 steps (ephemeral) and keeps every 10,000th.

The released OLMo 2 7B was trained with the older OLMo trainer (``configs/official-1124`` in
allenai/OLMo): the same lr, batch, warmup and weight decay, but its cosine was set for 5 T tokens and
stopped at step 928,646 (about 3.9 T tokens) before the annealing stage. A run here decays over
exactly its own steps, so this recipe follows OLMo-core's 4 T schedule.

Ours, not from the sources: the seed, the data location (``data/dolma2/``: OLMo-core token files of
dolma2-tokenized text, uint32, EOS 100257, PAD 100277, and the dolma2 ``tokenizer.json``), no in-loop
evaluation (``--eval.paths`` adds it), plain FSDP over every rank where OLMo-core uses HSDP
(``--parallel.dp-replicate`` gives HSDP), and a warmup that gives update k ``peak * (k + 1) / 2000``.

    python -m olmo_fn.run plan --config experiments/olmo2_7b.py --world-size 64
"""

import math
import sys

from olmo_fn.config import TrainConfig
from olmo_fn.graph.presets import get_preset
from olmo_fn.io.loader import DataConfig
from olmo_fn.recipe import recipe_main
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.spikes import SpikeConfig

SEQ_LEN = 4096
BATCH_INSTANCES = 1024
TOTAL_TOKENS = 4 * 10**12
DATA_DIR = "data/dolma2"


def config() -> TrainConfig:
    return TrainConfig(
        preset="olmo2-7b",
        model=get_preset("olmo2-7b"),
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
        checkpoint=CheckpointConfig(interval=250, keep_last=2, permanent_every=10_000, async_save=True),
    )


if __name__ == "__main__":
    sys.exit(recipe_main(config))
