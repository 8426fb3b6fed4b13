"""The project's own DeciLM / Nemotron-NAS implementation for transformers.

`configuration_decilm.py` and `modeling_decilm.py` are self-contained: the HF
export copies them next to the weights so that `AutoModelForCausalLM` loads the
directory with `trust_remote_code=True`.
"""

from pathlib import Path

from .configuration_decilm import DeciLMConfig
from .modeling_decilm import (
    DeciLMDecoderLayer,
    DeciLMForCausalLM,
    DeciLMModel,
    DeciLMRotaryEmbedding,
    build_attention_mask,
    decilm_layer_modules,
)

MODELING_FILES = (Path(__file__).parent / "configuration_decilm.py", Path(__file__).parent / "modeling_decilm.py")

__all__ = [
    "DeciLMConfig", "DeciLMDecoderLayer", "DeciLMForCausalLM", "DeciLMModel", "DeciLMRotaryEmbedding",
    "MODELING_FILES", "build_attention_mask", "decilm_layer_modules",
]
