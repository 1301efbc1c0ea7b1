"""Batched generation from prompts of different lengths, and beam search.

Both prefill the prompts together: left-padded into one ``[B, T]`` batch with an ``attention_mask``, which the
model unpads once (each row's real tokens run as their own sequence from position 0), into states preallocated
for each row's prompt and new tokens. Decoding then goes on in recurrent mode without any mask: each layer's
state carries per-row positions and KV caches per-row lengths, so the rows may be at different positions.

``generate_batch``: row i gives the same tokens as ``model.generate(prompts[i], max_new_tokens[i],
seed=seeds[i], ...)`` alone (up to rounding of the logits, which the batch computes with other shapes): each
row draws from its own ``torch.Generator`` with ``sample(logits[i:i+1], ...)``, as ``generate`` does. A row
stops at ``eos_token_id`` (kept in its output) or at its own ``max_new_tokens``, and is dropped from the
batch (``MixerState.reorder``) so that it costs nothing afterwards.

``beam_search``: ``num_beams`` beams per prompt, scored by the sum of their tokens' log-probabilities; the
states follow the surviving beams through ``reorder`` after every step.

Both first check that their states fit in the device's memory (``LanguageModel.check_state_memory``, counting
the copies a ``reorder`` makes) and raise ``NotEnoughMemory`` before allocating anything if they do not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.lm import LanguageModel, States, as_token_batch, check_sampling, check_seed, sample

PREFILL_MODES = ("chunkwise", "parallel", "recurrent")


def generate_batch(
    model: LanguageModel,
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

    Arguments:
        prompts: a list of 1-D token sequences (lists of ints or integer tensors), each at least one token long.
        max_new_tokens: an int for every prompt, or a list with one per prompt.
        temperature, top_k: as in ``LanguageModel.generate`` (``temperature=0``: greedy).
        seeds: ``None`` (the global RNG, rows drawn in order at each step: not the tokens of each prompt
            alone), an int (every row uses that seed: row i is ``model.generate(prompts[i], ..., seed=seeds)``),
            or a list of one seed (int or ``None``) per prompt. Each row with a seed draws from its own
            ``torch.Generator`` seeded with it, so its tokens are those of its prompt generated alone.
        eos_token_id: a row that emits this token stops there (the token is kept in its output); the others go on.
        prefill_mode, chunk_size: how the prompts are prefilled (``"chunkwise"``, ``"parallel"``, ``"recurrent"``).
        compile: compile the decode step (as ``generate(compile=...)``). A compiled step keeps its shapes, so
            finished rows then stay in the batch (their outputs ignored) instead of being dropped.

    Returns:
        One 1-D int64 tensor per prompt: the prompt, then its new tokens (up to its ``max_new_tokens``, fewer if
        it stopped at ``eos_token_id``).
    """
    rows = _check_prompts(model, prompts)
    n = len(rows)
    budgets = _per_prompt(max_new_tokens, n)
    check_sampling(temperature, top_k)
    row_seeds = _check_seeds(seeds, n)
    _check_eos(eos_token_id, model.config.vocab_size)
    _check_prefill_mode(prefill_mode)
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be a bool or a torch.compile mode name, got {compile!r}")

    new: list[list[int]] = [[] for _ in range(n)]
    batch = [i for i in range(n) if budgets[i] > 0]  # the prompt index of each batch row
    if batch:
        device = model.device
        generators = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in row_seeds]
        step = model._compiled_step(compile) if compile else model._decode_step
        lengths = [rows[i].numel() for i in batch]
        if compile:  # finished rows keep writing to their caches until the last row stops
            max_len = max(lengths) + max(budgets[i] for i in batch)
        else:
            max_len = max(t + budgets[i] for t, i in zip(lengths, batch, strict=True))
        # Dropping finished rows copies the states (reorder) while the old ones are still held.
        model.check_state_memory(len(batch), max_len, copies=1 if compile or len(batch) == 1 else 2)
        with _eval(model), torch.no_grad():
            logits, states = _prefill(model, [rows[i] for i in batch], max_len, prefill_mode, chunk_size)
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
    model: LanguageModel,
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
    rows = _check_prompts(model, prompts)
    n = len(rows)
    budgets = _per_prompt(max_new_tokens, n)
    V = model.config.vocab_size
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
        device = model.device
        max_len = max(rows[i].numel() + budgets[i] for i in batch)
        # K rows per prompt, copied by every step's reorder while the old ones are still held.
        model.check_state_memory(len(batch) * K, max_len, copies=2)
        with _eval(model), torch.no_grad():
            logits, states = _prefill(model, [rows[i] for i in batch], max_len, prefill_mode, chunk_size)
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
                seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), token[..., None]], 2)
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
                logits, states = model._decode_step(token, states)
                logp = F.log_softmax(logits[:, -1].float(), dim=-1)
    return [best[i] for i in range(n)]


def _prefill(
    model: LanguageModel, rows: list[Tensor], max_len: int, mode: str, chunk_size: int | None
) -> tuple[Tensor, States]:
    """The last prompt token's logits ``[B, V]`` and the states after the prompts, prefilled as one left-padded
    batch (the mask keeps the padding out of every layer) into states preallocated for ``max_len`` tokens."""
    T = max(r.numel() for r in rows)
    tokens = rows[0].new_zeros(len(rows), T)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=tokens.device)
    for b, r in enumerate(rows):
        tokens[b, T - r.numel() :] = r
        mask[b, T - r.numel() :] = True
    states = model.unchecked_states(len(rows), max_len)  # the caller checked the memory, copies included
    logits, states = model(tokens, states, mode=mode, chunk_size=chunk_size, last_only=True, attention_mask=mask)
    return logits[:, -1], states


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


def _check_prefill_mode(mode: object) -> None:
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill_mode must be 'chunkwise', 'parallel' or 'recurrent', got {mode!r}")
