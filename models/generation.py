"""Generation from a language model: sampling, ``generate`` and ``stream``, batched generation, beam search.

``generate`` prefills the prompt in chunkwise (or parallel) mode and then decodes token by token in recurrent
mode: constant time and memory per token for the recurrent layers. Attention layers decode against a KV cache
preallocated for the whole generation and written in place (the static decode path, as gpt-fast has it): every
decode step has the same shapes, with positions as tensors, so ``generate(compile=True)`` compiles the step once
and reuses it.

``generate_batch`` and ``beam_search`` prefill prompts of different lengths together: left-padded into one
``[B, T]`` batch with an ``attention_mask``, which the model unpads once (each row's real tokens run as their
own sequence from position 0), into states preallocated for each row's prompt and new tokens. Decoding then
goes on in recurrent mode without any mask: each layer's state carries per-row positions and KV caches per-row
lengths, so the rows may be at different positions. A finished row (or prompt) is dropped from the batch with
``MixerState.reorder``, and beam search follows its surviving beams the same way.

Everything first checks that its states fit in the device's memory (``LanguageModel.check_state_memory``,
counting the copies a ``reorder`` makes) and raises ``NotEnoughMemory`` before allocating anything if they do
not. The model keeps the forward pass and its states; ``Generation`` gives it these methods.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from models.lm import LanguageModel, States

    Step = Callable[[Tensor, States], tuple[Tensor, States]]

PREFILL_MODES = ("chunkwise", "parallel", "recurrent")
# A prompt longer than this is prefilled in pieces of this many tokens when a progress bar is asked for.
PREFILL_PIECE = 1024


class Generation:
    """The generation methods of ``LanguageModel``, which inherits them. They use only what the model offers
    everyone (``device``, ``config``, calling it, ``unchecked_states``, ``check_state_memory``) and its
    unchecked ``_forward`` for the decode step."""

    def stream(
        self: LanguageModel,
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
        _check_prefill_mode(prefill_mode)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_sampling(temperature, top_k)
        check_seed(seed)
        _check_compile(compile)
        if max_new_tokens:  # now, not at the first token: the states are preallocated for the whole generation
            self.check_state_memory(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        step = self._compiled_step(compile) if compile else self._decode_step
        return self._stream(tokens, max_new_tokens, temperature, top_k, seed, prefill_mode, chunk_size, progress, step)

    def generate(
        self: LanguageModel,
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

    def generate_batch(
        self: LanguageModel,
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
        """Each prompt followed by its new tokens, for prompts of different lengths generated as one batch.

        Row i gives the same tokens as ``generate(prompts[i], max_new_tokens[i], seed=seeds[i], ...)`` alone (up
        to rounding of the logits, which the batch computes with other shapes): each row draws from its own
        ``torch.Generator`` with ``sample(logits[i:i+1], ...)``, as ``generate`` does. A row stops at
        ``eos_token_id`` (kept in its output) or at its own ``max_new_tokens``, and is dropped from the batch
        (``MixerState.reorder``) so that it costs nothing afterwards.

        Arguments:
            prompts: a list of 1-D token sequences (lists of ints or integer tensors), each at least one token long.
            max_new_tokens: an int for every prompt, or a list with one per prompt.
            temperature, top_k: as in ``generate`` (``temperature=0``: greedy).
            seeds: ``None`` (the global RNG, rows drawn in order at each step: not the tokens of each prompt
                alone), an int (every row uses that seed: row i is ``generate(prompts[i], ..., seed=seeds)``),
                or a list of one seed (int or ``None``) per prompt. Each row with a seed draws from its own
                ``torch.Generator`` seeded with it, so its tokens are those of its prompt generated alone.
            eos_token_id: a row that emits this token stops there (the token is kept in its output); the others
                go on.
            prefill_mode, chunk_size: how the prompts are prefilled (``"chunkwise"``, ``"parallel"``,
                ``"recurrent"``).
            compile: compile the decode step (as ``generate(compile=...)``). A compiled step keeps its shapes, so
                finished rows then stay in the batch (their outputs ignored) instead of being dropped.

        Returns:
            One 1-D int64 tensor per prompt: the prompt, then its new tokens (up to its ``max_new_tokens``, fewer
            if it stopped at ``eos_token_id``).
        """
        rows = _check_prompts(self, prompts)
        n = len(rows)
        budgets = _per_prompt(max_new_tokens, n)
        check_sampling(temperature, top_k)
        row_seeds = _check_seeds(seeds, n)
        _check_eos(eos_token_id, self.config.vocab_size)
        _check_prefill_mode(prefill_mode)
        _check_compile(compile)

        new: list[list[int]] = [[] for _ in range(n)]
        batch = [i for i in range(n) if budgets[i] > 0]  # the prompt index of each batch row
        if batch:
            device = self.device
            generators = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in row_seeds]
            step = self._compiled_step(compile) if compile else self._decode_step
            lengths = [rows[i].numel() for i in batch]
            if compile:  # finished rows keep writing to their caches until the last row stops
                max_len = max(lengths) + max(budgets[i] for i in batch)
            else:
                max_len = max(t + budgets[i] for t, i in zip(lengths, batch, strict=True))
            # Dropping finished rows copies the states (reorder) while the old ones are still held.
            self.check_state_memory(len(batch), max_len, copies=1 if compile or len(batch) == 1 else 2)
            with _eval(self), torch.no_grad():
                logits, states = self._prefill_rows([rows[i] for i in batch], max_len, prefill_mode, chunk_size)
                done = [False] * len(batch)  # only compiled decoding keeps finished rows
                while True:
                    token = _draw(logits, batch, done, temperature, top_k, generators)  # (B, 1)
                    for r, (i, t) in enumerate(zip(batch, token[:, 0].tolist(), strict=True)):
                        if not done[r]:
                            new[i].append(t)
                            done[r] = len(new[i]) >= budgets[i] or t == eos_token_id
                    if all(done):
                        break
                    if not compile and any(done):  # drop the finished rows: they cost nothing from here on
                        keep = [r for r in range(len(batch)) if not done[r]]
                        index = torch.tensor(keep, device=device)
                        states = [s.reorder(index) for s in states]
                        token = token.index_select(0, index)
                        batch = [batch[r] for r in keep]
                        done = [False] * len(batch)
                    logits, states = step(token, states)
                    logits = logits[:, -1]
        return [torch.cat([rows[i], rows[i].new_tensor(new[i])]) for i in range(n)]

    def beam_search(
        self: LanguageModel,
        prompts: Sequence[Tensor | Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        num_beams: int,
        eos_token_id: int | None = None,
        length_penalty: float = 1.0,
        prefill_mode: str = "chunkwise",
        chunk_size: int | None = None,
    ) -> list[Tensor]:
        """The best continuation of each prompt found by beam search, the prompts (of any lengths) as one batch.

        Each prompt keeps ``num_beams`` beams (B * K rows of state), scored by the sum of their new tokens'
        log-probabilities (``log_softmax`` in float32). At every step each unfinished beam offers its V
        continuations, a finished one only itself (unchanged score), and the K best of these per prompt survive
        (``torch.topk``, ties to the lower index): the states are reordered to them with ``MixerState.reorder``. A
        beam finishes when it emits ``eos_token_id`` (kept in its tokens); a prompt stops when all its beams have
        finished or after its own ``max_new_tokens`` steps, and its rows are dropped from the batch. Its answer is
        then the beam with the highest ``score / new_tokens ** length_penalty`` (``length_penalty=0``: the raw
        sum; the default 1: the mean log-probability per token, so that shorter finished beams are not favoured
        merely for being short). ``num_beams=1`` is greedy decoding.

        Arguments:
            prompts: a list of 1-D token sequences (lists of ints or integer tensors), each at least one token long.
            max_new_tokens: an int for every prompt, or a list with one per prompt.
            num_beams: K, between 1 and the vocabulary size.
            prefill_mode, chunk_size: how the prompts are prefilled.

        Returns:
            One 1-D int64 tensor per prompt: the prompt, then the best beam's new tokens.
        """
        rows = _check_prompts(self, prompts)
        n = len(rows)
        budgets = _per_prompt(max_new_tokens, n)
        V = self.config.vocab_size
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or not 1 <= num_beams <= V:
            raise ValueError(f"num_beams must be an int in [1, vocab_size={V}], got {num_beams!r}")
        _check_eos(eos_token_id, V)
        if (
            isinstance(length_penalty, bool)
            or not isinstance(length_penalty, (int, float))
            or not math.isfinite(length_penalty)
        ):
            raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
        _check_prefill_mode(prefill_mode)

        K = num_beams
        best = {i: rows[i] for i in range(n) if budgets[i] == 0}
        batch = [i for i in range(n) if budgets[i] > 0]  # the prompt index of each group of K rows
        if batch:
            device = self.device
            max_len = max(rows[i].numel() + budgets[i] for i in batch)
            # K rows per prompt, copied by every step's reorder while the old ones are still held.
            self.check_state_memory(len(batch) * K, max_len, copies=2)
            with _eval(self), torch.no_grad():
                logits, states = self._prefill_rows([rows[i] for i in batch], max_len, prefill_mode, chunk_size)
                P = len(batch)
                expand = torch.arange(P, device=device).repeat_interleave(K)  # each prompt's state to its K beams
                states = [s.reorder(expand) for s in states]
                logp = F.log_softmax(logits.float(), dim=-1).index_select(0, expand)  # (P K, V)
                scores = torch.full((P, K), -math.inf, device=device)
                scores[:, 0] = 0.0  # one beam at the start: the K first survivors are K different tokens
                seqs = torch.empty(P, K, 0, dtype=torch.long, device=device)  # new tokens (EOS repeated once finished)
                counts = torch.zeros(P, K, dtype=torch.long, device=device)  # new tokens up to and with EOS
                finished = torch.zeros(P, K, dtype=torch.bool, device=device)
                frozen = torch.full((V,), -math.inf, device=device)
                if eos_token_id is not None:
                    frozen[eos_token_id] = 0.0  # a finished beam's one continuation: itself (EOS again), score kept
                steps = 0
                while True:
                    P = len(batch)
                    lp = torch.where(finished[..., None], frozen, logp.view(P, K, V))
                    top, idx = (scores[..., None] + lp).view(P, K * V).topk(K, dim=-1)  # (P, K), best first
                    beam, token = idx // V, idx % V
                    scores = top
                    seqs = torch.cat(
                        [seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), token[..., None]], 2
                    )
                    was_finished = finished.gather(1, beam)
                    counts = counts.gather(1, beam) + (~was_finished).long()
                    finished = was_finished | (token == eos_token_id) if eos_token_id is not None else was_finished
                    steps += 1
                    limits = torch.tensor([budgets[i] for i in batch], device=device)
                    stop = (finished.all(dim=1) | (steps >= limits)).tolist()
                    for p, i in enumerate(batch):
                        if stop[p]:
                            final = scores[p] / counts[p].double().pow(length_penalty)
                            b = int(final.argmax())
                            best[i] = torch.cat([rows[i], seqs[p, b, : int(counts[p, b])].to(rows[i].device)])
                    keep = [p for p in range(P) if not stop[p]]
                    if not keep:
                        break
                    kept = torch.tensor(keep, device=device)
                    rows_index = (kept[:, None] * K + beam.index_select(0, kept)).flatten()  # the survivors' states
                    states = [s.reorder(rows_index) for s in states]
                    token = token.index_select(0, kept).reshape(-1, 1)  # (P' K, 1)
                    scores, seqs, counts, finished = (t.index_select(0, kept) for t in (scores, seqs, counts, finished))
                    batch = [batch[p] for p in keep]
                    logits, states = self._decode_step(token, states)
                    logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        return [best[i] for i in range(n)]

    def _decode_step(self: LanguageModel, token: Tensor, states: States) -> tuple[Tensor, States]:
        """One decode step: logits ``[B, 1, V]`` for ``token [B, 1]`` and the states after it. Shapes never change
        between steps (preallocated caches, positions in tensors), so a compiled step is compiled once."""
        return self._forward(token, states, "recurrent", None, True)

    def _compiled_step(self: LanguageModel, mode: bool | str) -> Step:
        """``_decode_step`` compiled (``mode``: ``True`` for torch.compile's default, or a mode name such as
        ``"reduce-overhead"``), made once per model and mode and reused by later calls."""
        compiled = self.__dict__.setdefault("_compiled_steps", {})
        key = "default" if mode is True else mode
        if key not in compiled:
            options = {} if mode is True else {"mode": mode}
            compiled[key] = torch.compile(self._decode_step, fullgraph=True, dynamic=False, **options)
        return compiled[key]

    def _stream(
        self: LanguageModel,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        seed: int | None,
        prefill_mode: str,
        chunk_size: int | None,
        progress: bool,
        step: Step,
    ) -> Iterator[Tensor]:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with _eval(self), torch.no_grad():
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

    def _prefill(
        self: LanguageModel, tokens: Tensor, states: States, mode: str, chunk_size: int | None, progress: bool
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

    def _prefill_rows(
        self: LanguageModel, rows: list[Tensor], max_len: int, mode: str, chunk_size: int | None
    ) -> tuple[Tensor, States]:
        """The last prompt token's logits ``[B, V]`` and the states after the prompts ``rows``, prefilled as one
        left-padded batch (the mask keeps the padding out of every layer) into states preallocated for ``max_len``
        tokens."""
        T = max(r.numel() for r in rows)
        tokens = rows[0].new_zeros(len(rows), T)
        mask = torch.zeros(len(rows), T, dtype=torch.bool, device=tokens.device)
        for b, r in enumerate(rows):
            tokens[b, T - r.numel() :] = r
            mask[b, T - r.numel() :] = True
        states = self.unchecked_states(len(rows), max_len)  # the caller checked the memory, copies included
        logits, states = self(tokens, states, mode=mode, chunk_size=chunk_size, last_only=True, attention_mask=mask)
        return logits[:, -1], states


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


def _check_prefill_mode(mode: object) -> None:
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill_mode must be 'chunkwise', 'parallel' or 'recurrent', got {mode!r}")


def _check_compile(compile: object) -> None:
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be a bool or a torch.compile mode name, got {compile!r}")


def _draw(
    logits: Tensor,
    batch: list[int],
    done: list[bool],
    temperature: float,
    top_k: int | None,
    generators: list[torch.Generator | None],
) -> Tensor:
    """The next token of each row ``[B, 1]``: greedy for all at once, else one ``sample`` per row from its own
    generator, as generating it alone would draw (rows already done draw nothing and get token 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    tokens = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)
    for r, i in enumerate(batch):
        if not done[r]:
            tokens[r] = sample(logits[r : r + 1], temperature, top_k, generators[i])[0]
    return tokens


@contextlib.contextmanager
def _eval(model: LanguageModel) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the duration, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_prompts(model: LanguageModel, prompts: object) -> list[Tensor]:
    """Each prompt as a 1-D int64 tensor on the model's device, its ids checked against the vocabulary."""
    if isinstance(prompts, (str, bytes, Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of 1-D token sequences (lists of ints or tensors), got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty list")
    V = model.config.vocab_size
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, Tensor) and prompt.dim() != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D token sequence, got a tensor of shape {list(prompt.shape)}")
        if (isinstance(prompt, Tensor) and prompt.numel() == 0) or (
            isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) == 0
        ):
            raise ValueError(f"prompts[{i}] must hold at least one token, got an empty prompt")
        try:
            row = as_token_batch(prompt, model.device)
        except (TypeError, ValueError) as error:
            raise type(error)(f"prompts[{i}]: {error}") from None
        if row.shape[0] != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D token sequence, got shape {list(row.shape)}")
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"prompts[{i}]: token ids must be in [0, vocab_size={V}), got values in [{lo}, {hi}]")
        rows.append(row[0])
    return rows


def _per_prompt(max_new_tokens: object, n: int) -> list[int]:
    """``max_new_tokens`` (one int, or one per prompt) as a list of ``n`` ints >= 0."""
    if isinstance(max_new_tokens, (list, tuple)):
        if len(max_new_tokens) != n:
            raise ValueError(
                f"max_new_tokens must be an int or a list with one per prompt ({n}), got a list of "
                f"{len(max_new_tokens)}"
            )
        values = list(max_new_tokens)
    else:
        values = [max_new_tokens] * n
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            where = "" if not isinstance(max_new_tokens, (list, tuple)) else f"[{i}]"
            raise ValueError(f"max_new_tokens{where} must be an int >= 0, got {value!r}")
    return values


def _check_seeds(seeds: object, n: int) -> list[int | None]:
    """``seeds`` (``None``, one int for every row, or one seed per prompt) as a list of ``n``."""
    if seeds is None or (isinstance(seeds, int) and not isinstance(seeds, bool)):
        check_seed(seeds)
        return [seeds] * n
    if not isinstance(seeds, (list, tuple)):
        raise TypeError(f"seeds must be None, an int or a list with one seed per prompt, got {type(seeds).__name__}")
    if len(seeds) != n:
        raise ValueError(f"seeds must be None, an int or a list with one seed per prompt ({n}), got {len(seeds)}")
    for i, seed in enumerate(seeds):
        try:
            check_seed(seed)
        except (TypeError, ValueError) as error:
            raise type(error)(f"seeds[{i}]: {error}") from None
    return list(seeds)


def _check_eos(eos_token_id: object, V: int) -> None:
    if eos_token_id is None:
        return
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < V:
        raise ValueError(f"eos_token_id must be None or a token id in [0, vocab_size={V}), got {eos_token_id!r}")
