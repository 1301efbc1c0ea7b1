"""``python -m mixers list`` / ``demo``: mixers, backends, feature maps, availability, and the plugin and
distribution each came from."""

from __future__ import annotations

import argparse
import sys

from mixers import __version__
from mixers.registry import Registry, get_registry


def format_listing(registry: Registry) -> str:
    """A human-readable report of everything the registry loaded, and what failed to load.

    Each mixer, backend and feature map shows its plugin and, in brackets, the distribution it came from
    (``seqmixers`` itself for the built-ins).
    """

    def dist(plugin: str) -> str:
        origin = registry.origin(plugin)
        return f"seqmixers {__version__}" if origin == "built-in" else origin

    lines = ["Mixers:"]
    for name, spec in sorted(registry.mixers.items()):
        ops = ", ".join(spec.ops) or "-"
        plugin = f"{spec.plugin} [{dist(spec.plugin)}]"
        lines.append(f"  {name:<20} ops: {ops:<20} plugin: {plugin}  {spec.description}")
    lines.append("Backends:")
    for op in sorted(registry.backends):
        for b in sorted(registry.backends[op].values(), key=lambda b: -b.priority):
            reason = registry.unavailable_reason(b)
            status = "available" if reason is None else f"unavailable ({reason})"
            plugin = f"{b.plugin} [{dist(b.plugin)}]"
            lines.append(f"  {op + '/' + b.name:<32} priority {b.priority:>3}  plugin: {plugin}  {status}")
    lines.append("Feature maps:")
    for name, fm in sorted(registry.feature_maps.items()):
        lines.append(f"  {name:<20} plugin: {fm.plugin} [{dist(fm.plugin)}]  {fm.description}")
    lines.append("Plugins:")
    for info in registry.plugins.values():
        origin = (
            "built-in" if info.builtin else f"distribution {info.distribution or '?'} {info.version or ''}".rstrip()
        )
        lines.append(f"  {info.name:<32} {origin:<36} {'ok' if info.ok else 'BROKEN'}")
        lines.extend("      error: " + e.replace("\n", "\n             ") for e in info.errors)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixers", description=__doc__.replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list mixers, backends and plugins")
    sub.add_parser("demo", help="show the three representations agreeing, and state hand-over")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from mixers import demo

        demo.run()
        return 0
    print(format_listing(get_registry()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
