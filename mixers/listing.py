"""The listing that ``seqmixers list`` prints: mixers, backends, feature maps and plugins, with where each came
from and why an unavailable backend is unavailable."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mixers import __version__

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from mixers.registry import Registry


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
    width = max([32, *(len(name) + 1 for name in registry.plugins)])
    for info in registry.plugins.values():
        origin = (
            "built-in" if info.builtin else f"distribution {info.distribution or '?'} {info.version or ''}".rstrip()
        )
        lines.append(f"  {info.name:<{width}} {origin:<36} {'ok' if info.ok else 'BROKEN'}")
        lines.extend("      error: " + e.replace("\n", "\n             ") for e in info.errors)
    return "\n".join(lines)
