"""The ``"retention"`` mixer (gated multi-scale retention): the paper's formula, three agreeing modes,
and state hand-over that continues positions.

The generic properties every mixer shares (causality, batch independence, gradients) are in
``test_mixer_conformance.py``; this file checks what is specific to retention.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import mixers
from mixers.interface import MixerState
from mixers.retention import MultiScaleRetention, default_gammas
from mixers.testing import assert_rel_close, norm_rel_error
from mixers.testing.reference import short_conv_reference
from mixers.testing.strategies import MODES

D_MODEL = 24


def norm_params(mixer: MultiScaleRetention) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-head norm's affine weight and bias (flat, ``[H * Dv]``), or Nones."""
    return (None, None) if mixer.head_norm is None else (mixer.head_norm.weight, mixer.head_norm.bias)


def make(seed: int = 0, dtype: torch.dtype = torch.float64, **options) -> MultiScaleRetention:
    torch.manual_seed(seed)
    options.setdefault("num_heads", 3)
    mixer = mixers.build("retention", D_MODEL, backend="torch", **options).to(dtype)
    weight, bias = norm_params(mixer)
    if weight is not None:  # non-trivial affine weights, so that a mixed-up head order shows
        with torch.no_grad():
            weight.uniform_(0.5, 1.5)
            if bias is not None:
                bias.uniform_(-0.5, 0.5)
    return mixer


def inputs(B: int = 2, T: int = 23, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def msr_reference(
    mixer: MultiScaleRetention, x: torch.Tensor, schedule: str = "rope", base: float = 10000.0
) -> torch.Tensor:
    """MSR straight from the paper, in float64, with complex rotations and relative positions.

    ``o_n = sum_{m<=n} gamma^(n-m) Re[(Q_n e^{in theta}) (K_m e^{im theta})^dagger] V_m``, where a pair of
    real dimensions is one complex number: ``(i, i + D/2)`` for the "half" layout, ``(2i, 2i+1)`` for
    "interleaved". Then a per-head norm, the swish gate and the output projection. With ``conv_size``,
    q, k, v (before rotation) go through the short convolution first.
    """
    x = x.double()
    B, T, _ = x.shape
    H, Dk, Dv = mixer.num_heads, mixer.head_dim, mixer.value_head_dim
    w = mixer.in_proj.weight.double()
    qkv = x @ w[: 2 * H * Dk + H * Dv].T
    if mixer.conv is not None:
        qkv = short_conv_reference(qkv, mixer.conv.weight)
    q, k, v = qkv.split([H * Dk, H * Dk, H * Dv], dim=-1)
    q, k, v = q.reshape(B, T, H, Dk), k.reshape(B, T, H, Dk), v.reshape(B, T, H, Dv)
    k = k / math.sqrt(Dk)
    n = torch.arange(T, dtype=torch.float64)
    rel = n[:, None] - n[None, :]  # n - m
    gamma = torch.tensor(mixer.gammas, dtype=torch.float64)
    decay = torch.where(rel >= 0, gamma[:, None, None] ** rel.clamp(min=0), 0.0)  # (H, T, T)
    if mixer.rotary:
        if schedule == "rope":
            theta = base ** (-torch.arange(0, Dk, 2, dtype=torch.float64) / Dk)
        else:  # torchscale's
            theta = base ** -torch.linspace(0, 1, Dk // 2, dtype=torch.float64)
        if mixer.rope_layout == "half":
            zq, zk = (
                torch.complex(q[..., : Dk // 2], q[..., Dk // 2 :]),
                torch.complex(k[..., : Dk // 2], k[..., Dk // 2 :]),
            )
        else:
            zq, zk = torch.complex(q[..., 0::2], q[..., 1::2]), torch.complex(k[..., 0::2], k[..., 1::2])
        phase = torch.exp(1j * rel[:, :, None] * theta)  # e^{i (n - m) theta}, (T, T, Dk/2)
        scores = torch.einsum("bnhj,bmhj,nmj->bhnm", zq, zk.conj(), phase).real
    else:
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k)
    o = torch.einsum("bhnm,bmhe->bnhe", scores * decay, v)  # (B, T, H, Dv)
    if mixer.group_norm:
        if mixer.norm == "groupnorm":
            mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
            o = (o - mean) / torch.sqrt(var + mixer.head_norm.eps)
        else:
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + mixer.head_norm.eps)
    y = o.reshape(B, T, H * Dv)
    weight, bias = norm_params(mixer)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    if mixer.gate:
        y = F.silu(x @ w[2 * H * Dk + H * Dv :].T) * y
    return y @ mixer.out_proj.weight.double().T


OPTIONS = [
    {},
    {"rope_layout": "interleaved"},
    {"rope_layout": "interleaved", "rope_schedule": "linspace", "rope_base": 500.0},
    {"norm": "rmsnorm"},
    {"norm": "rmsnorm", "norm_affine": False},
    {"gate": False},
    {"group_norm": False},
    {"rotary": False},
    {"decay": False},
    {"multi_scale": False},
    {"gammas": [1.0, 0.5, 1e-6]},
    {"value_dim": 12, "head_dim": 4},
    {"conv_size": 4},
    {"conv_size": 1, "rotary": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_paper_formula(options):
    mixer = make(**options)
    x = inputs()
    expected = msr_reference(
        mixer, x, schedule=options.get("rope_schedule", "rope"), base=options.get("rope_base", 10000.0)
    )
    for mode in MODES:
        y, state = mixer(x, mode=mode, chunk_size=5)
        assert_rel_close(y, expected, 1e-9, mode)
        assert state.offset == x.shape[1]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_three_modes_agree(options):
    mixer = make(**options)
    x = inputs(T=41)
    y_par, s_par = mixer(x, mode="parallel")
    for mode, chunk_size in [
        ("recurrent", None),
        ("chunkwise", None),
        ("chunkwise", 1),
        ("chunkwise", 6),
        ("chunkwise", 41),
        ("chunkwise", 50),
    ]:
        y, s = mixer(x, mode=mode, chunk_size=chunk_size)
        assert_rel_close(y, y_par, 1e-10, f"{mode} {chunk_size} output")
        assert_rel_close(s.op, s_par.op, 1e-10, f"{mode} {chunk_size} state")


@pytest.mark.parametrize("first", MODES)
@pytest.mark.parametrize("second", MODES)
@pytest.mark.parametrize("cut", [1, 11, 22])
def test_handover_continues_positions(first, second, cut):
    mixer = make()
    x = inputs()
    expected, whole = mixer(x)
    y1, s1 = mixer(x[:, :cut], mode=first, chunk_size=4)
    assert s1.offset == cut
    y2, s2 = mixer(x[:, cut:], s1, mode=second, chunk_size=4)
    assert s2.offset == x.shape[1]
    assert_rel_close(torch.cat([y1, y2], dim=1), expected, 1e-10, "outputs")
    assert_rel_close(s2.op, whole.op, 1e-10, "state")


@pytest.mark.parametrize("cut", [0, 1, 2, 11])
def test_conv_window_is_handed_over(cut):
    """With the short convolution, the state carries its last K-1 inputs: a split (shorter than the
    window too) and token-by-token decoding equal one pass."""
    mixer = make(conv_size=4)
    x = inputs(T=14)
    expected, whole = mixer(x)
    assert whole.conv.shape == (2, 3, mixer.conv.channels) and whole.conv.dtype == torch.float64
    y1, s1 = mixer(x[:, :cut], mode="recurrent")
    y2, s2 = mixer(x[:, cut:], s1, mode="chunkwise", chunk_size=3)
    assert_rel_close(torch.cat([y1, y2], dim=1), expected, 1e-10, "split outputs")
    assert_rel_close(s2.conv, whole.conv, 1e-12, "window")
    state, outs = mixer.init_state(2, dtype=torch.float64), []
    for t in range(x.shape[1]):
        y, state = mixer(x[:, t : t + 1], state, mode="recurrent")
        outs.append(y)
    assert_rel_close(torch.cat(outs, dim=1), expected, 1e-10, "decoded")


def test_a_state_built_for_another_conv_setting_is_refused():
    with_conv, without = make(conv_size=3), make()
    x = inputs(T=4)
    with pytest.raises(ValueError, match="the state holds no conv window, but this mixer has conv_size=3"):
        with_conv(x, without.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="the state holds a conv window, but this mixer has no short convolution"):
        without(x, with_conv.init_state(2, dtype=torch.float64))
    wrong = dataclasses.replace(with_conv.init_state(2, dtype=torch.float64), conv=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"conv window must be \[B, conv_size - 1, channels\] = \[2, 2, "):
        with_conv(x, wrong)
    with pytest.raises(ValueError, match="conv_size must be a positive int"):
        make(conv_size=0)


@pytest.mark.parametrize("rotary", [True, False])
def test_offset_is_what_continues_the_rotation(rotary):
    """Restarting the position count at 0 changes the continuation exactly when q, k are rotated."""
    mixer = make(rotary=rotary)
    x = inputs()
    expected, _ = mixer(x)
    _, s1 = mixer(x[:, :10])
    y2, _ = mixer(x[:, 10:], MixerState.start(s1.op, x.shape[0]))
    err = (y2 - expected[:, 10:]).abs().max().item()
    assert (err > 1e-3) if rotary else (err < 1e-10)


def test_token_by_token_decoding_equals_parallel():
    mixer = make()
    x = inputs(T=12)
    expected, _ = mixer(x)
    state, outs = mixer.init_state(2, dtype=torch.float64), []
    for t in range(x.shape[1]):
        y, state = mixer(x[:, t : t + 1], state, mode="recurrent")
        outs.append(y)
    assert_rel_close(torch.cat(outs, dim=1), expected, 1e-10, "decoded")


def test_reordered_state_follows_its_batch_entries():
    """Beam search: ``state.reorder(index)`` continues the reordered batch entries."""
    mixer = make()
    x = inputs(B=3)
    index = torch.tensor([2, 0, 0])
    expected, _ = mixer(x[index])
    _, s1 = mixer(x[:, :9])
    y2, _ = mixer(x[index, 9:], s1.reorder(index), mode="recurrent")
    assert_rel_close(y2, expected[:, 9:], 1e-10, "reordered continuation")


def test_init_state_is_the_empty_history():
    mixer = make()
    x = inputs()
    state = mixer.init_state(2, dtype=torch.float64)
    assert state.offset == 0 and state.op.dtype == torch.float64 and not state.op.any()
    assert state.op.shape == (2, mixer.num_heads, mixer.head_dim, mixer.value_head_dim)
    torch.testing.assert_close(mixer(x, state)[0], mixer(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_module_within_2e_2_of_float64(mode):
    """``mixer.to(bfloat16)`` keeps the decays exact and stays within 2e-2 of the same weights in float64."""
    mixer = make(dtype=torch.bfloat16)
    assert mixer.gammas == tuple(1 - 2.0 ** (-5 - h) for h in range(3))
    x = inputs(T=64, dtype=torch.bfloat16)
    y, state = mixer(x, mode=mode, chunk_size=16)
    assert y.dtype == torch.bfloat16 and state.op.dtype == torch.float32
    expected = msr_reference(mixer, x)  # the bf16 weights and inputs, computed in float64
    assert norm_rel_error(y, expected) < 2e-2


def test_float32_modes_agree_to_1e_5():
    mixer = make(dtype=torch.float32)
    x = inputs(T=100, dtype=torch.float32)
    y_par, _ = mixer(x)
    for mode in ("chunkwise", "recurrent"):
        assert_rel_close(mixer(x, mode=mode, chunk_size=7)[0], y_par, 1e-5, mode)


def test_default_configuration_runs():
    """Default heads (head dim 256, at most d_model) and widths build and run (torchscale's did not)."""
    for d_model in (8, 256, 768):
        mixer = mixers.build("retention", d_model)
        y, _ = mixer(torch.randn(1, 5, d_model))
        assert y.shape == (1, 5, d_model) and torch.isfinite(y).all()
    assert mixers.build("retention", 768).num_heads == 3


def test_decay_schedule_gammas_code_and_paper():
    """``"code"``: ``1 - 2^(-5-h)``; ``"paper"``: ``1 - exp(linspace(log 1/32, log 1/512, H))``."""
    code = [1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8]
    assert default_gammas(4) == default_gammas(4, decay_schedule="code") == code
    assert default_gammas(1, decay_schedule="paper") == pytest.approx([1 - 1 / 32], abs=1e-15)
    logs = [math.log(1 / 32) + i * (math.log(1 / 512) - math.log(1 / 32)) / 3 for i in range(4)]
    paper = default_gammas(4, decay_schedule="paper")
    assert paper == pytest.approx([1 - math.exp(v) for v in logs], abs=1e-15)
    assert paper[0] == pytest.approx(1 - 1 / 32) and paper[-1] == pytest.approx(1 - 1 / 512)
    assert paper != default_gammas(4)  # 1/512 is reached at the last head, not at head 5
    assert default_gammas(4, decay_schedule="paper", multi_scale=False) == [1 - 2.0**-5] * 4
    assert default_gammas(4, decay_schedule="paper", decay=False) == [1.0] * 4
    with pytest.raises(ValueError, match=r"decay_schedule must be one of \('code', 'paper'\), got 'Paper'"):
        default_gammas(4, decay_schedule="Paper")


def test_decay_schedule_option_builds_and_round_trips_through_a_config():
    import models

    mixer = make(decay_schedule="paper")
    assert mixer.gammas == tuple(default_gammas(3, decay_schedule="paper")) != tuple(default_gammas(3))
    assert_rel_close(mixer(inputs(), mode="chunkwise", chunk_size=5)[0], mixer(inputs())[0], 1e-10, "paper schedule")
    with pytest.raises(ValueError, match="decay_schedule must be one of"):
        make(decay_schedule="slides")
    config = models.ModelConfig(
        d_model=16, n_layers=1, layers=["retention"],
        mixer_options={"retention": {"num_heads": 4, "decay_schedule": "paper"}},
    )  # fmt: skip
    again = models.ModelConfig.from_dict(config.to_dict())
    assert again == config
    built = models.build_model(again)
    gammas = [m.gammas for m in built.modules() if isinstance(m, MultiScaleRetention)]
    assert gammas == [tuple(default_gammas(4, decay_schedule="paper"))]
