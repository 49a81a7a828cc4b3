"""Supervised fine-tuning of the tiny default model on prompt-completion pairs: the loss counts the
completions only, the prompts are context.

    python experiments/tiny.py --run-dir runs/tiny                  # 1. the base model
    python -m olmo_fn.run prepare-data --inputs 'sft/*.jsonl' --output-dir data/sft \\
        --format prompt-completion                                  # 2. {"prompt", "completion"} lines
    python experiments/finetune.py --run-dir runs/finetune          # 3. this recipe
    python -m olmo_fn.run generate --checkpoint runs/finetune --prompt 'def '

``init_from`` starts a new run (step 0, fresh optimizer moments) from the base run's newest
checkpoint; ``prepare-data --format prompt-completion`` writes, beside each token file, the loss mask
that keeps the prompts out of the loss. Another base (``--init-from`` a run, an export or a Hugging
Face directory) brings its own model and tokenizer: prepare the data with that tokenizer.

From the Tülu 3 SFT recipe (allenai/Llama-3.1-Tulu-3-8B-SFT's model card and the Tülu 3 report):
a linear decay to 0 after a warmup over the first 3 % of the steps, no weight decay, and whole examples
packed into sequences (here: ``data.packing documents``, each example attending only to itself, the
padding out of the loss). Tülu 3 trains 2 epochs: set ``--steps`` to 2 x the instances the data holds
/ the batch (the run's first line says how many instances there are), and ``--schedule.warmup-steps``
to 3 % of that (the 6 here are 3 % of the default 200 steps).

Guesses, for this 1 M-parameter model rather than Tülu's 8 B one: the peak learning rate 4e-4 (a tenth
of the tiny model's pre-training peak; Tülu 3 used 5e-6 at 8 B, 1/60 of Llama 3.1 8B's), the batch
(16 x 256 tokens, as in pre-training; Tülu 3: 128 sequences of up to 4096), the 200 steps, no z-loss
(Tülu 3 trains on the plain cross-entropy), gradient clipping at 1.0, and the paths.
"""

import sys

from olmo_fn.config import TrainConfig
from olmo_fn.graph.presets import get_preset
from olmo_fn.io.byte_tokenizer import BYTE_EOS, BYTE_PAD
from olmo_fn.io.loader import DataConfig
from olmo_fn.recipe import recipe_main
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig

STEPS = 200
WARMUP_FRACTION = 0.03


def config() -> TrainConfig:
    return TrainConfig(
        preset="olmo2-tiny",
        model=get_preset("olmo2-tiny"),  # the base run's model: a new run from its weights keeps the shapes
        init_from="runs/tiny",
        data=DataConfig(
            paths=("data/sft/*.npy",),
            eos_token_id=BYTE_EOS,
            pad_token_id=BYTE_PAD,
            seq_len=256,
            packing="documents",
        ),
        optim=OptimConfig(name="adamw", lr=4e-4, beta1=0.9, beta2=0.95, weight_decay=0.0),
        schedule=ScheduleConfig(
            warmup_steps=round(WARMUP_FRACTION * STEPS), decay="linear", min_lr_ratio=0.0
        ),
        steps=STEPS,
        global_batch_size=16,
        z_loss=0.0,
        max_grad_norm=1.0,
    )


if __name__ == "__main__":
    sys.exit(recipe_main(config))
