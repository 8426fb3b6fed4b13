"""megatron-puzzle: the Puzzle method (distillation-based NAS for inference-optimised LLMs) on Megatron-Core."""

__version__ = "0.1.0"
