"""olmo_fn: compiler-first, functional pre-training of OLMo-family language models."""

__version__ = "0.1.0"
