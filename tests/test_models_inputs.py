"""What the language model, the demo and the progress bar do with odd inputs: prompts that are not token ids,
temperatures so small that ``logits / temperature`` overflows, seeds that are not ints, zero demo steps; and the
progress bars (tqdm), in training, long prefills and the demo's profiling."""

from __future__ import annotations

import io
import re

import pytest
import torch
from tqdm import tqdm

from models import demo
from models.generation import sample
from models.lm import LanguageModel
from models.progress import Progress
from tests.models_helpers import one_thread, tiny_config  # noqa: F401  (autouse fixture)


def make(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(tiny_config(["retention", "softmax_attention"], **overrides)).eval()


@pytest.mark.parametrize(
    "prompt",
    [
        torch.tensor([1.5, 2.0]),
        torch.tensor([[1.0, 2.0]], dtype=torch.float64),
        torch.tensor([True, False]),
        torch.tensor([1 + 0j]),
    ],
    ids=["float32", "float64", "bool", "complex"],
)
def test_a_prompt_tensor_that_is_not_integer_is_rejected(prompt):
    """``torch.tensor([1.5])`` used to become token 1 without a word."""
    model = make()
    with pytest.raises(
        TypeError, match=rf"prompt must hold integer token ids, got dtype {re.escape(str(prompt.dtype))}"
    ):
        model.generate(prompt, 2)
    with pytest.raises(TypeError, match="prompt must hold integer token ids"):
        next(model.stream(prompt, 2))


def test_a_prompt_list_of_bools_or_floats_is_rejected():
    model = make()
    with pytest.raises(TypeError, match=r"prompt must be a tensor or a list of int token ids, got \[True, 2\]"):
        model.generate([True, 2], 2)
    with pytest.raises(TypeError, match=r"prompt must be a tensor or a list of int token ids, got \[1.5\]"):
        model.generate([1.5], 2)
    assert model.generate(torch.tensor([1, 2], dtype=torch.int32), 1).shape == (3,), "any integer dtype is fine"


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_a_temperature_so_small_it_overflows_is_greedy(temperature):
    """``logits / 1e-45`` is inf in float32 and softmax gives nan: such temperatures now pick the most likely
    token, as the limit temperature -> 0 does (ties split evenly)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 32)
    greedy = logits.argmax(-1, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature, None, gen), greedy)
    assert torch.equal(sample(logits, temperature, 3, gen), greedy)
    tie = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    picks = {int(sample(tie, temperature, None, gen)) for _ in range(40)}
    assert picks == {1, 2}, "a tie between the most likely tokens is split, not resolved by position"
    model = make()
    assert torch.equal(
        model.generate([1, 2, 3], 6, temperature=temperature, seed=0), model.generate([1, 2, 3], 6, temperature=0)
    )


def test_ordinary_temperatures_sample_as_before():
    """The overflow guard does not change what a usual temperature draws (same generator, same token)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 32)
    for temperature, top_k in [(0.8, None), (1.0, 5), (2.5, None)]:
        expected = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(expected, top_k, dim=-1).values[:, -1:]
            expected = expected.masked_fill(expected < kth, -float("inf"))
        want = torch.multinomial(torch.softmax(expected, -1), 1, generator=torch.Generator().manual_seed(3))
        got = sample(logits, temperature, top_k, torch.Generator().manual_seed(3))
        assert torch.equal(got, want), (temperature, top_k)


@pytest.mark.parametrize(
    ("seed", "match"),
    [("a", r"seed must be an int or None, got 'a' \(str\)"), (1.5, "got 1.5"), (True, "got True"), (2**64, "got 1844")],
)
def test_a_seed_that_is_not_an_int_is_named(seed, match):
    model = make()
    with pytest.raises((TypeError, ValueError), match=match):
        model.generate([1, 2], 2, seed=seed)
    assert model.generate([1, 2], 2, seed=2**64 - 1).shape == (4,) and model.generate([1], 1, seed=-1).shape == (2,)


def test_demo_rejects_zero_steps(tmp_path):
    with pytest.raises(ValueError, match=r"steps must be an int >= 1 or None \(the presets' steps\), got 0"):
        demo.run(tmp_path, steps=0)
    assert not any(tmp_path.iterdir()), "nothing is written"


# --- progress bars -------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_is_a_tqdm_bar_on_a_terminal_with_log_lines_above_it():
    tty = Terminal()
    bar = Progress(4, "run ", stream=tty)
    assert isinstance(bar.bar, tqdm)
    bar.log("step 0 val loss 1.000")
    for step in range(1, 5):
        bar.update(step, f"loss {step}.000")
    bar.log("step 4 val loss 0.500")
    bar.close()
    out = tty.getvalue()
    assert "run step 0 val loss 1.000\n" in out and "run step 4 val loss 0.500\n" in out
    assert re.search(r"run: 100%\|.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d, .*(step/s|s/step), loss 4\.000\]", out), repr(out)


def test_progress_off_a_terminal_prints_the_log_lines_only_and_nothing_when_disabled():
    pipe = io.StringIO()
    bar = Progress(4, "run ", stream=pipe)
    bar.log("step 0")
    bar.update(4, "loss 1.0")
    bar.close()
    assert pipe.getvalue() == "run step 0\n"
    quiet = Terminal()
    bar = Progress(4, "run ", stream=quiet, enabled=False)
    bar.log("step 0")
    bar.update(4)
    bar.close()
    assert quiet.getvalue() == ""


def test_a_long_prefill_shows_a_bar_when_asked_and_gives_the_same_tokens(monkeypatch):
    model = make(vocab_size=256).double()
    prompt = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))
    expected = model.generate(prompt, 4, temperature=0)
    tty = Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    assert torch.equal(model.generate(prompt, 4, temperature=0, progress=True), expected)
    assert re.search(r"prefill:\s+\d+%\|.*\| \d+/3000 \[", tty.getvalue()), repr(tty.getvalue())
    short = Terminal()
    monkeypatch.setattr("sys.stderr", short)
    model.generate(prompt[:100], 4, temperature=0, progress=True)
    assert short.getvalue() == "", "a short prompt shows no bar"
