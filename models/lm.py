"""The language model: embedding, blocks of any registered mixers, final norm, LM head; and generation.

The model state is a list with one ``MixerState`` per layer, so a hybrid carries retention states (fixed
size) and KV caches (growing) side by side. ``generate`` prefills the prompt in chunkwise (or parallel)
mode and then decodes token by token in recurrent mode: constant time and memory per token for the
recurrent layers. Attention layers decode against a KV cache preallocated for the whole generation and
written in place (the static decode path, as gpt-fast has it): every decode step has the same shapes, with
positions as tensors, so ``generate(compile=True)`` compiles the step once and reuses it.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mixers import MixerState
from mixers.functional import MODES
from mixers.packing import Packing, repad, unpad
from models.blocks import Block, make_norm
from models.config import ModelConfig, as_model_config

States = list[MixerState]
# A prompt longer than this is prefilled in pieces of this many tokens when a progress bar is asked for.
PREFILL_PIECE = 1024


class LanguageModel(nn.Module):
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
        init = block.mixer.init_state
        extra = {"max_len": max_len} if max_len is not None and _takes(init, "max_len") else {}
        return init(batch_size, device=device, dtype=self.dtype, **extra)

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
        cu_seqlens: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, States]:
        """Logits for ``tokens [B, T]``, continuing from ``states`` (one per layer, ``None``: from scratch).

        Arguments:
            mode: ``"parallel"``, ``"chunkwise"`` (``chunk_size``, default ``config.chunk_size``) or
                ``"recurrent"``; all three give the same logits, and the returned states continue the
                sequence in any mode.
            last_only: return the logits of the last position only (``[B, 1, V]``), as generation needs.
            cu_seqlens: int32/int64 ``[N+1]`` (0, ..., T): ``tokens [1, T]`` holds N sequences packed in one row.
                Each starts at position 0 (or from its row of ``states``), nothing crosses a boundary, and the
                states have N rows; with ``last_only``, the logits are each sequence's last ``[N, 1, V]``
                (zeros for an empty sequence).
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
        packing = Packing.of(cu_seqlens, tokens.shape[1], tokens.device)
        logits, new_states = self._forward(tokens, states, mode, chunk_size, False, packing)
        return (self._last(logits, packing) if last_only else logits), new_states

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
        mask, packing = unpad(attention_mask, B, T, tokens.device)
        packed = tokens[mask][None]  # (1, real tokens)
        if packed.shape[1]:
            self._check_tokens(packed)  # the padding may hold any id
        logits, new_states = self._forward(packed, states, mode, chunk_size, False, packing)
        if last_only:
            return self._last(logits, packing), new_states  # (B, 1, V)
        return repad(logits, mask), new_states

    @staticmethod
    def _last(logits: Tensor, packing: Packing) -> Tensor:
        """Each sequence's last logits ``[N, 1, V]`` from packed ``logits [1, T, V]``; zeros for an empty one."""
        if logits.shape[1] == 0:
            return logits.new_zeros(packing.n, 1, logits.shape[-1])
        last = logits[0, packing.last] * (packing.lengths > 0)[:, None].to(logits.dtype)
        return last[:, None]

    def _forward(
        self,
        tokens: Tensor,
        states: Sequence[MixerState | None],
        mode: str,
        chunk_size: int | None,
        last_only: bool,
        packing: Packing | None = None,
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
                    block, x, state, mode=mode, chunk_size=chunk_size, packing=packing, use_reentrant=False
                )
            else:
                x, state = block(x, state, mode=mode, chunk_size=chunk_size, packing=packing)
            new_states.append(state)
        x = self.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x), new_states  # (B, T, V)

    def stream(
        self,
        prompt: Tensor | Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        prefill_mode: str = "chunkwise",
        chunk_size: int | None = None,
        progress: bool = False,
        compile: bool | str = False,
    ) -> Iterator[Tensor]:
        """Yield the generated tokens one step at a time, each ``[B, 1]``; see ``generate``."""
        tokens = as_token_batch(prompt, self.device)
        if prefill_mode not in ("chunkwise", "parallel", "recurrent"):
            raise ValueError(f"prefill_mode must be 'chunkwise', 'parallel' or 'recurrent', got {prefill_mode!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_sampling(temperature, top_k)
        check_seed(seed)
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be a bool or a torch.compile mode name, got {compile!r}")
        if max_new_tokens:  # now, not at the first token: the states are preallocated for the whole generation
            self.check_state_memory(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        step = self._compiled_step(compile) if compile else self._decode_step
        return self._stream(tokens, max_new_tokens, temperature, top_k, seed, prefill_mode, chunk_size, progress, step)

    def _decode_step(self, token: Tensor, states: States) -> tuple[Tensor, States]:
        """One decode step: logits ``[B, 1, V]`` for ``token [B, 1]`` and the states after it. Shapes never change
        between steps (preallocated caches, positions in tensors), so a compiled step is compiled once."""
        return self._forward(token, states, "recurrent", None, True)

    def _compiled_step(self, mode: bool | str) -> Callable[[Tensor, States], tuple[Tensor, States]]:
        """``_decode_step`` compiled (``mode``: ``True`` for torch.compile's default, or a mode name such as
        ``"reduce-overhead"``), made once per model and mode and reused by later calls."""
        compiled = self.__dict__.setdefault("_compiled_steps", {})
        key = "default" if mode is True else mode
        if key not in compiled:
            options = {} if mode is True else {"mode": mode}
            compiled[key] = torch.compile(self._decode_step, fullgraph=True, dynamic=False, **options)
        return compiled[key]

    def _stream(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        seed: int | None,
        prefill_mode: str,
        chunk_size: int | None,
        progress: bool,
        step: Callable[[Tensor, States], tuple[Tensor, States]],
    ) -> Iterator[Tensor]:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                if max_new_tokens == 0:
                    return
                # KV caches preallocated for the whole generation (checked by ``stream``): written in place.
                states = self.unchecked_states(tokens.shape[0], tokens.shape[1] + max_new_tokens)
                logits, states = self._prefill(tokens, states, prefill_mode, chunk_size, progress)
                for i in range(max_new_tokens):
                    token = sample(logits[:, -1], temperature, top_k, generator)  # (B, 1)
                    yield token
                    if i + 1 < max_new_tokens:
                        logits, states = step(token, states)  # (B, 1, V)
        finally:
            self.train(was_training)

    def _prefill(
        self, tokens: Tensor, states: States, mode: str, chunk_size: int | None, progress: bool
    ) -> tuple[Tensor, States]:
        """The last position's logits and the states after ``tokens``, from ``states``; with ``progress``, a
        prompt longer than ``PREFILL_PIECE`` goes in pieces (the states carry over, so the result is the same up
        to rounding), under a progress bar on stderr (drawn on a terminal only)."""
        T = tokens.shape[1]
        if not progress or T <= PREFILL_PIECE:
            return self(tokens, states, mode=mode, chunk_size=chunk_size, last_only=True)
        from models.progress import Progress

        with Progress(T, "prefill ", unit="tok", leave=False) as bar:
            for start in range(0, T, PREFILL_PIECE):
                piece = tokens[:, start : start + PREFILL_PIECE]
                logits, states = self(piece, states, mode=mode, chunk_size=chunk_size, last_only=True)
                bar.update(start + piece.shape[1])
        return logits, states

    def generate(
        self,
        prompt: Tensor | Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        prefill_mode: str = "chunkwise",
        chunk_size: int | None = None,
        progress: bool = False,
        compile: bool | str = False,
    ) -> Tensor:
        """The prompt followed by ``max_new_tokens`` sampled tokens.

        The prompt (``[T]``, ``[B, T]`` or a list of ids, of an integer dtype) is prefilled in
        ``prefill_mode``, then each token is decoded in recurrent mode from the layers' states. Sampling:
        ``temperature=0`` is greedy; otherwise ``torch.multinomial(softmax(logits / temperature), 1,
        generator=g)`` over the ``top_k`` most likely tokens, with ``g = torch.Generator(device).manual_seed(seed)``
        (``seed=None``: the global RNG), so a fixed seed gives the same tokens every time. A temperature so
        small that ``logits / temperature`` overflows (below about 1e-38) acts as the limit: the most likely
        token (ties split evenly).

        ``progress=True`` shows a progress bar on stderr (on a terminal) while a prompt longer than
        ``PREFILL_PIECE`` tokens is prefilled.

        Attention layers decode against KV caches preallocated for ``T + max_new_tokens`` tokens, after
        ``check_state_memory``: states that would not fit in the device's memory raise ``NotEnoughMemory`` before
        anything is allocated. ``compile=True``
        (or a ``torch.compile`` mode name, such as ``"reduce-overhead"`` for CUDA graphs) compiles the decode
        step, once per model: the first call pays the compilation, later ones reuse it. The tokens are the same
        as without it, up to rounding of the logits.

        Returns:
            ``[B, T + max_new_tokens]`` (``[T + max_new_tokens]`` for a 1-D prompt).
        """
        tokens = as_token_batch(prompt, self.device)
        new = list(
            self.stream(
                tokens,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                prefill_mode=prefill_mode,
                chunk_size=chunk_size,
                progress=progress,
                compile=compile,
            )
        )
        out = torch.cat([tokens, *new], dim=1)
        one_dim = not isinstance(prompt, Tensor) or prompt.dim() == 1
        return out[0] if one_dim else out

    def save(self, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Save weights (safetensors) and config (JSON in the header) to ``path``, atomically."""
        from models.checkpoint import save

        return save(self, path, metadata=metadata)

    def generate_batch(
        self,
        prompts: Sequence[Tensor | Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seeds: int | Sequence[int | None] | None = None,
        eos_token_id: int | None = None,
        prefill_mode: str = "chunkwise",
        chunk_size: int | None = None,
        compile: bool | str = False,
    ) -> list[Tensor]:
        """Generate from prompts of different lengths as one batch: one 1-D tensor (prompt + new tokens) per prompt.

        Row i gives the tokens of ``generate(prompts[i], max_new_tokens[i], seed=seeds[i], ...)`` alone (its own
        generator; ``seeds``: ``None``, one int for every row, or one per prompt). A row stops at
        ``eos_token_id`` (kept) or at its own ``max_new_tokens`` and leaves the batch. See
        ``models.batch_generate.generate_batch``."""
        from models.batch_generate import generate_batch

        return generate_batch(
            self,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seeds=seeds,
            eos_token_id=eos_token_id,
            prefill_mode=prefill_mode,
            chunk_size=chunk_size,
            compile=compile,
        )

    def beam_search(
        self,
        prompts: Sequence[Tensor | Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        num_beams: int,
        eos_token_id: int | None = None,
        length_penalty: float = 1.0,
        prefill_mode: str = "chunkwise",
        chunk_size: int | None = None,
    ) -> list[Tensor]:
        """The best of ``num_beams`` beams for each prompt (prompts of any lengths, one batch): one 1-D tensor
        (prompt + new tokens) per prompt. Beams are scored by the sum of their log-probabilities, the answer chosen
        by ``score / new_tokens ** length_penalty``. See ``models.batch_generate.beam_search``."""
        from models.batch_generate import beam_search

        return beam_search(
            self,
            prompts,
            max_new_tokens,
            num_beams=num_beams,
            eos_token_id=eos_token_id,
            length_penalty=length_penalty,
            prefill_mode=prefill_mode,
            chunk_size=chunk_size,
        )


def _takes(fn: Callable[..., object], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (plugin mixers' ``init_state`` may predate ``max_len``)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def as_token_batch(prompt: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """A prompt as a ``[B, T]`` int64 tensor on ``device``."""
    if not isinstance(prompt, Tensor):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt must be a tensor or a list of int token ids, got {type(prompt).__name__}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"prompt must be a tensor or a list of int token ids, got {_short(list(prompt))}")
        prompt = torch.tensor(list(prompt), dtype=torch.long)
    if prompt.dtype == torch.bool or prompt.is_floating_point() or prompt.is_complex():
        if prompt.dtype == torch.bool:
            why = "True and False are not token ids"
        elif prompt.is_complex():
            why = "a complex 1+2j is not a token"
        else:
            why = "a float 1.5 is not a token"
        raise TypeError(
            f"prompt must hold integer token ids, got dtype {prompt.dtype} ({why}; convert explicitly with "
            ".long() if the values are whole numbers)"
        )
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [T] or [B, T] with at least one token, got shape {list(prompt.shape)}")
    return prompt.to(device=device, dtype=torch.long)


def _short(value: list) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_seed(seed: object) -> None:
    """A seed is ``None`` or an int that ``torch.Generator.manual_seed`` takes (-2**63 <= seed < 2**64)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {seed}")


def check_sampling(temperature: float, top_k: int | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One token per row of ``logits [B, V]``: greedy at temperature 0, else top-k multinomial; ``[B, 1]``.

    A ``top_k`` of at least V keeps every token (no filtering). A temperature so small that ``logits /
    temperature`` overflows float32 draws among the most likely tokens (greedy, ties split evenly), the
    limit of a vanishing temperature, instead of failing on inf/nan probabilities."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    scaled = logits / temperature
    overflow = (scaled.isnan() | scaled.isposinf()).any(dim=-1, keepdim=True)  # (B, 1): 1/temperature overflowed
    limit = torch.where(logits == logits.max(dim=-1, keepdim=True).values, 0.0, -math.inf)  # the T -> 0 limit
    logits = torch.where(overflow, limit, scaled)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


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
