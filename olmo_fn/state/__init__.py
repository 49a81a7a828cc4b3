"""Training state and its evolution: TrainState, AdamW, LR schedules, the train step, checkpoints."""
