"""The test environment's lock file: what ``scripts/test.sh`` installs, and how it is refreshed.

    python scripts/lock.py show          print the locked packages' installed versions (test.sh logs them)
    python scripts/lock.py check FILE    exit 1, listing the differences, unless the environment matches FILE
    python scripts/lock.py write FILE    pin every package the test suite needs, at its installed version

The packages are the dependency closure of ``seqmixers[dev]`` plus torchscale (installed without its own
dependencies, see ``scripts/test.sh``), without torch and what only torch needs: torch is the user's (a CUDA
build is kept as it is), and pinning its dependencies could contradict an older torch's exact pins.
``scripts/refresh-lock.sh`` writes the file after the suite passed against the newest versions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import platform
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "seqmixers"
ROOT_EXTRAS = ("dev",)
# installed with --no-deps, each itself only: the official RetNet code, and flash-linear-attention (the converters'
# reference models; its kernels need triton to import, and a GPU to run)
EXTRA = ("torchscale", "fla-core", "flash-linear-attention", "triton")
NOT_LOCKED = {"torch"}  # kept as installed, and not traversed


def _requirements(dist: metadata.Distribution, extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of ``dist`` that apply here, with ``extras`` requested."""
    env = default_environment()
    reqs = [Requirement(text) for text in dist.requires or []]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in (*extras, ""))]


def closure() -> dict[str, str]:
    """``{name: installed version}`` of every package the test suite installs, torch excluded."""
    versions: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(ROOT, ROOT_EXTRAS)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"lock: {name!r} is required but not installed; run scripts/setup.sh first")
        if canonicalize_name(name) != ROOT:
            versions[canonicalize_name(name)] = dist.version
        for req in _requirements(dist, extras):
            if canonicalize_name(req.name) not in NOT_LOCKED:
                todo.append((req.name, tuple(sorted(req.extras))))
    for name in EXTRA:
        versions[canonicalize_name(name)] = metadata.version(name)
    return dict(sorted(versions.items()))


def read(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        if not match:
            sys.exit(f"lock: {path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def write(path: Path) -> None:
    pins = closure()
    header = [
        "# The versions the seqmixers test suite is known to pass with; scripts/test.sh installs them.",
        "# pyproject.toml keeps the ranges users install with. Do not edit by hand: refresh with",
        "#   bash scripts/refresh-lock.sh",
        "# which runs the suite against the newest versions and, if it passes, rewrites this file.",
        f"# Written {datetime.date.today().isoformat()} on Python {platform.python_version()} "
        f"({sys.platform}), torch {metadata.version('torch')} (torch itself is never pinned here).",
    ]
    path.write_text("\n".join([*header, *(f"{name}=={version}" for name, version in pins.items())]) + "\n")
    print(f"lock: wrote {len(pins)} pins to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="print the installed versions of the locked packages")
    sub.add_parser("check", help="compare the environment with a lock file").add_argument("file", type=Path)
    sub.add_parser("write", help="write a lock file from this environment").add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "show":
        pins = closure()
        print("test dependencies: " + ", ".join(f"{n} {v}" for n, v in pins.items() if n not in _QUIET))
        print(f"  with torch {metadata.version('torch')} on Python {platform.python_version()}")
        return 0
    if args.command == "check":
        want, have = read(args.file), closure()
        diff = [f"{n}: locked {want.get(n, '-')}, installed {have.get(n, '-')}" for n in sorted({*want, *have})
                if want.get(n) != have.get(n)]  # fmt: skip
        print("\n".join(diff) if diff else f"lock: the environment matches {args.file}")
        return 1 if diff else 0
    write(args.file)
    return 0


# Packages too deep in the tree to be worth a word in every test log (still locked).
_QUIET = {"contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing", "python-dateutil", "six",
          "iniconfig", "pygments", "sortedcontainers", "tzdata"}  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
