"""The transformers integration (``models.hf``): config and Auto classes, save/load, generation through
transformers (greedy, sampling, batched ragged prompts, beam search) against ours and against a reference beam
search, pipeline with our BPE tokenizer, gradient checkpointing, and the Trainer's loss against our trainer's."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import models.lm  # noqa: E402
from mixers.registry import get_registry  # noqa: E402
from models import hf  # noqa: E402
from models.config import ConfigError, ModelConfig, TrainConfig  # noqa: E402
from models.training.data import IGNORE  # noqa: E402
from models.training.loop import train_step  # noqa: E402
from models.training.optim import lr_at, make_optimizer  # noqa: E402
from models.training.parallel import Layout, World  # noqa: E402
from models.training.state import TrainState  # noqa: E402
from models.training.tokenizers import BPETokenizer  # noqa: E402
from tests.models_helpers import one_thread, tiny_config  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
HYBRID = {
    "vocab_size": 64,
    "d_model": 32,
    "n_layers": 2,
    "layers": ["retention", {"mixer": "softmax_attention", "ffn_dim": 48}],
    "mixer_options": {"retention": {"num_heads": 2}, "softmax_attention": {"num_heads": 2}},
}


def hybrid(seed: int = 0, **overrides) -> hf.SeqMixersForCausalLM:
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model("seqmixers", **(HYBRID | overrides))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    return ids, mask


def test_only_models_hf_imports_transformers():
    """``models`` works without transformers: no other module of ``mixers`` or ``models`` imports it (imports
    inside functions included), or imports ``models.hf``."""
    for path in sorted([*(ROOT / "models").rglob("*.py"), *(ROOT / "mixers").rglob("*.py")]):
        if path == ROOT / "models" / "hf.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "transformers" and name != "models.hf", f"{path}:{node.lineno}: {name}"


def test_config_takes_the_model_config_fields_and_auto_classes_build_it():
    config = transformers.AutoConfig.for_model("seqmixers", **HYBRID)
    assert isinstance(config, hf.SeqMixersConfig)
    assert config.model_config() == ModelConfig(**HYBRID)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert isinstance(model, hf.SeqMixersForCausalLM)
    assert [b.mixer.ops for b in model.model.blocks] == [("retention",), ("softmax_attention",)]
    assert isinstance(transformers.AutoModel.from_config(config), hf.SeqMixersForCausalLM)
    with pytest.raises(ConfigError, match="d_modle"):
        transformers.AutoConfig.for_model("seqmixers", d_modle=32)
    with pytest.raises(ConfigError, match="d_model must be an int >= 1"):
        transformers.AutoConfig.for_model("seqmixers", d_model=0)


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_from_pretrained_exact(tmp_path, tie):
    model = hybrid(tie_embeddings=tie, mixer_options=HYBRID["mixer_options"] | {"retention": {"num_heads": 4}})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(hf.FIELDS) <= saved.keys()  # every field, so a later change of a default cannot change this model
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.model_config() == model.config.model_config()
    where = {"_name_or_path"}  # the one difference: where it was loaded from
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in where} == {
        k: v for k, v in model.config.to_dict().items() if k not in where
    }
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert (loaded.model.lm_head.weight is loaded.model.tok_emb.weight) == tie
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generate_greedy_and_seeded_sampling_equal_ours():
    model = hybrid()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, model.model.generate(ids, 8, temperature=0))
    torch.manual_seed(5)
    sampled = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=10)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.model.generate(ids, 8, temperature=0.8, top_k=10))
    torch.manual_seed(6)
    other = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=10)
    assert not torch.equal(other, sampled)  # the seed decides the draw: the comparison above can fail


def test_the_cache_continues_the_sequence_and_is_preallocated_for_generate():
    model = hybrid()
    ids = torch.randint(0, 64, (2, 11))
    whole = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    cache = first.past_key_values
    assert isinstance(cache, hf.SeqMixersCache) and cache.get_seq_length() == 6
    step = model(ids[:, 6:7], past_key_values=cache)  # recurrent mode
    rest = model(ids[:, 7:], past_key_values=cache)  # chunkwise from the states
    pieces = torch.cat([first.logits, step.logits, rest.logits], dim=1)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="SeqMixersCache"):
        model(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(ValueError, match="SeqMixersCache: cache_implementation must be None"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")
    out = model.generate(ids[:, :7], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    kv = out.past_key_values.states[1].op  # the attention layer's KV cache: made for the 11 tokens it was fed
    assert kv.k.shape[2] == 11 and kv.length.tolist() == [11, 11]


def test_the_cache_selects_repeats_and_refuses_to_crop_rows():
    model = hybrid()
    ids = torch.randint(0, 64, (2, 8))
    cache = model(ids[:, :5], use_cache=True).past_key_values
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.batch_size == 1
    alone = model(ids[1:, :5], use_cache=True).past_key_values
    torch.testing.assert_close(
        model(ids[1:, 5:], past_key_values=cache).logits, model(ids[1:, 5:], past_key_values=alone).logits
    )
    cache = model(ids[:, :5], use_cache=True).past_key_values
    cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    twice = model(ids[:, 5:].repeat_interleave(2, 0), past_key_values=cache).logits
    torch.testing.assert_close(twice, model(ids).logits[:, 5:].repeat_interleave(2, 0), rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)
    cache.reset()
    assert cache.states is None and cache.get_seq_length() == 0


def test_batched_ragged_generation_equals_ours():
    model = hybrid()
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 11], [13]]
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.model.generate_batch(prompts, 6, temperature=0)
    for b, p in enumerate(prompts):
        assert out[b, ids.shape[1] :].tolist() == ours[b][len(p) :].tolist(), b
        alone = model.model.generate(p, 6, temperature=0)  # each row as if it were generated alone
        assert out[b, ids.shape[1] :].tolist() == alone[len(p) :].tolist(), b


@pytest.mark.parametrize("mixer", sorted(get_registry().mixers))
def test_every_registered_mixer_generates_through_transformers_as_ours(mixer):
    """Each registered mixer (plugins' too) in a hybrid with attention: batched ragged greedy decoding and beam
    search through transformers give our tokens."""
    torch.manual_seed(0)
    config = tiny_config([mixer, "softmax_attention"], vocab_size=64, d_model=32)
    model = hf.SeqMixersForCausalLM(hf.SeqMixersConfig.from_model_config(config)).eval()
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4]]
    ids, mask = left_padded(prompts)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    ours = model.model.generate_batch(prompts, 4, temperature=0)
    our_beams = model.model.beam_search(prompts, 3, num_beams=2)
    for b, p in enumerate(prompts):
        assert greedy[b, ids.shape[1] :].tolist() == ours[b][len(p) :].tolist(), b
        assert beams[b, ids.shape[1] :].tolist() == our_beams[b][len(p) :].tolist(), b


def test_from_language_model_copies_our_model():
    torch.manual_seed(0)
    lm = models.lm.build_model(ModelConfig(**HYBRID, tie_embeddings=True))
    model = hf.from_language_model(lm, eos_token_id=3)
    assert model.config.model_config() == lm.config and model.config.eos_token_id == 3
    assert model.model.lm_head.weight is model.model.tok_emb.weight
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(model(ids).logits, lm(ids)[0])


def reference_beam_search(model: hf.SeqMixersForCausalLM, prompt: list[int], num_beams: int, steps: int) -> list[int]:
    """Beam search from the definition: every beam's continuations scored by the sum of their log-probabilities
    (each prefix run whole, from scratch, no state), the best ``num_beams`` kept; the best beam at the end."""
    beams = [(0.0, list(prompt))]
    with torch.no_grad():
        for _ in range(steps):
            candidates = []
            for score, seq in beams:
                logits = model.model(torch.tensor([seq]))[0][0, -1]
                logp = F.log_softmax(logits.double(), dim=-1)
                candidates += [(score + float(lp), seq + [t]) for t, lp in enumerate(logp)]
            beams = sorted(candidates, key=lambda c: -c[0])[:num_beams]
    return beams[0][1]


def test_beam_search_reorders_states_and_equals_a_reference():
    model = hybrid()
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4]]
    ids, mask = left_padded(prompts)
    calls = []
    reorder = hf.SeqMixersCache.reorder_cache
    hf.SeqMixersCache.reorder_cache = lambda self, index: (calls.append(index.clone()), reorder(self, index))[1]
    try:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    finally:
        hf.SeqMixersCache.reorder_cache = reorder
    assert calls and any(not torch.equal(c, torch.arange(6)) for c in calls)  # the states were really reordered
    for b, p in enumerate(prompts):
        best = reference_beam_search(model, p, 3, 4)
        assert out[b, ids.shape[1] :].tolist() == best[len(p) :], b
        assert model.model.beam_search([p], 4, num_beams=3)[0].tolist() == best


def test_pipeline_with_our_bpe_tokenizer_saved_beside_the_model(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20 + "a stitch in time saves nine. " * 20
    bpe = BPETokenizer.train([text], vocab_size=280, show_progress=False)
    model = hybrid(vocab_size=bpe.vocab_size)
    model.save_pretrained(tmp_path)
    tokenizer = hf.transformers_tokenizer(bpe)
    tokenizer.save_pretrained(tmp_path)
    prompt = "the quick brown"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(prompt).keys() == {"input_ids", "attention_mask"}
    assert loaded(prompt)["input_ids"] == bpe.encode(prompt)
    assert loaded.decode(bpe.encode(text[:200])) == text[:200]
    generator = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    result = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ours = model.model.generate(bpe.encode(prompt), 6, temperature=0)
    assert result == bpe.decode(ours)
    with pytest.raises(TypeError, match="BPETokenizer"):
        hf.transformers_tokenizer(object())


def test_gradient_checkpointing_through_the_transformers_switch(monkeypatch):
    model = hybrid().train()
    ids = torch.randint(0, 64, (2, 12))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    checkpoint = models.lm.checkpoint
    monkeypatch.setattr(models.lm, "checkpoint", lambda *a, **k: (calls.append(1), checkpoint(*a, **k))[1])
    model.activation_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.model.checkpoint_blocks
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # one per block
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)
    model.activation_checkpointing_disable()
    assert not model.model.checkpoint_blocks


def test_loss_ignores_minus_100_and_uses_num_items_in_batch():
    model = hybrid()
    ids = torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[0, 2:4] = IGNORE
    logits = model(ids).logits
    terms = [
        F.cross_entropy(logits[b, t - 1][None], labels[b, t][None])
        for b in range(2)
        for t in range(1, 6)
        if labels[b, t] != IGNORE
    ]
    want = torch.stack(terms).sum()
    torch.testing.assert_close(model(ids, labels=labels).loss, want / len(terms))
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=20).loss, want / 20)


def test_a_right_padded_training_batch_trains_on_its_real_tokens():
    """A collator's right-padded batch (attention_mask, labels -100 at the padding): each row's logits are those of
    its real tokens alone, whatever the padding holds, and the loss is theirs."""
    model = hybrid().train()
    rows = [torch.randint(0, 64, (n,)) for n in (7, 4)]
    ids = torch.full((2, 7), 63)
    mask = torch.zeros(2, 7, dtype=torch.long)
    labels = torch.full((2, 7), IGNORE)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)], labels[b, : len(r)] = r, 1, r
    out = model(ids, attention_mask=mask, labels=labels)
    for b, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        torch.testing.assert_close(out.logits[b, : len(r)], alone, rtol=1e-4, atol=1e-5)
    sums = [F.cross_entropy(model(r[None]).logits[0, :-1], r[1:], reduction="sum") for r in rows]
    torch.testing.assert_close(out.loss, sum(sums) / (6 + 3), rtol=1e-4, atol=1e-5)


def test_trainer_with_accumulation_equals_our_trainer(tmp_path):
    """The same rows, optimizer and schedule through transformers' Trainer (2 micro-batches per step, with
    different numbers of targets; activation checkpointing on) and through our train_step: the same losses and the
    same weights."""
    steps, rows, L = 2, 4, 10
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 64, (steps * rows, L + 1), generator=g)
    labels = data.clone()
    labels[0, 1:9] = IGNORE  # the first micro-batch has far fewer targets than the second
    labels[5, 3:] = IGNORE
    tc = TrainConfig(steps=steps, batch_size=rows, seq_len=L, accumulate=2, lr=1e-2, warmup_steps=1, grad_clip=1.0)

    ours = hybrid(seed=4).train()
    state = TrainState(model=ours.model, optimizer=make_optimizer(ours.model, tc), generator=torch.Generator())
    layout = Layout.of(World(), tc)
    our_losses = []
    for s in range(steps):
        micro = []
        for m in range(2):
            r = slice(s * rows + m * 2, s * rows + m * 2 + 2)
            micro.append((data[r, :-1], labels[r, 1:], None, 2 * L))
        loss, _ = train_step(state, micro, layout, tc)
        state.step += 1
        our_losses.append(loss)

    theirs = hybrid(seed=4).train()
    optimizer = make_optimizer(theirs.model, tc)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tc) / tc.lr)
    dataset = [{"input_ids": data[i], "labels": labels[i]} for i in range(len(data))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        max_grad_norm=tc.grad_clip,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        activation_checkpointing=True,  # the same numbers: blocks recomputed in the backward pass
    )
    trainer = transformers.Trainer(model=theirs, args=args, train_dataset=dataset, optimizers=(optimizer, schedule))
    trainer.train()
    assert theirs.model.checkpoint_blocks
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == steps
    for got, want in zip(logged, our_losses, strict=True):
        assert math.isclose(got, want, rel_tol=1e-4), (logged, our_losses)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-5, msg=name)  # Adam's steps are 1e-2: rounding only
