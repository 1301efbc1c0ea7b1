"""seqmixers models: blocks, the model builder and the language model (built on ``mixers``).

Public API:
- ``ModelConfig`` / ``TrainConfig``: validated configs, from TOML/YAML/JSON files, dicts or keywords.
- ``build_model(config)`` -> ``LanguageModel``: ``forward(tokens, states, mode=...)``, ``generate(...)``,
  ``save(path)``.
- ``load(path)``: a model from a checkpoint (safetensors weights + JSON config, never unpickled).
- ``train(model_config, train_config)``: the training loop on the embedded corpus or any text file
  (``models.training``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.checkpoint import load, read_header
    from models.checkpoint_format import CheckpointError
    from models.config import ConfigError, LayerSpec, ModelConfig, TrainConfig, load_run_config, presets
    from models.lm import LanguageModel, build_model
    from models.training.loop import train
    from models.training.results import TrainResult

# The public names are imported on first use (PEP 562): importing torch takes seconds, and the ``seqmixers``
# command imports this package before it can catch a Ctrl-C, so the package itself imports nothing heavy.
_WHERE = {
    "CheckpointError": "models.checkpoint_format",
    "load": "models.checkpoint",
    "read_header": "models.checkpoint",
    "ConfigError": "models.config",
    "LayerSpec": "models.config",
    "ModelConfig": "models.config",
    "TrainConfig": "models.config",
    "load_run_config": "models.config",
    "presets": "models.config",
    "LanguageModel": "models.lm",
    "build_model": "models.lm",
    "TrainResult": "models.training.results",
    "train": "models.training.loop",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
