"""Checkpoint conversion: HF Llama (safetensors, GGUF) to Megatron-Core, and back out to HF DeciLM."""
