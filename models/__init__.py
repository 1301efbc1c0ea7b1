"""seqmixers models: blocks, the model builder and the language model (built on ``mixers``).

Public API:
- ``ModelConfig`` / ``TrainConfig``: validated configs, from TOML/YAML/JSON files, dicts or keywords.
- ``build_model(config)`` -> ``LanguageModel``: ``forward(tokens, states, mode=...)``, ``generate(...)``,
  ``save(path)``.
- ``load(path)``: a model from a checkpoint (safetensors weights + JSON config, never unpickled).
- ``train(model_config, train_config)``: the training loop on the embedded corpus or any text file.
"""

from models.checkpoint import CheckpointError, load, read_header
from models.config import ConfigError, LayerSpec, ModelConfig, TrainConfig, load_run_config, presets
from models.lm import LanguageModel, build_model
from models.train import TrainResult, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LanguageModel",
    "LayerSpec",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "load",
    "load_run_config",
    "presets",
    "read_header",
    "train",
]
