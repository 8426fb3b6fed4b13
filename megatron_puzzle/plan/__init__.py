"""`megatron-puzzle plan`: each stage's peak memory per GPU, computed from the code on fake tensors."""
