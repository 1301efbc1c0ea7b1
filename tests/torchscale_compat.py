"""The official RetNet code (torchscale) side by side with ours: import it, and copy weights across.

torchscale is installed with ``--no-deps``: its retention module needs only torch, but the module that
holds ``RetNetRelPos`` imports ``fairscale`` and ``timm`` at the top for things retention never uses
(activation-checkpoint wrappers, ``drop_path``). Those two are stubbed here when they are missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import mixers
from mixers.retention import MultiScaleRetention
from models import LanguageModel, ModelConfig, TrainConfig
from models.convert import from_torchscale, torchscale_model_config
from models.training.batches import prepare
from models.training.optim import lr_at, make_optimizer
from models.training.parallel import World


def _stub_missing(name: str, **attrs: Any) -> None:
    if name in sys.modules or importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def import_torchscale() -> types.SimpleNamespace | None:
    """torchscale's ``MultiScaleRetention``, ``RetNetRelPos``, ``RetNetConfig`` and ``RetNetDecoder``, or None
    if absent."""
    if importlib.util.find_spec("torchscale") is None:
        return None
    _stub_missing("fairscale.nn", checkpoint_wrapper=lambda m, **kw: m, wrap=lambda m, **kw: m)
    _stub_missing("timm.models.layers", drop_path=lambda x, *a, **kw: x)
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetDecoder, RetNetRelPos
    from torchscale.component.multiscale_retention import MultiScaleRetention as TSRetention

    return types.SimpleNamespace(
        MultiScaleRetention=TSRetention,
        RetNetRelPos=RetNetRelPos,
        RetNetConfig=RetNetConfig,
        RetNetDecoder=RetNetDecoder,
    )


def build_pair(
    ts: types.SimpleNamespace,
    *,
    d_model: int = 512,
    value_dim: int = 1024,
    num_heads: int = 8,
    chunk_size: int = 128,
    eps: float = 1e-6,
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.nn.Module, MultiScaleRetention]:
    """``(torchscale_msr, torchscale_relpos, ours)`` computing the same function with the same weights.

    Ours is configured as ``models.convert`` configures it: torchscale's angle schedule (``linspace``),
    interleaved rotation, per-head RMSNorm without affine weights and the same epsilon.
    """
    torch.manual_seed(seed)
    args = ts.RetNetConfig(
        decoder_embed_dim=d_model,
        decoder_value_embed_dim=value_dim,
        decoder_retention_heads=num_heads,
        recurrent_chunk_size=chunk_size,
        layernorm_eps=eps,
    )
    theirs = ts.MultiScaleRetention(args, d_model, value_dim, num_heads)
    relpos = ts.RetNetRelPos(args)
    # the retention options of the LM conversion (this config's vocabulary and FFN play no part here)
    lm = {**vars(args), "vocab_size": 1, "activation_fn": "swish"}
    options = torchscale_model_config(lm).layer_specs()[0].options
    ours = mixers.build("retention", d_model, **options)
    with torch.no_grad():
        ours.in_proj.weight.copy_(
            torch.cat([theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight, theirs.g_proj.weight])
        )
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
    return theirs, relpos, ours


def run_torchscale(msr: torch.nn.Module, relpos: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torchscale's output in ``"parallel"`` or ``"chunkwise"`` mode (its chunk size must divide T)."""
    chunkwise = mode == "chunkwise"
    return msr(x, relpos(x.shape[1], chunkwise_recurrent=chunkwise), chunkwise_recurrent=chunkwise)


def lm_configs(
    ts: types.SimpleNamespace,
    *,
    vocab_size: int = 256,
    d_model: int = 32,
    value_dim: int = 64,
    num_heads: int = 2,
    ffn_dim: int = 64,
    n_layers: int = 2,
    eps: float = 1e-6,
    retention_eps: float = 1e-30,
    tie_embeddings: bool = False,
    chunk_size: int = 16,
) -> tuple[Any, ModelConfig]:
    """``(RetNetConfig, ModelConfig)`` describing the same decoder-only RetNet: torchscale's fairseq RetNet LM
    settings (swish GLU, embedding scaled by sqrt(d), pre-norm, no dropout), and what ``models.convert`` makes
    of them (docs/convert.md maps each convention)."""
    args = ts.RetNetConfig(
        vocab_size=vocab_size,
        decoder_embed_dim=d_model,
        decoder_value_embed_dim=value_dim,
        decoder_retention_heads=num_heads,
        decoder_ffn_embed_dim=ffn_dim,
        decoder_layers=n_layers,
        decoder_normalize_before=True,
        activation_fn="swish",
        dropout=0.0,
        activation_dropout=0.0,
        drop_path_rate=0.0,
        no_scale_embedding=False,
        layernorm_embedding=False,
        deepnorm=False,
        share_decoder_input_output_embed=tie_embeddings,
        layernorm_eps=eps,
        chunkwise_recurrent=False,  # torchscale_logits picks the mode per call
        recurrent_chunk_size=chunk_size,
    )
    return args, torchscale_model_config(args, retention_eps=retention_eps)


def build_torchscale_lm(ts: types.SimpleNamespace, args: Any, *, retention_eps: float = 1e-30) -> torch.nn.Module:
    """torchscale's ``RetNetDecoder`` for ``args``, with its own init and an embedding N(0, 1/d).

    The decoder takes its embedding from the caller; torchscale's fairseq RetNet LM passes fairseq's
    ``Embedding``, N(0, 1/d) with a zeroed padding row (we have no padding token), as ours starts too."""
    embed = torch.nn.Embedding(args.vocab_size, args.decoder_embed_dim)
    torch.nn.init.normal_(embed.weight, mean=0.0, std=args.decoder_embed_dim**-0.5)
    decoder = ts.RetNetDecoder(args, embed_tokens=embed)
    for layer in decoder.layers:
        layer.retention.group_norm.eps = retention_eps  # the only norm whose epsilon differs from layernorm_eps
    return decoder


def build_lm_pair(
    ts: types.SimpleNamespace, *, seed: int = 0, retention_eps: float = 1e-30, **sizes: Any
) -> tuple[torch.nn.Module, LanguageModel]:
    """``(torchscale_decoder, ours)``: the same RetNet LM, ours holding a copy of every torchscale weight.

    ``sizes`` are ``lm_configs``'s (vocab_size, d_model, value_dim, num_heads, ffn_dim, n_layers, eps,
    tie_embeddings, chunk_size). ``eps`` is the epsilon of every block norm and the final norm, on both sides.
    ``retention_eps`` is the per-head norm's inside retention, on both sides; it must be negligible for the two to
    be one function: torchscale divides its scores by decay and row sums before that norm and we do not, so the same
    epsilon weighs differently (tests/test_torchscale_parity.py). Its default, 1e-30, is negligible; 1e-14 is not
    quite: torchscale's retention outputs have a mean square of about 2e-5 per head (down to 2e-8) at the start of
    training (d_model 32), so 1e-14 moves them by ~5e-10, and its effect on training differs between the two
    (float64, 30 steps: loss curves 2e-8 apart with 1e-14, 5e-16 with 1e-30).
    Any epsilon > 0 keeps an all-zero row at zero rather than NaN.

    Both models come out float32; for float64 use ``.double()``, then ``relpos_float64`` (and
    ``without_float32_casts``) on torchscale's.
    """
    args, _ = lm_configs(ts, retention_eps=retention_eps, **sizes)
    torch.manual_seed(seed)
    theirs = build_torchscale_lm(ts, args, retention_eps=retention_eps)
    ours = from_torchscale(theirs.state_dict(), args, retention_eps=retention_eps)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if ours.num_parameters() != n_theirs:  # nothing of ours is left out of the copy, nothing of theirs unused
        raise AssertionError(f"parameter counts differ: ours {ours.num_parameters()}, torchscale {n_theirs}")
    return theirs, ours


def relpos_float64(decoder: torch.nn.Module) -> torch.nn.Module:
    """Recompute the decoder's ``RetNetRelPos`` buffers with torchscale's own formulas in float64.

    torchscale builds its angles and log-decays in float32 (``.double()`` only converts the rounded
    values), while ours are float64; recomputing the same formulas in float64 removes that ~1e-7 rounding
    from a float64 comparison. Call after ``decoder.double()``.
    """
    relpos = decoder.retnet_rel_pos
    heads, n_angles = relpos.decay.numel(), relpos.angle.numel() // 2
    angle = 1.0 / (10000 ** torch.linspace(0, 1, n_angles, dtype=torch.float64))
    decay = torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float64)))
    with torch.no_grad():
        relpos.angle.copy_(angle.unsqueeze(-1).repeat(1, 2).flatten())
        relpos.decay.copy_(decay)
    return decoder


def torchscale_logits(decoder: torch.nn.Module, tokens: torch.Tensor, mode: str = "parallel") -> torch.Tensor:
    """torchscale's logits ``[B, T, V]`` for ``tokens`` in ``"parallel"`` or ``"chunkwise"`` mode.

    ``RetNetDecoder`` reads its mode from ``chunkwise_recurrent`` (set from the config) on every call; it
    is set here for this call. Chunkwise needs the chunk size to divide T (torchscale would otherwise pad).
    """
    if mode not in ("parallel", "chunkwise"):
        raise ValueError(f"mode must be 'parallel' or 'chunkwise', got {mode!r}")
    chunk = decoder.recurrent_chunk_size
    if mode == "chunkwise" and tokens.shape[1] % chunk:
        raise ValueError(f"chunkwise mode needs the chunk size ({chunk}) to divide T={tokens.shape[1]}")
    previous = decoder.chunkwise_recurrent
    decoder.chunkwise_recurrent = mode == "chunkwise"
    try:
        logits, _ = decoder(tokens)
    finally:
        decoder.chunkwise_recurrent = previous
    return logits


def without_float32_casts(decoder: torch.nn.Module) -> torch.nn.Module:
    """Make the decoder's RMSNorms and GLUs compute in the input's dtype, for a float64 comparison.

    torchscale's ``RMSNorm`` and ``GLU`` compute in float32 whatever the input (``x.float()``, then
    ``.type_as(x)``), so a ``.double()`` torchscale model still rounds to float32 there (~6e-8 relative in
    the logits). These forwards are the same formulas without the cast (for float32 inputs they are the
    originals). Only this decoder's instances are changed (their ``forward`` attribute), not the classes.
    """

    def rms_norm(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = self._norm(x)
        return out if self.weight is None else out * self.weight

    def glu(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, x.size(-1))
        x = self.activation_fn(self.fc1(x)) * self.gate(x)
        return self.dropout_module(self.fc2(self.activation_dropout_module(x)).view(shape))

    for module in decoder.modules():
        kind = type(module).__name__
        if kind in ("RMSNorm", "GLU") and type(module).__module__.startswith("torchscale."):
            module.forward = types.MethodType(rms_norm if kind == "RMSNorm" else glu, module)
    return decoder


def training_batches(
    batch_size: int, seq_len: int, steps: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random (inputs, targets) windows of the embedded corpus's training part, from a seeded
    generator: the batches ``models.training.loop`` would draw with this seed."""
    tc = TrainConfig(batch_size=batch_size, seq_len=seq_len)
    with prepare(ModelConfig(), tc, World()) as data:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y, *_ = data.make(data.draw(gen))
            yield x, y


def train_together(
    runs: Sequence[tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]], tc: TrainConfig
) -> Iterator[tuple[int, list[float]]]:
    """Train each ``(model, forward)`` of ``runs`` on the same batches; yield ``(step, losses)`` per step.

    The recipe is the training loop's (``models.training.optim``): ``make_optimizer`` (AdamW, weight decay on
    matrices only), ``lr_at`` (warm-up, then cosine), clipping at ``tc.grad_clip``; the batches are
    ``training_batches(tc.batch_size, tc.seq_len, tc.steps, tc.seed)``. ``forward`` maps tokens to logits. AdamW
    acts elementwise, so their separate q/k/v/g matrices and our stacked ``in_proj`` get the same updates, and the
    global gradient norm is the same sum over the same numbers. The loss is computed in the logits' dtype
    (``models.training.loop`` casts to float32).
    """
    optimizers = [make_optimizer(model, tc) for model, _ in runs]
    for model, _ in runs:
        model.train()
    for step, (x, y) in enumerate(training_batches(tc.batch_size, tc.seq_len, tc.steps, tc.seed), start=1):
        losses = []
        for (model, forward), optimizer in zip(runs, optimizers, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1, tc)
            logits = forward(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            losses.append(loss.item())
        yield step, losses


def train_pair(theirs: torch.nn.Module, ours: LanguageModel, tc: TrainConfig) -> Iterator[tuple[int, float, float]]:
    """Train torchscale's decoder and ours side by side in ``tc.mode`` (``train_together``); yield
    ``(step, their_loss, our_loss)``. Chunkwise uses torchscale's chunk size on both sides."""
    chunk = theirs.recurrent_chunk_size
    runs = [
        (theirs, lambda x: torchscale_logits(theirs, x, tc.mode)),
        (ours, lambda x: ours(x, mode=tc.mode, chunk_size=chunk)[0]),
    ]
    for step, (their_loss, our_loss) in train_together(runs, tc):
        yield step, their_loss, our_loss


def max_weight_difference(theirs: torch.nn.Module, ours: LanguageModel) -> float:
    """The largest relative difference ``|a - b| / |a|`` (Frobenius) over all weights, in our naming
    (torchscale's converted by ``models.convert.from_torchscale``)."""
    mine = ours.state_dict()
    worst = 0.0
    with torch.no_grad():
        converted = from_torchscale(theirs.state_dict(), theirs.args).state_dict()
        for name, w in converted.items():
            worst = max(worst, ((mine[name] - w).norm() / w.norm()).item())
    return worst
