"""Shared pieces of the ``tests/test_models_*`` files: tiny configs, drawn configs, state comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from mixers import MixerState
from mixers.registry import get_registry
from mixers.testing.asserts import assert_states_close as kit_assert_states_close
from models import cli
from models.config import FFNS, INITS, NORMS, ModelConfig, mixer_parameters


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and one thread does not stall when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def head_options(names: list[str], heads: int = 2) -> dict[str, dict]:
    """``num_heads`` for every mixer that takes it."""
    out = {}
    for name in names:
        accepted = mixer_parameters(name)
        if accepted is None or "num_heads" in accepted:
            out[name] = {"num_heads": heads}
    return out


def tiny_config(layers: list, **overrides) -> ModelConfig:
    names = sorted({entry if isinstance(entry, str) else entry["mixer"] for entry in layers})
    fields = {
        "vocab_size": 32,
        "d_model": 16,
        "n_layers": len(layers),
        "layers": layers,
        "mixer_options": head_options(names),
        "ffn_dim": 24,
    }
    return ModelConfig(**(fields | overrides))


@st.composite
def model_configs(draw, max_layers: int = 3) -> ModelConfig:
    """Small configs over every registered mixer: any depth 1-3, a repeated pattern or one entry per layer
    (so hybrids), both FFNs and norms, tied or not, a default or explicit FFN width, a model chunk size."""
    names = sorted(get_registry().mixers)
    n_layers = draw(st.integers(1, max_layers))
    pattern = draw(st.sampled_from(sorted({1, n_layers})))
    layers = draw(st.lists(st.sampled_from(names), min_size=pattern, max_size=pattern))
    return ModelConfig(
        vocab_size=draw(st.integers(2, 40)),
        d_model=draw(st.sampled_from([16, 32])),
        n_layers=n_layers,
        layers=layers,
        mixer_options=head_options(names),
        ffn=draw(st.sampled_from(FFNS)),
        ffn_dim=draw(st.sampled_from([None, 20])),
        norm=draw(st.sampled_from(NORMS)),
        tie_embeddings=draw(st.booleans()),
        init=draw(st.sampled_from(INITS)),
        chunk_size=draw(st.sampled_from([None, 3, 8])),
    )


def assert_states_close(actual: list[MixerState], expected: list[MixerState], rtol: float) -> None:
    """One state per layer, each close to the expected (the kit's comparison: positions exact, caches by what
    they hold)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        kit_assert_states_close(a, e, rtol, f"layer {i} state")


def tiny_run_file(path, *, model: dict | None = None, **train) -> Path:
    """Write a run file (TOML) of a one-layer retention model with 2 heads, d_model 16, and a 2-step training of
    2 x 16 tokens without a sample to ``path``; ``model`` and ``train`` change or add fields. Returns the path."""
    model_fields = {"d_model": 16, "n_layers": 1, "layers": ["retention"], "ffn_dim": 16, **(model or {})}
    train_fields = {
        "steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1, "sample_tokens": 0, **train
    }  # fmt: skip

    def toml(fields: dict) -> str:
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())

    text = f"[model]\n{toml(model_fields)}\n[model.mixer_options]\nretention = {{ num_heads = 2 }}\n\n"
    path = Path(path)
    path.write_text(text + f"[train]\n{toml(train_fields)}")
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``cli.main(argv)``'s exit code (returned, or raised by argparse), stdout and stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
