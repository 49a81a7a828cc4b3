"""A model ladder on the embedded corpus: four sizes at three data budgets, a fit of the loss over
model size and tokens, and a prediction for the tiny default model, on a CPU.

The design follows OLMo's model ladders (OLMo-core's ``olmo_core.model_ladder``, used for OLMo 2 and
in "Establishing Task Scaling Laws via Compute-Efficient Model Ladders"): every size trains at
several multiples of Chinchilla's 20 tokens per parameter, and L(N, D) = E + A N^-alpha + B D^-beta is
fitted over them. OLMo-core's standard run lengths are 0.5, 1, 2, 5 and 10 x Chinchilla
(``RunDuration``); this recipe takes the three shortest, 10, 20 and 40 tokens per parameter, so it fits
on a CPU (30.4 M tokens in all, against 8.7 M for the ladder command's default). 20 comes first: the
target model's prediction is made at the first multiple, Chinchilla's.

Ours, not from OLMo: the rung sizes (32x2 to 96x2: OLMo 2 blocks on the byte vocabulary, 16-wide
heads, MLP 3 x d_model), the byte-level data, the batch (16 x 256 tokens) and the learning rate (the
tiny default's, for every rung; OLMo-core scales it as 0.0047 (N / 108M)^(-1/3)); the largest size is
held out of the fit and predicted, to measure how well the fit extrapolates.

    python experiments/ladder.py                       # writes runs/ladder/ladder.md and ladder.png
    python experiments/ladder.py --out runs/ladder-b --tokens-per-param 20
"""

import sys
from pathlib import Path

from olmo_fn.ladder import LadderConfig
from olmo_fn.recipe import recipe_main

CHINCHILLA_TOKENS_PER_PARAM = 20.0
MULTIPLES = (1.0, 0.5, 2.0)  # of Chinchilla; the first is the one the target is predicted at


def config() -> LadderConfig:
    return LadderConfig(
        sizes=("32x2", "48x2", "64x2", "96x2"),
        tokens_per_param=tuple(CHINCHILLA_TOKENS_PER_PARAM * m for m in MULTIPLES),
        head_dim=16,
        mlp_ratio=3.0,
        seq_len=256,
        global_batch_size=16,
        warmup_fraction=0.1,
        held_out=True,
        target="olmo2-tiny",
        out=Path("runs/ladder"),
    )


if __name__ == "__main__":
    sys.exit(recipe_main(config))
