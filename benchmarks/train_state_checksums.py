"""What the training state's checksums cost: saving a state (``torch.distributed.checkpoint``) and hashing it
(``models.training.state.write_checksums``), and checking it on resume (``verify_checksums``) against loading it.

Not a test: it prints a table and writes JSON (default ``benchmarks/results/train_state_checksums.json``).
The states are a language model's weights and its AdamW moments (one optimizer step taken), for models of
about 1M to 100M parameters, saved to a temporary folder on the disk this runs on. Times are wall-clock, the
median of ``--repeats`` runs; the file cache is warm after the first save, as it is when a run resumes soon
after it saved. Usage: ``python benchmarks/train_state_checksums.py [--quick] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from benchmarks.common import run_info, timed, write_json  # noqa: E402
from models import LanguageModel, ModelConfig  # noqa: E402
from models.training import state as train_state  # noqa: E402

SIZES = {"1M": (128, 4), "10M": (384, 6), "50M": (768, 7), "100M": (1024, 8)}  # d_model, layers


def state_of(d_model: int, n_layers: int) -> tuple[dict, int]:
    config = ModelConfig(
        vocab_size=4096, d_model=d_model, n_layers=n_layers, layers=["retention"], ffn_dim=2 * d_model,
        mixer_options={"retention": {"num_heads": max(1, d_model // 128)}},
    )  # fmt: skip
    model = LanguageModel(config)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 4096, (1, 8)))[0].sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict()}, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the two smallest models, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_state_checksums.json")
    args = parser.parse_args()
    sizes = dict(list(SIZES.items())[:2]) if args.quick else SIZES
    repeats = 1 if args.quick else args.repeats
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    rows = []
    print(f"{'model':>6} {'params':>12} {'state MiB':>10} {'save s':>8} {'hash s':>8} {'+%':>6} {'load s':>8} "
          f"{'verify s':>9} {'+%':>6}")  # fmt: skip
    for name, (d, L) in sizes.items():
        state, params = state_of(d, L)
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            folder = Path(tmp) / "state"
            save = timed(functools.partial(dcp.save, state, checkpoint_id=folder, no_dist=True), repeats, warmup=False)
            (folder / train_state.META).write_text("{}")
            hash_s = timed(functools.partial(train_state.write_checksums, folder), repeats, warmup=False)
            load = timed(functools.partial(dcp.load, state, checkpoint_id=folder, no_dist=True), repeats, warmup=False)
            verify = timed(functools.partial(train_state.verify_checksums, folder), repeats, warmup=False)
            mib = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        row = {
            "model": name, "parameters": params, "state_mib": round(mib, 1), "save_s": save, "hash_s": hash_s,
            "save_overhead": hash_s / save, "load_s": load, "verify_s": verify, "load_overhead": verify / load,
            "hash_mib_per_s": mib / hash_s,
        }  # fmt: skip
        rows.append(row)
        print(f"{name:>6} {params:>12,} {mib:>10.1f} {save:>8.3f} {hash_s:>8.3f} {100 * hash_s / save:>5.0f}% "
              f"{load:>8.3f} {verify:>9.3f} {100 * verify / load:>5.0f}%")  # fmt: skip
    write_json(args.out, {**run_info(torch.get_num_threads()), "repeats": repeats, "rows": rows})


if __name__ == "__main__":
    main()
