"""Context parallelism (``mixers.context_parallel``) on 2 gloo processes against the single-process run.

One pair of processes runs every case (start-up is the expensive part): each rank computes the single-process
reference itself (float64, the same seed) and its context-parallel part, and writes the largest differences
and the errors it saw to a file; the tests below read them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from seqmixers_conv.op import SHORT_CONV

import mixers
from mixers.context_parallel import ContextParallel, context_parallel, reduce_gradients
from mixers.interface import TokenMixer
from mixers.structure import tensors_in

WORLD = 2
B = 2
TOL = 1e-10

# name -> (mixer, options, T, mode, chunk_size)
MIXER_CASES: dict[str, tuple[str, dict[str, Any], int, str, int | None]] = {
    "retention": ("retention", {"num_heads": 2}, 8, "parallel", None),
    "retention-chunkwise": ("retention", {"num_heads": 2}, 12, "chunkwise", 4),
    "retention-conv": ("retention", {"num_heads": 2, "conv_size": 4}, 12, "parallel", None),
    "retention-conv-longer-than-a-rank": ("retention", {"num_heads": 2, "conv_size": 4}, 4, "parallel", None),
    "linear_attention": ("linear_attention", {"num_heads": 2, "normalize": True}, 8, "parallel", None),
    "linear_attention-conv-chunkwise": (
        "linear_attention",
        {"num_heads": 2, "normalize": True, "conv_size": 3},
        12,
        "chunkwise",
        4,
    ),  # fmt: skip
    "gated_retention": ("gated_retention", {"num_heads": 2}, 8, "parallel", None),
    "gated_retention-conv-chunkwise": ("gated_retention", {"num_heads": 2, "conv_size": 4}, 12, "chunkwise", 4),
    "softmax_attention": ("softmax_attention", {"num_heads": 2}, 8, "parallel", None),
    "softmax_attention-gqa-chunkwise": ("softmax_attention", {"num_heads": 2, "num_kv_heads": 1}, 12, "chunkwise", 4),
}
HYBRID = dict(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    layers=[{"mixer": "retention", "conv_size": 4}, {"mixer": "softmax_attention"}],
)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def _mixer_case(cp: ContextParallel, name: str, options: dict, T: int, mode: str, chunk_size: int | None) -> dict:
    torch.manual_seed(0)
    mixer = mixers.build(name, 16, **options).double()
    x = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, 16, dtype=torch.float64)
    y, state = mixer(x, mode=mode, chunk_size=chunk_size)
    (y * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()

    x_local = cp.shard(x.detach()).requires_grad_()
    with context_parallel(model=mixer):
        y_local, state_local = mixer(x_local, mode=mode, chunk_size=chunk_size)
    (y_local * cp.shard(w)).sum().backward()
    reduce_gradients(mixer)
    out = {
        "output": _max_diff(y_local, cp.shard(y)),
        "input grad": _max_diff(x_local.grad, cp.shard(x.grad)),
        **{f"grad {n}": _max_diff(p.grad, ref[n]) for n, p in mixer.named_parameters()},
    }
    if cp.rank == cp.world_size - 1:  # the last rank's state is the whole sequence's
        out["state pos"] = _max_diff(state_local.pos, state.pos)
        op, op_ref = state_local.op, state.op
        if name == "softmax_attention":
            op, op_ref = op.held(), op_ref.held()
        for i, (a, b) in enumerate(zip(tensors_in(op), tensors_in(op_ref), strict=True)):
            out[f"state op {i}"] = _max_diff(a.to(b.dtype), b)
        if state.conv is not None:
            out["state conv"] = _max_diff(state_local.conv, state.conv)
    return out


def _model_case(cp: ContextParallel) -> dict:
    import models

    torch.manual_seed(0)
    model = models.build_model(HYBRID).double()
    tokens = torch.randint(0, 64, (B, 16))
    w = torch.randn(B, 16, 64, dtype=torch.float64)
    logits, _ = model(tokens)
    (logits * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    with context_parallel(model=model):
        logits_local, _ = model(cp.shard(tokens))
    (logits_local * cp.shard(w)).sum().backward()
    reduce_gradients(model)
    return {
        "logits": _max_diff(logits_local, cp.shard(logits)),
        "logits gathered": _max_diff(cp.unshard(logits_local.detach()), logits),
        **{f"grad {n}": _max_diff(p.grad, ref[n]) for n, p in model.named_parameters()},
    }


def _raises(fn: Callable[[], Any]) -> str | None:
    """The message of what ``fn`` raised (prefixed with its type), or ``None``."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (recorded, checked by the tests)
        return f"{type(exc).__name__}: {exc}"
    return None


def _error_cases(cp: ContextParallel) -> dict[str, str | None]:
    torch.manual_seed(0)
    msr = mixers.build("retention", 16, num_heads=2).double()
    x = torch.randn(B, 4, 16, dtype=torch.float64)

    def under_cp(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with context_parallel(model=msr):
                return fn()

        return run

    class Plain(TokenMixer):  # a mixer that knows nothing of context parallelism
        d_model = 16

        def forward(self, x, state=None, *, mode="parallel", chunk_size=None):
            return x, state

        def init_state(self, batch_size, *, device=None, dtype=torch.float32, max_len=None):
            return None

    formless = dataclasses.replace(SHORT_CONV, context_parallel=None)
    return {
        "recurrent": _raises(under_cp(lambda: msr(x, mode="recurrent"))),
        "state": _raises(under_cp(lambda: msr(x, msr.init_state(B, dtype=torch.float64)))),
        "cu_seqlens": _raises(under_cp(lambda: msr(x[:1], cu_seqlens=torch.tensor([0, 2, 4])))),
        "not divisible": _raises(lambda: cp.shard(torch.zeros(B, 7, 16))),
        "unsupported mixer": _raises(lambda: context_parallel(model=torch.nn.Sequential(Plain())).__enter__()),
        "op without a form": _raises(lambda: cp.run(formless, x, x[0, :2].T)),
    }


def _plugin_op_case(cp: ContextParallel) -> dict:
    """The conv plugin's own op, through its ``ContextParallelForm``: as one process, outputs and gradients."""
    torch.manual_seed(0)
    x = torch.randn(B, 8, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, 8, 6, dtype=torch.float64)
    y, _ = SHORT_CONV(x, weight, mode="parallel")
    (y * w).sum().backward()
    ref_x, ref_weight = x.grad.clone(), weight.grad.clone()
    weight.grad = None
    x_local = cp.shard(x.detach()).requires_grad_()
    y_local, _ = cp.run(SHORT_CONV, x_local, weight, mode="chunkwise", chunk_size=3)
    (y_local * cp.shard(w)).sum().backward()
    dist.all_reduce(weight.grad)
    return {
        "output": _max_diff(y_local, cp.shard(y)),
        "input grad": _max_diff(x_local.grad, cp.shard(ref_x)),
        "weight grad": _max_diff(weight.grad, ref_weight),
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, Any] = {}
    try:
        cp = ContextParallel.of()
        for case, (name, options, T, mode, chunk_size) in MIXER_CASES.items():
            results[case] = _mixer_case(cp, name, options, T, mode, chunk_size)
        results["hybrid model"] = _model_case(cp)
        results["plugin op"] = _plugin_op_case(cp)
        results["errors"] = _error_cases(cp)
    except Exception:  # noqa: BLE001 (reported by the tests)
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank destroying the group while the other still
        # has work in flight aborted once in CI ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every case's results, one dict per rank, from one run of 2 processes (a minute at most)."""
    out = tmp_path_factory.mktemp("context_parallel")
    context = mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the context-parallel processes did not finish in 120 s")
    finally:
        for process in context.processes:  # only ours, and only if still alive after a failure
            if process.is_alive():
                process.terminate()
    found = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(found):
        assert "crash" not in res, f"rank {r} failed:\n{res['crash']}"
    return found


def _check(results: list[dict[str, Any]], case: str) -> None:
    for r, res in enumerate(results):
        bad = {k: v for k, v in res[case].items() if not v <= TOL}
        assert not bad, f"rank {r}, {case}: differences above {TOL}: {bad}"


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_matches_single_process(results: list[dict[str, Any]], case: str) -> None:
    """Outputs, input and parameter gradients (summed over ranks), and the last rank's state."""
    _check(results, case)
    assert "state op 0" in results[-1][case]


def test_hybrid_model_matches_single_process(results: list[dict[str, Any]]) -> None:
    _check(results, "hybrid model")
    assert any(k.startswith("grad blocks.1.mixer") for k in results[0]["hybrid model"])


def test_a_plugin_op_runs_context_parallel_through_its_own_form(results: list[dict[str, Any]]) -> None:
    """Nothing in mixers.context_parallel knows the conv plugin's op: its Op carries the form."""
    _check(results, "plugin op")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("recurrent", "ValueError: under context parallelism mode must be one of ('parallel', 'chunkwise')"),
        ("state", "ValueError: under context parallelism a mixer starts from the previous ranks"),
        ("cu_seqlens", "ValueError: packed sequences (cu_seqlens, attention_mask) are not supported"),
        ("not divisible", "ValueError: context parallelism splits the sequence into 2 equal parts, but its length 7"),
        ("unsupported mixer", "NotImplementedError: these mixers do not support context parallelism: Plain"),
        ("op without a form", "NotImplementedError: op 'short_conv' has no context-parallel form"),
    ],
)
def test_clear_errors(results: list[dict[str, Any]], case: str, expected: str) -> None:
    for res in results:
        message = res["errors"][case]
        assert message is not None and message.startswith(expected), message
