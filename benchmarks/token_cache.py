"""What checking the token cache costs (issue 21, item 4): a ~1 GiB cache is built, then checked on reuse.

Not a test: it prints tables and writes JSON (default ``benchmarks/results/token_cache.json``).

1. Hashes: reading the cache's token file 1 MiB at a time (as ``models.training.data`` checks it) with nothing, or with
   each candidate checksum (zlib.crc32, zlib.adler32, hashlib's sha1, sha256, blake2b, md5), and with what the
   check does (CRC-32 and the largest id), in GB/s, the file in the page cache.
2. ``build_token_cache`` of ``--size-mb`` MiB of text with the byte tokenizer (one uint8 token per byte): the
   whole build, and the part of it the checksums take (the CRC-32 and largest id of the same bytes, in memory).
3. Reuse (``build_token_cache`` again on the unchanged text, which checks the cache: sizes, both CRC-32, the
   largest id read again, the document starts), with the files in the page cache ("warm") and after asking
   the kernel to drop their pages (``posix_fadvise(DONTNEED)``, "cold": read from the disk, as far as the
   machine lets a process evict them). Before the checks, reuse compared the sidecar with a ``stat`` of each
   source (also measured). And ``open_token_cache`` of a uint16 cache (BPE ids) of the same size in bytes.
4. The other design, per-block checksums verified as batches read them: the CRC-32 of the 64 KiB blocks that a
   batch of 32 windows of 1024 uint16 tokens touches, against the time to read that batch.

Times are wall-clock seconds (the best of ``--repeats`` for the checks); on a shared machine they include
waits for a core. Usage: ``python benchmarks/token_cache.py [--size-mb 1024] [--dir /tmp] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import run_info, write_json  # noqa: E402
from models.training import data as corpus  # noqa: E402
from models.training.data import default_corpus  # noqa: E402
from models.training.tokenizers import ByteTokenizer  # noqa: E402

MiB = 1 << 20
BLOCK = 64 << 10  # the per-block design's block


def timed(fn, repeats: int = 1) -> float:
    """The best of ``repeats`` runs, the first included (a build is timed once, cold)."""
    return common.timed(fn, repeats, best=True, warmup=False)


def read_with(path: Path, update) -> None:
    buffer = bytearray(corpus.SCAN_BYTES)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            update(memoryview(buffer)[:n])


def drop_pages(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hashes(path: Path, repeats: int) -> dict[str, float]:
    """GB/s of reading ``path`` with each checksum (and with none)."""
    size = path.stat().st_size
    states: dict = {}

    def crc(kind):
        def update(chunk):
            states[kind] = getattr(zlib, kind)(chunk, states.get(kind, 0 if kind == "crc32" else 1))

        return update

    candidates = {
        "read only": lambda chunk: None,
        "zlib.crc32": crc("crc32"),
        "zlib.adler32": crc("adler32"),
        **{f"hashlib.{name}": getattr(hashlib, name)().update for name in ("sha1", "sha256", "blake2b", "md5")},
    }
    out = {name: size / timed(lambda u=u: read_with(path, u), repeats) / 1e9 for name, u in candidates.items()}
    out["crc32 + largest id (the check)"] = size / timed(lambda: corpus._scan(path, torch.uint8), repeats) / 1e9
    return out


def checksum_time(data: bytearray, repeats: int) -> float:
    """What the build adds: the CRC-32 and the largest id of every byte it writes (4 MiB at a time, in memory)."""

    def sums() -> None:
        view = memoryview(data)
        for at in range(0, len(data), 4 * MiB):
            zlib.crc32(view[at : at + 4 * MiB])
            corpus._largest(torch.frombuffer(view[at : at + 4 * MiB], dtype=torch.uint8))

    return timed(sums, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="MiB of text, so of uint8 tokens (default 1024)")
    p.add_argument("--dir", default=None, help="where the text and caches are written (default: the temp folder)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "token_cache.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="token-cache-bench-", dir=args.dir))
    try:
        free = shutil.disk_usage(work).free
        if free < 3.2 * args.size_mb * MiB:
            sys.exit(f"{work} has {free / 2**30:.1f} GiB free; {args.size_mb} MiB needs about 3.2 times that")
        result = run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(Path(args.out), {**run_info(args.threads), **result})


def run(work: Path, args: argparse.Namespace) -> dict:
    size = args.size_mb * MiB
    text = work / "text.txt"
    unit = default_corpus()
    with open(text, "wb") as f:  # the embedded corpus, repeated to the size
        for _ in range(size // len(unit)):
            f.write(unit)
        f.write(unit[: size % len(unit)])
    cache = work / "cache" / "tokens.bin"
    tok = ByteTokenizer()

    build_s = timed(lambda: corpus.build_token_cache(text, tok, cache, rebuild=True))
    sums_s = checksum_time(bytearray(cache.read_bytes()), args.repeats)
    rates = hashes(cache, args.repeats)
    files = corpus.cache_paths(cache)[:2]
    warm_s = timed(lambda: corpus.build_token_cache(text, tok, cache), args.repeats)
    assert not corpus.build_token_cache(text, tok, cache).built

    def cold() -> None:
        drop_pages(*files)
        t = time.perf_counter()
        corpus.build_token_cache(text, tok, cache)
        cold_times.append(time.perf_counter() - t)

    cold_times: list[float] = []
    for _ in range(args.repeats):
        cold()
    stat_s = timed(lambda: corpus._fingerprint(text, tok, "auto", "text", "file", "\n\n"), args.repeats)

    # a uint16 cache of the same bytes: BPE-sized ids (the text's bytes read in pairs), opened and checked
    wide, wide_starts, wide_meta = corpus.cache_paths(work / "cache" / "wide.bin")
    os.replace(cache, wide)
    wide_starts.write_bytes(b"\0" * 8)
    crc, largest = corpus._scan(wide, torch.uint16)
    meta = json.loads(corpus.cache_paths(cache)[2].read_text())
    meta.update(dtype="uint16", length=size // 2, n_documents=1, max_id=largest)
    meta.update(crc32={"tokens": crc, "starts": zlib.crc32(b"\0" * 8)}, tokenizer={"vocab_size": 1 << 16})
    wide_meta.write_text(json.dumps(meta))
    wide_s = timed(lambda: corpus.open_token_cache(wide), args.repeats)

    # the per-block design: checksums of the blocks a batch of windows reads, against reading the batch
    opened = corpus.open_token_cache(wide)
    gen = torch.Generator().manual_seed(0)
    B, T = 32, 1024
    starts = [opened.random_window_starts(B, T, gen) for _ in range(20)]
    batch_s = timed(lambda: [opened.windows_at(s, T) for s in starts], args.repeats) / len(starts)
    with open(wide, "rb") as f:

        def block_sums() -> None:
            for s in starts:
                for block in {(int(i) * 2 // BLOCK) for i in s} | {((int(i) + T) * 2 // BLOCK) for i in s}:
                    f.seek(block * BLOCK)
                    zlib.crc32(f.read(BLOCK))

        blocks_s = timed(block_sums, args.repeats) / len(starts)

    gb = size / 1e9
    print(f"\n{args.size_mb} MiB of text -> a {args.size_mb} MiB uint8 token cache ({size:,} tokens)\n")
    print(f"{'reading the cache file with':34s} {'GB/s':>7s}")
    for name, rate in rates.items():
        print(f"{name:34s} {rate:7.2f}")
    rows = [
        ("build (byte tokenizer)", build_s),
        ("  of which CRC-32 + largest id", sums_s),
        ("reuse before: stat the sources", stat_s),
        ("reuse now, warm (check both files)", warm_s),
        ("reuse now, cold (pages dropped)", min(cold_times)),
        (f"open a uint16 cache ({args.size_mb} MiB)", wide_s),
    ]
    print(f"\n{'':34s} {'seconds':>8s} {'per GB':>8s}")
    for name, seconds in rows:
        print(f"{name:34s} {seconds:8.3f} {seconds / gb:8.3f}")
    print(f"\nper-block alternative ({B} windows of {T} uint16 tokens, {BLOCK >> 10} KiB blocks):")
    print(f"  reading a batch {batch_s * 1e3:.2f} ms, checking its blocks {blocks_s * 1e3:.2f} ms per batch")
    return {
        "size_mib": args.size_mb,
        "tokens": size,
        "scan_bytes": corpus.SCAN_BYTES,
        "read_gb_per_s": rates,
        "build_s": build_s,
        "build_checksum_s": sums_s,
        "reuse_stat_only_s": stat_s,
        "reuse_checked_warm_s": warm_s,
        "reuse_checked_cold_s": min(cold_times),
        "open_uint16_checked_s": wide_s,
        "per_block": {"batch": [B, T], "block_bytes": BLOCK, "read_ms": batch_s * 1e3, "check_ms": blocks_s * 1e3},
    }


if __name__ == "__main__":
    main()
