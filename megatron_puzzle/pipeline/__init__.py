"""The pipeline: run config, stages over a run directory, realize, `megatron-puzzle run`."""
