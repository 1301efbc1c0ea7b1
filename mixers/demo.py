"""A short demo: the three representations of every registered mixer agree, and states hand over.

Run with ``seqmixers mixers-demo`` (or ``python -m mixers mixers-demo``). Uses random weights and inputs; takes a
few seconds on a CPU.
"""

from __future__ import annotations

import time

import torch

from mixers import functional
from mixers.listing import format_listing
from mixers.registry import get_registry


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(T: int = 1024, d_model: int = 128, seed: int = 0) -> None:
    torch.manual_seed(seed)
    B, H, Dk, Dv = 2, 4, 32, 64
    print(f"== the retention op, B={B} T={T} H={H} Dk={Dk} Dv={Dv}, float32 vs a float64 parallel run ==")
    q, k, v = torch.randn(B, T, H, Dk) * Dk**-0.5, torch.randn(B, T, H, Dk) * Dk**-0.5, torch.randn(B, T, H, Dv)
    gamma = [1 - 2 ** (-5 - h) for h in range(H)]
    ref, ref_state = functional.retention(q.double(), k.double(), v.double(), gamma, mode="parallel")
    for mode, chunk in (("parallel", None), ("chunkwise", 64), ("chunkwise", 100), ("recurrent", None)):
        t0 = time.perf_counter()
        o, state = functional.retention(q, k, v, gamma, mode=mode, chunk_size=chunk)
        ms = (time.perf_counter() - t0) * 1e3
        label = mode + (f" (chunk {chunk})" if chunk else "")
        print(f"  {label:<22} {ms:8.1f} ms   rel. error: output {_rel(o, ref):.1e}, state {_rel(state, ref_state):.1e}")

    print(f"\n== every registered mixer, d_model={d_model}, T={T}: modes and hand-over vs parallel ==")
    x = torch.randn(B, T, d_model)
    registry = get_registry()
    for name in sorted(registry.mixers):
        accepted = registry.mixer_options(name)  # a plugin's mixer may have no heads (short_conv)
        options = {"num_heads": 4} if accepted is None or "num_heads" in accepted else {}
        mixer = registry.build(name, d_model, **options).eval()
        with torch.no_grad():
            y, _ = mixer(x, mode="parallel")
            y_chunk, _ = mixer(x, mode="chunkwise", chunk_size=100)
            y_head, state = mixer(x[:, : T - 8], mode="chunkwise", chunk_size=64)
            y_tail, state = mixer(x[:, T - 8 :], state, mode="recurrent")  # decode the last 8 tokens
        split = torch.cat([y_head, y_tail], dim=1)
        print(
            f"  {name:<18} chunkwise {_rel(y_chunk, y):.1e}   prefill + 8 recurrent steps {_rel(split, y):.1e}"
            f"   state after T tokens: {state.nbytes / 1024:.0f} KiB"
        )
    print("\n== installed mixers, backends and plugins ==")
    print(format_listing(get_registry()))
