"""Token data in, run artifacts out: token files, the embedded corpus, batches, metrics, HF names."""
