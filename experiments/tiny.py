"""The tiny default: a 1 M-parameter OLMo 2 on the embedded stdlib corpus, a few minutes on a laptop CPU.

Every value here is the library's own default (``python -m olmo_fn.run train`` with no options trains
exactly this config), written out so that it can be copied and changed: 600 steps of 16 x 256
byte-level tokens, AdamW at 4e-3 with 50 warmup steps and a cosine to a tenth of the peak, weight
decay 0.1 (none on embeddings and norms), z-loss 1e-5, gradients clipped at 1.0. These are not
published numbers: they were chosen so that the loss falls from about 6.0 to about 1.3 in minutes.
"""

import sys

from olmo_fn.config import TrainConfig
from olmo_fn.graph.presets import get_preset
from olmo_fn.io.loader import DataConfig
from olmo_fn.recipe import recipe_main
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig


def config() -> TrainConfig:
    return TrainConfig(
        preset="olmo2-tiny",
        model=get_preset("olmo2-tiny"),  # d_model 128, 4 layers, 4 heads, MLP 384, byte vocab padded to 384
        data=DataConfig(seq_len=256),  # no paths: the embedded, byte-tokenized stdlib corpus
        optim=OptimConfig(name="adamw", lr=4e-3, beta1=0.9, beta2=0.95, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=50, decay="cosine", min_lr_ratio=0.1),
        steps=600,
        global_batch_size=16,
        z_loss=1e-5,
        max_grad_norm=1.0,
    )


if __name__ == "__main__":
    sys.exit(recipe_main(config))
