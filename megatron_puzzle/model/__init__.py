"""The heterogeneous GPT on Megatron-Core: building, running in pieces, checkpoints, CPU support."""
