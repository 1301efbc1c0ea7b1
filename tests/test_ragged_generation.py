"""Batched generation from ragged prompts (``generate_batch``) and beam search (``beam_search``).

Each row of a batch must give the tokens of its prompt generated alone (greedy, and sampling with its own seed),
rows stop at EOS or their own budget and leave the batch, and beam search must agree with a brute-force beam
search that recomputes every beam's full-sequence logits without states.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.lm import build_model
from tests.models_helpers import one_thread  # noqa: F401  (fixture)

V = 64
LAYERS = {
    "retnet": ["retention", "retention"],
    "transformer": ["softmax_attention", "softmax_attention"],
    "hybrid": [{"mixer": "retention", "conv_size": 4}, {"mixer": "softmax_attention"}],
}
PROMPTS = [[5, 9, 2, 33, 7], [11], [3, 1, 4, 1, 5, 9, 2, 6, 53], [60, 0, 17]]


def tiny(name: str):
    torch.manual_seed(0)
    config = dict(vocab_size=V, d_model=32, n_layers=2, layers=LAYERS[name], ffn_dim=48)
    config["mixer_options"] = {"retention": {"num_heads": 2}, "softmax_attention": {"num_heads": 2}}
    return build_model(config).eval()


@pytest.fixture(scope="module", params=sorted(LAYERS))
def model(request):
    return tiny(request.param)


def alone(model, prompt, max_new, **kwargs):
    return model.generate(prompt, max_new, **kwargs)


def until_eos(tokens: torch.Tensor, start: int, eos: int) -> torch.Tensor:
    """``tokens`` cut after the first ``eos`` at or after ``start``."""
    hits = (tokens[start:] == eos).nonzero()
    return tokens if not len(hits) else tokens[: start + int(hits[0]) + 1]


def test_greedy_ragged_rows_equal_each_prompt_alone(model):
    budgets = [6, 4, 8, 1]
    out = model.generate_batch(PROMPTS, budgets, temperature=0)
    assert len(out) == len(PROMPTS)
    for prompt, n, row in zip(PROMPTS, budgets, out, strict=True):
        assert row.dtype == torch.long and row.dim() == 1
        assert row.tolist() == alone(model, prompt, n, temperature=0).tolist()


def test_sampling_per_row_seeds_equal_each_prompt_alone(model):
    seeds = [3, 7, 11, 2**40]
    out = model.generate_batch(PROMPTS, 7, temperature=0.9, top_k=20, seeds=seeds)
    for prompt, seed, row in zip(PROMPTS, seeds, out, strict=True):
        assert row.tolist() == alone(model, prompt, 7, temperature=0.9, top_k=20, seed=seed).tolist()


def test_one_int_seed_is_every_rows_seed():
    model = tiny("hybrid")
    out = model.generate_batch(PROMPTS[:3], 5, temperature=1.3, seeds=5)
    for prompt, row in zip(PROMPTS, out, strict=False):
        assert row.tolist() == alone(model, prompt, 5, temperature=1.3, seed=5).tolist()


@pytest.mark.parametrize("prefill_mode", ["parallel", "recurrent"])
def test_other_prefill_modes(prefill_mode):
    model = tiny("hybrid")
    out = model.generate_batch(PROMPTS, 4, temperature=0, prefill_mode=prefill_mode)
    for prompt, row in zip(PROMPTS, out, strict=True):
        assert row.tolist() == alone(model, prompt, 4, temperature=0, prefill_mode=prefill_mode).tolist()


def test_eos_stops_a_row_and_the_others_go_on(model):
    budgets = [8, 8, 8, 8]
    full = [alone(model, p, n, temperature=0) for p, n in zip(PROMPTS, budgets, strict=True)]
    new0 = full[0][len(PROMPTS[0]) :]
    eos = int(new0[2])  # row 0 emits it by its third new token
    out = model.generate_batch(PROMPTS, budgets, temperature=0, eos_token_id=eos)
    expected = [until_eos(f, len(p), eos) for f, p in zip(full, PROMPTS, strict=True)]
    assert [o.tolist() for o in out] == [e.tolist() for e in expected]
    assert out[0][-1] == eos and len(out[0]) <= len(PROMPTS[0]) + 3
    assert any(len(o) == len(p) + 8 for o, p in zip(out, PROMPTS, strict=True)), "some row should run to its budget"


def test_finished_rows_leave_the_batch(monkeypatch):
    model = tiny("transformer")
    sizes = []
    step = model._decode_step

    def counting(token, states):
        sizes.append(token.shape[0])
        return step(token, states)

    monkeypatch.setattr(model, "_decode_step", counting)
    budgets = [1, 3, 5, 0]
    out = model.generate_batch(PROMPTS, budgets, temperature=0)
    assert sizes == [2, 2, 1, 1]  # row 0 leaves after its one token, row 1 after three; row 3 never decodes
    assert [len(o) - len(p) for o, p in zip(out, PROMPTS, strict=True)] == budgets
    assert out[3].tolist() == PROMPTS[3]
    monkeypatch.undo()
    for prompt, n, row in zip(PROMPTS, budgets, out, strict=True):
        assert row.tolist() == alone(model, prompt, n, temperature=0).tolist()


def test_compiled_path_keeps_finished_rows(monkeypatch):
    """With ``compile``, the step's shapes stay fixed: finished rows stay in the batch (checked without compiling,
    through the same code path)."""
    model = tiny("hybrid")
    sizes = []

    def step(token, states):
        sizes.append(token.shape[0])
        return model._decode_step(token, states)

    monkeypatch.setattr(model, "_compiled_step", lambda mode: step)
    budgets = [2, 6, 3, 4]
    out = model.generate_batch(PROMPTS, budgets, temperature=0.8, seeds=[1, 2, 3, 4], compile=True)
    assert sizes == [4] * 5
    for prompt, n, seed, row in zip(PROMPTS, budgets, [1, 2, 3, 4], out, strict=True):
        assert row.tolist() == alone(model, prompt, n, temperature=0.8, seed=seed).tolist()


def test_tensor_prompts_and_zero_budget():
    model = tiny("retnet")
    prompts = [torch.tensor(p, dtype=torch.int32) for p in PROMPTS[:2]]
    out = model.generate_batch(prompts, 0)
    assert [o.tolist() for o in out] == PROMPTS[:2] and all(o.dtype == torch.long for o in out)


def reference_beam_search(model, prompt, max_new, K, eos=None, length_penalty=1.0):
    """Brute force: every beam's next-token log-probs from the full sequence, ``model(seq[None])``, no states."""
    beams = [(0.0, [], False)]  # (score, new tokens, finished)
    for _ in range(max_new):
        candidates = []
        for score, tokens, done in beams:
            if done:
                candidates.append((score, tokens, True))
                continue
            with torch.no_grad():
                logits, _ = model(torch.tensor(prompt + tokens)[None])
            logp = F.log_softmax(logits[0, -1].float(), dim=-1).tolist()
            candidates += [(score + logp[v], [*tokens, v], v == eos) for v in range(V)]
        beams = sorted(candidates, key=lambda c: -c[0])[:K]
        if all(done for _, _, done in beams):
            break
    best = max(beams, key=lambda c: c[0] / len(c[1]) ** length_penalty)
    return prompt + best[1]


def test_beam_search_with_one_beam_is_greedy(model):
    budgets = [6, 4, 8, 2]
    out = model.beam_search(PROMPTS, budgets, num_beams=1)
    for prompt, n, row in zip(PROMPTS, budgets, out, strict=True):
        assert row.tolist() == alone(model, prompt, n, temperature=0).tolist()


def test_beam_search_equals_brute_force_reference(model):
    prompts, budgets = PROMPTS[:3], [5, 3, 4]
    out = model.beam_search(prompts, budgets, num_beams=3)
    for prompt, n, row in zip(prompts, budgets, out, strict=True):
        assert row.tolist() == reference_beam_search(model, prompt, n, 3)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_eos_equals_brute_force_reference(length_penalty):
    model = tiny("hybrid")
    prompts = PROMPTS[:3]
    eos = int(alone(model, prompts[0], 1, temperature=0)[-1])  # the first prompt's best first token finishes a beam
    out = model.beam_search(prompts, 5, num_beams=3, eos_token_id=eos, length_penalty=length_penalty)
    for prompt, row in zip(prompts, out, strict=True):
        assert row.tolist() == reference_beam_search(model, prompt, 5, 3, eos, length_penalty)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(prompts=[[1, 2], []]), ValueError, r"prompts\[1\] must hold at least one token"),
        (dict(prompts=[[1, 2], torch.tensor([], dtype=torch.long)]), ValueError, r"prompts\[1\] must hold at least"),
        (dict(prompts=[]), ValueError, "at least one prompt"),
        (dict(prompts=[1, 2, 3]), TypeError, r"prompts\[0\]: prompt must be a tensor or a list"),
        (dict(prompts=torch.ones(2, 3, dtype=torch.long)), TypeError, "prompts must be a list"),
        (dict(prompts=[torch.ones(1, 3, dtype=torch.long)]), ValueError, r"prompts\[0\] must be a 1-D.*\[1, 3\]"),
        (dict(prompts=[[1], [2, V]]), ValueError, r"prompts\[1\]: token ids must be in \[0, vocab_size=64\)"),
        (dict(max_new_tokens=[1, 2, 3]), ValueError, r"one per prompt \(2\), got a list of 3"),
        (dict(max_new_tokens=[1, -1]), ValueError, r"max_new_tokens\[1\] must be an int >= 0, got -1"),
        (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be an int >= 0, got 2.0"),
        (dict(seeds=[1]), ValueError, r"one seed per prompt \(2\), got 1"),
        (dict(seeds=[1, "a"]), TypeError, r"seeds\[1\]: seed must be an int or None"),
        (dict(seeds=1.5), TypeError, "seeds must be None, an int or a list"),
        (dict(eos_token_id=V), ValueError, r"eos_token_id must be None or a token id in \[0, vocab_size=64\), got 64"),
        (dict(temperature=-1), ValueError, "temperature must be a number >= 0"),
        (dict(prefill_mode="fast"), ValueError, "prefill_mode must be"),
    ],
)
def test_generate_batch_bad_inputs(kwargs, error, message):
    model = tiny("retnet")
    args = dict(prompts=[[1, 2], [3]], max_new_tokens=2) | kwargs
    with pytest.raises(error, match=message):
        model.generate_batch(args.pop("prompts"), args.pop("max_new_tokens"), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=0), r"num_beams must be an int in \[1, vocab_size=64\], got 0"),
        (dict(num_beams=V + 1), r"num_beams must be an int in \[1, vocab_size=64\], got 65"),
        (dict(num_beams=2, eos_token_id=-1), "eos_token_id must be None or a token id"),
        (dict(num_beams=2, length_penalty=math.inf), "length_penalty must be a finite number"),
    ],
)
def test_beam_search_bad_inputs(kwargs, message):
    model = tiny("retnet")
    with pytest.raises(ValueError, match=message):
        model.beam_search([[1, 2], [3]], 2, **kwargs)


def test_cli_several_prompts_and_beams(tmp_path, capsys):
    from models import cli
    from models.checkpoint import load
    from models.training.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    config = dict(d_model=16, n_layers=2, layers=LAYERS["hybrid"], ffn_dim=16)
    config["mixer_options"] = {"retention": {"num_heads": 2}, "softmax_attention": {"num_heads": 2}}
    path = tmp_path / "model.safetensors"
    build_model(config).save(path)
    model = load(path)
    base = ["generate", str(path), "--max-new-tokens", "6", "--seed", "4", "--threads", "1"]

    assert cli.main([*base, "--prompt", "ab", "--prompt", "xyz!"]) == 0
    out, err = capsys.readouterr()
    corpus = ByteTokenizer()
    texts = [corpus.decode(model.generate(corpus.encode(p), 6, temperature=0.8, seed=4)) for p in ("ab", "xyz!")]
    assert out == f"==> prompt 1 <==\n{texts[0]}\n\n==> prompt 2 <==\n{texts[1]}\n" and "ms/token" in err

    assert cli.main([*base, "--prompt", "ab", "--beams", "2"]) == 0
    best = model.beam_search([corpus.encode("ab")], 6, num_beams=2)[0]
    assert capsys.readouterr().out == corpus.decode(best) + "\n"
    assert cli.main([*base, "--beams", "300"]) == 2
    assert "--beams must be at most the vocabulary size 256, got 300" in capsys.readouterr().err
