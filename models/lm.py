"""The language model: embedding, blocks of any registered mixers, final norm, LM head; its states.

The model state is a list with one ``MixerState`` per layer, so a hybrid carries retention states (fixed
size) and KV caches (growing) side by side. Generation (``generate``, ``stream``, ``generate_batch``,
``beam_search``) lives in ``models.generation``, whose ``Generation`` methods the model inherits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mixers import MixerState
from mixers.functional import MODES
from mixers.packing import Packing, repad, unpad
from models.blocks import Block, make_norm
from models.checkpoint_format import save_checkpoint
from models.config import ModelConfig, as_model_config
from models.generation import Generation

States = list[MixerState]


class LanguageModel(Generation, nn.Module):
    """A decoder-only language model built from a ``ModelConfig``.

    ``checkpoint_blocks = True`` recomputes each block's activations in the backward pass while training
    (activation checkpointing per block: less memory, more compute); the results are the same."""

    checkpoint_blocks = False

    def __init__(self, config: ModelConfig | Mapping[str, Any]) -> None:
        super().__init__()
        self.config = config = as_model_config(config)
        specs = config.layer_specs()  # the config is data; here it is checked against the registry
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, spec, i) for i, spec in enumerate(specs))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """The embedding and head per ``config.init`` (see ``ModelConfig``); the FFNs GPT-2 style (std 0.02,
        output projections scaled by ``1/sqrt(2 L)`` so the residual stream does not grow with depth);
        mixers keep their own init.

        With ``init="scaled"`` the embedding is N(0, 1/d) and its output is multiplied by sqrt(d): token
        identity enters the residual stream at unit variance, larger than any branch's output at the start,
        and a tied head still gives unit-variance logits (LN(x) . e with |e|^2 ~ 1)."""
        embed_std = self.config.d_model**-0.5 if self.config.init == "scaled" else 0.02
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=embed_std)
        std = 0.02
        for block in self.blocks:
            nn.init.normal_(block.ffn.fc.weight, std=std)
            nn.init.normal_(block.ffn.proj.weight, std=std / math.sqrt(2 * self.config.n_layers))
            for linear in (block.ffn.fc, block.ffn.proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Parameters (tied weights counted once); ``embeddings=False`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok_emb.weight.numel()

    def init_states(self, batch_size: int, *, max_len: int | None = None) -> States:
        """The empty state of every layer (what ``states=None`` means); with ``max_len``, KV caches are
        preallocated for that many tokens (the static decode path: nothing is reallocated while decoding), after
        ``check_state_memory`` (``NotEnoughMemory`` rather than an allocation failure or a machine swapping)."""
        if max_len is not None:
            self.check_state_memory(batch_size, max_len)
        return self.unchecked_states(batch_size, max_len)

    def unchecked_states(self, batch_size: int, max_len: int | None = None) -> States:
        """``init_states`` for a caller that has already checked the memory (generation, with its copies)."""
        return [self._layer_state(block, batch_size, max_len, self.device) for block in self.blocks]

    def _layer_state(
        self, block: Block, batch_size: int, max_len: int | None, device: torch.device | str
    ) -> MixerState:
        return block.mixer.init_state(batch_size, device=device, dtype=self.dtype, max_len=max_len)

    def state_memory(self, batch_size: int, max_len: int) -> int:
        """Bytes the states of ``batch_size`` rows preallocated for ``max_len`` tokens hold (KV caches, retention
        states, ...), from the mixers' own ``init_state`` on the meta device: nothing is allocated. A mixer whose
        state cannot be made there (a plugin's) counts for nothing."""
        total = 0
        for block in self.blocks:
            try:
                total += self._layer_state(block, batch_size, max_len, "meta").nbytes
            except Exception:  # noqa: BLE001  (an estimate: a plugin's state may need a real device)
                continue
        return total

    def check_state_memory(self, batch_size: int, max_len: int, *, copies: int = 1) -> None:
        """Raise ``NotEnoughMemory`` when ``copies`` of the states of ``batch_size`` rows preallocated for
        ``max_len`` tokens (``state_memory``) need more than the memory available on the model's device
        (``available_memory``; nothing is checked where that is unknown). ``copies``: how many such states are
        alive at once (``MixerState.reorder`` copies them while the old ones are still held)."""
        needed = copies * self.state_memory(batch_size, max_len)
        available = available_memory(self.device)
        if available is not None and needed > available:
            rows = f"{batch_size} row{'s' if batch_size != 1 else ''}" + (f" x {copies} copies" if copies > 1 else "")
            raise NotEnoughMemory(
                f"generating needs {_bytes(needed)} for the layers' states ({rows}, KV caches preallocated for "
                f"{max_len:,} tokens), but only {_bytes(available)} is available on {self.device}: lower "
                "max_new_tokens (--max-new-tokens), shorten the prompt, or generate fewer rows (prompts, beams) at once"
            )

    def set_backend(self, backend: str, *, layers: Sequence[int] | None = None) -> None:
        """Run the mixers of ``layers`` (default: all) on ``backend`` (``"auto"`` or a registered backend name,
        checked for each mixer's ops before any layer changes). The config keeps the backends it was built with."""
        chosen = range(len(self.blocks)) if layers is None else list(layers)
        for i in chosen:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(self.blocks) <= i < len(self.blocks):
                raise ValueError(f"layers must hold layer indices in [0, {len(self.blocks)}), got {i!r}")
        previous = [(i, self.blocks[i].mixer.backend) for i in chosen]
        try:
            for i in chosen:
                self.blocks[i].mixer.set_backend(backend)
        except (TypeError, ValueError):
            for i, name in previous:  # all or nothing
                self.blocks[i].mixer.backend = name
            raise

    def _check_tokens(self, tokens: Tensor) -> tuple[int, int]:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor [B, T] of token ids, got {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [B, T] with T >= 1, got {list(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        V = self.config.vocab_size
        # The range check reads the ids (a device sync, and data a compiled graph cannot branch on): eager only.
        if tokens.numel() and not torch.compiler.is_compiling() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(
                f"token ids must be in [0, vocab_size={V}), got values in [{int(tokens.min())}, {int(tokens.max())}]"
            )
        return tokens.shape[0], tokens.shape[1]

    def forward(
        self,
        tokens: Tensor,
        states: Sequence[MixerState | None] | None = None,
        *,
        mode: str = "parallel",
        chunk_size: int | None = None,
        last_only: bool = False,
        cu_seqlens: Tensor | Packing | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, States]:
        """Logits for ``tokens [B, T]``, continuing from ``states`` (one per layer, ``None``: from scratch).

        Arguments:
            mode: ``"parallel"``, ``"chunkwise"`` (``chunk_size``, default ``config.chunk_size``) or
                ``"recurrent"``; all three give the same logits, and the returned states continue the
                sequence in any mode.
            last_only: return the logits of the last position only (``[B, 1, V]``), as generation needs.
            cu_seqlens: int32/int64 ``[N+1]`` (0, ..., T), or a ``Packing`` made of one: ``tokens [1, T]`` holds
                N sequences packed in one row. Each starts at position 0 (or from its row of ``states``), nothing
                crosses a boundary, and the states have N rows; with ``last_only``, the logits are each
                sequence's last ``[N, 1, V]`` (zeros for an empty sequence). Checked once here, it goes to every
                layer as one ``Packing``.
            attention_mask: 0/1 ``[B, T]``: a padded batch, row b's tokens where it is 1 (left or right
                padding, whatever ids the padding holds). The model unpads once, runs the real tokens packed,
                and pads the logits back (zeros at the padding); with ``last_only``, each row's last real
                token's logits. Row b's state is that of its real tokens.

        Returns:
            ``(logits [B, T, vocab_size], states)``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if states is None:
            states = [None] * len(self.blocks)
        elif len(states) != len(self.blocks):
            raise ValueError(f"states must hold one state per layer ({len(self.blocks)}), got {len(states)}")
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("give cu_seqlens (packed sequences) or attention_mask (a padded batch), not both")
            return self._forward_padded(tokens, states, mode, chunk_size, last_only, attention_mask)
        self._check_tokens(tokens)
        if cu_seqlens is None:
            return self._forward(tokens, states, mode, chunk_size, last_only)
        if tokens.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, tokens must hold the packed sequences in one row ([1, T]), got shape "
                f"{list(tokens.shape)}"
            )
        cu_seqlens = Packing.of(cu_seqlens, tokens.shape[1], tokens.device)
        logits, new_states = self._forward(tokens, states, mode, chunk_size, False, cu_seqlens)
        return (self._last(logits, cu_seqlens) if last_only else logits), new_states

    def _forward_padded(
        self,
        tokens: Tensor,
        states: Sequence[MixerState | None],
        mode: str,
        chunk_size: int | None,
        last_only: bool,
        attention_mask: Tensor,
    ) -> tuple[Tensor, States]:
        """``forward`` of a padded batch: unpadded once (the padding never enters a layer), padded back."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            self._check_tokens(tokens)  # names the problem
        B, T = tokens.shape
        mask, cu_seqlens = unpad(attention_mask, B, T, tokens.device)
        packed = tokens[mask][None]  # (1, real tokens)
        if packed.shape[1]:
            self._check_tokens(packed)  # the padding may hold any id
        logits, new_states = self._forward(packed, states, mode, chunk_size, False, cu_seqlens)
        if last_only:
            return self._last(logits, cu_seqlens), new_states  # (B, 1, V)
        return repad(logits, mask), new_states

    @staticmethod
    def _last(logits: Tensor, cu_seqlens: Packing) -> Tensor:
        """Each sequence's last logits ``[N, 1, V]`` from packed ``logits [1, T, V]``; zeros for an empty one."""
        if logits.shape[1] == 0:
            return logits.new_zeros(cu_seqlens.n, 1, logits.shape[-1])
        last = logits[0, cu_seqlens.last] * (cu_seqlens.lengths > 0)[:, None].to(logits.dtype)
        return last[:, None]

    def _forward(
        self,
        tokens: Tensor,
        states: Sequence[MixerState | None],
        mode: str,
        chunk_size: int | None,
        last_only: bool,
        cu_seqlens: Packing | None = None,
    ) -> tuple[Tensor, States]:
        """``forward`` after its checks (the token check reads the ids: a device sync a decode step avoids)."""
        chunk_size = self.config.chunk_size if chunk_size is None else chunk_size
        x = self.tok_emb(tokens.long())  # (B, T, D)
        if (scale := self.config.embedding_scale) != 1.0:
            x = x * scale
        x = self.drop(x)
        new_states = []
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block, state in zip(self.blocks, states, strict=True):
            if recompute:  # keep only each block's input; recompute the rest in the backward pass
                x, state = checkpoint(
                    block, x, state, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens, use_reentrant=False
                )
            else:
                x, state = block(x, state, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
            new_states.append(state)
        x = self.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x), new_states  # (B, T, V)

    def save(self, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Save weights (safetensors) and config (JSON in the header) to ``path``, atomically (see
        ``models.checkpoint_format.save_checkpoint``); ``models.load`` reads it back."""
        return save_checkpoint(self, path, build=LanguageModel, metadata=metadata)


class NotEnoughMemory(MemoryError):
    """Generation would need more memory for its states than the device has available (raised before
    anything is allocated)."""


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device``; ``None`` where that is unknown (a device other than the
    CPU and CUDA, or a system that does not say). CPU: ``MemAvailable`` of ``/proc/meminfo`` (memory that can be
    had without swapping), else the free physical pages; CUDA: the free memory plus what torch's caching
    allocator holds unused."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or a name it does not know
        return None


def _bytes(n: int) -> str:
    """``n`` bytes, readably: ``512 B``, ``12.2 MiB``, ``7.3 TiB``."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:,.1f} {unit}"


def state_nbytes(states: Sequence[MixerState]) -> int:
    """Memory held by a model state (retention states, KV caches, ...)."""
    return sum(s.nbytes for s in states)


def build_model(config: ModelConfig | Mapping[str, Any]) -> LanguageModel:
    """A ``LanguageModel`` from a ``ModelConfig`` or a dict of its fields.

    A config is data; this is where it meets the registry: an unknown mixer, an option its mixer does not
    take or an unregistered backend raises ``ConfigError`` (``ModelConfig.check_against_registry``)."""
    return LanguageModel(config)
