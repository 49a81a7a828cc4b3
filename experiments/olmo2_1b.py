"""OLMo 2 1B (OLMo-2-0425-1B): 4 T tokens of dolma2 data at 2 M tokens per step, as OLMo-core trains it.

Sources, OLMo-core's ``src/scripts/train/OLMo2/OLMo2-1B.py`` (its 1B pre-training script):

- model: ``TransformerConfig.olmo2_1B_v2``: the olmo2-1b preset's shapes (d_model 2048, 16 heads,
  MLP 8192, dolma2 vocab padded to 100352, QK-norm, RoPE theta 500000, RMSNorm eps 1e-6) with **16
  layers**, as in the released OLMo-2-0425-1B (1.48 B parameters). The olmo2-1b preset follows
  OLMo-core's older ``olmo2_1B`` with 18 layers.
- sequence length 4096, global batch ``512 * 4096`` = 2,097,152 tokens (512 instances);
  ``MAX_DURATION = 4e12`` tokens, so ceil(4e12 / 2,097,152) = 1,907,349 steps.
- AdamW lr 4e-4, betas (0.9, 0.95), weight decay 0.033, no weight decay on the embeddings only
  (norms are decayed); eps 1e-8 (OLMo-core's default).
- ``SkipStepAdamWConfig``: a step whose loss or gradient norm is more than 6 standard deviations
  above the mean of the last 128 steps is skipped, once 64 steps are known (OLMo-core's
  ``rolling_interval_length=128``, ``sigma_factor=6``, ``max(20, 128 // 2)``): ``--spike.*`` here.
  OLMo-core's window also holds the skipped steps; this one holds only the applied ones.
- ``CosWithWarmup(warmup_steps=2000)``: linear warmup over 2000 steps, cosine to ``alpha_f = 0.1`` of
  the peak at the end of the run (OLMo-core's default alpha_f).
- z-loss weight 1e-5, gradients clipped at global norm 1.0, per-rank micro-batch 8 instances
  (``rank_microbatch_size = 8 * 4096`` tokens).
- checkpoints: OLMo-core saves every 5,000 steps (ephemeral) and keeps every 100,000th.

Ours, not from the sources: the seed, the data location (``data/dolma2/``: OLMo-core token files of
dolma2-tokenized text, uint32, EOS 100257, PAD 100277, and the dolma2 ``tokenizer.json``; point
``--data.paths`` / ``--data.tokenizer`` elsewhere), no in-loop evaluation (``--eval.paths`` adds it),
and plain FSDP over every rank where OLMo-core uses HSDP (``--parallel.dp-replicate`` gives HSDP).
OLMo-core's warmup starts at 0 and reaches the peak at step 2000; here update k of the warmup gets
``peak * (k + 1) / 2000``.

    python -m olmo_fn.run plan --config experiments/olmo2_1b.py --world-size 64
    torchrun --nproc-per-node 8 experiments/olmo2_1b.py --data.paths 'tokens/*.npy' --run-dir runs/1b
"""

import dataclasses
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
BATCH_INSTANCES = 512
TOTAL_TOKENS = 4 * 10**12
DATA_DIR = "data/dolma2"


def config() -> TrainConfig:
    return TrainConfig(
        preset="olmo2-1b",
        model=dataclasses.replace(get_preset("olmo2-1b"), n_layers=16),
        data=DataConfig(
            paths=(f"{DATA_DIR}/*.npy",),
            eos_token_id=100257,
            pad_token_id=100277,
            seq_len=SEQ_LEN,
            tokenizer=f"{DATA_DIR}/tokenizer.json",
        ),
        optim=OptimConfig(
            name="adamw",
            lr=4e-4,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.033,
            no_decay=("embeddings",),
        ),
        schedule=ScheduleConfig(warmup_steps=2000, decay="cosine", min_lr_ratio=0.1),
        steps=math.ceil(TOTAL_TOKENS / (BATCH_INSTANCES * SEQ_LEN)),
        global_batch_size=BATCH_INSTANCES,
        micro_batch_size=8,
        spike=SpikeConfig(sigmas=6.0, window=128, min_steps=64),
        z_loss=1e-5,
        max_grad_norm=1.0,
        checkpoint=CheckpointConfig(interval=5000, keep_last=2, permanent_every=100_000, async_save=True),
    )


if __name__ == "__main__":
    sys.exit(recipe_main(config))
