"""A fake third-party distribution with one plugin of each kind, for testing plugin discovery for real.

``write_fake_distribution(root)`` writes ``fakeplug-0.1.dist-info`` (``METADATA`` and an
``entry_points.txt`` with a ``[seqmixers]`` group) and the plugin modules into ``root``; with ``root``
on ``sys.path``, ``importlib.metadata`` finds the entry points exactly as for an installed package.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

DISTRIBUTION, VERSION = "fakeplug", "0.1"
SECOND_DISTRIBUTION, SECOND_VERSION = "fakeplug-extra", "0.2"

HEADER = """
import torch
import mixers
from mixers.backends import torch_retention
from mixers.catalogue import Backend

CALLS = []


def delegate(*args, **kwargs):
    CALLS.append(kwargs["mode"])
    return torch_retention.retention(*args, **kwargs)
"""

# entry-point name -> (module name, body after HEADER)
PLUGINS: dict[str, tuple[str, str]] = {
    # A good plugin: a low-priority backend and a mixer of its own.
    "fake_good": (
        "fakeplug_good",
        """
        from mixers.retention import MultiScaleRetention

        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="good", fn=delegate, priority=-1, description="fake, delegates"))

        @mixers.hookimpl
        def register_mixers(register):
            register("fake_retention", MultiScaleRetention, ops=("retention",), description="a fake mixer")
    """,
    ),
    # Higher priority than torch, but only float32 on CPU in parallel/chunkwise mode.
    "fake_fast": (
        "fakeplug_fast",
        """
        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="fast", fn=delegate, priority=50, devices=frozenset({"cpu"}),
                             dtypes=frozenset({torch.float32}), modes=frozenset({"parallel", "chunkwise"})))
    """,
    ),
    # Highest priorities, but not available here: one says why, one's check crashes.
    "fake_unavailable": (
        "fakeplug_unavailable",
        """
        def crash():
            raise RuntimeError("probe crashed")

        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="accel", fn=delegate, priority=100,
                             check_available=lambda: "needs the FakeAccel driver, which is not installed"))
            register(Backend(op="retention", name="flaky", fn=delegate, priority=90, check_available=crash))
    """,
    ),
    "fake_broken": (
        "fakeplug_broken",
        """
        import nonexistent_library_for_seqmixers_tests
    """,
    ),
    # A plugin that ends the process at import: it must be recorded as broken like any other.
    "fake_exit": (
        "fakeplug_exit",
        """
        import sys

        sys.exit(3)
    """,
    ),
    # Malformed registrations: the backend registered first must not be committed either.
    "fake_malformed": (
        "fakeplug_malformed",
        """
        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="staged", fn=delegate))
            register(Backend(op="retention", name="auto", fn=delegate))
    """,
    ),
    "fake_not_a_backend": (
        "fakeplug_not_a_backend",
        """
        @mixers.hookimpl
        def register_backends(register):
            register({"op": "retention", "name": "dict"})
    """,
    ),
    "fake_bad_mixer": (
        "fakeplug_bad_mixer",
        """
        @mixers.hookimpl
        def register_mixers(register):
            register("fake_bad_mixer", 42)
    """,
    ),
    # A hook implementation with the wrong argument name: pluggy rejects the plugin.
    "fake_bad_hook": (
        "fakeplug_bad_hook",
        """
        @mixers.hookimpl
        def register_backends(registrar):
            pass
    """,
    ),
    "fake_raising": (
        "fakeplug_raising",
        """
        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="partial", fn=delegate))
            raise RuntimeError("fake hook exploded")
    """,
    ),
    # Duplicates of the built-in torch backend and retention mixer, plus one new backend that must load.
    "fake_duplicate": (
        "fakeplug_duplicate",
        """
        from mixers.retention import MultiScaleRetention

        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="torch", fn=delegate, priority=1000))
            register(Backend(op="retention", name="dup_ok", fn=delegate, priority=-2))

        @mixers.hookimpl
        def register_mixers(register):
            register("retention", MultiScaleRetention, ops=("retention",))
    """,
    ),
}

GOOD = ("fake_good", "fake_fast", "fake_unavailable")
BROKEN = tuple(name for name in PLUGINS if name not in GOOD)
# A second distribution that reuses a plugin name of the first one.
SECOND = {"fake_good": "fakeplug_fast"}


def _dist_info(root: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[seqmixers]", *(f"{ep} = {module}" for ep, module in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def write_fake_distribution(root: Path, *, second: bool = False) -> Path:
    """Write the plugin modules and ``fakeplug-0.1.dist-info`` (and optionally a second distribution)."""
    for module, body in PLUGINS.values():
        (root / f"{module}.py").write_text(HEADER + textwrap.dedent(body))
    _dist_info(root, DISTRIBUTION, VERSION, {ep: module for ep, (module, _) in PLUGINS.items()})
    if second:
        _dist_info(root, SECOND_DISTRIBUTION, SECOND_VERSION, SECOND)
    return root


def forget_fake_modules() -> None:
    """Drop the imported fake plugin modules, so the next test imports its own copies."""
    for name in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[name]


# -- A second distribution for the conformance kit's tests: broken plugins and backends with wrong answers --
WRONG_DISTRIBUTION, WRONG_VERSION = "fakeplug-wrong", "0.3"

WRONG_PLUGINS: dict[str, tuple[str, str]] = {
    "wrong_import": (
        "wrongplug_import",
        """
        raise RuntimeError("plugin exploded at import")
    """,
    ),
    # A malformed backend (a priority that is not an int): nothing of this plugin is kept.
    "wrong_malformed": (
        "wrongplug_malformed",
        """
        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="malformed", fn=delegate, priority="high"))
    """,
    ),
    # Two retention backends that run and are self-consistent in places, but compute the wrong thing.
    "wrong_answers": (
        "wrongplug_answers",
        """
        def off_by_one(q, k, v, gamma, *, mode, chunk_size, initial_state):
            # decays gamma^(t-s+1) instead of gamma^(t-s): each output is gamma times the right one, in every
            # mode and every split alike, so only a comparison with the reference catches it
            o, state = torch_retention.retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size,
                                                 initial_state=initial_state)
            return o * gamma.to(o.dtype)[None, None, :, None], state

        def ragged_chunks(q, k, v, gamma, *, mode, chunk_size, initial_state):
            # chunkwise with a chunk size that does not divide T: the last, shorter chunk forgets the state
            T = q.shape[1]
            if mode != "chunkwise" or T % chunk_size == 0 or T < chunk_size:
                return torch_retention.retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size,
                                                 initial_state=initial_state)
            cut = T - T % chunk_size
            o1, _ = torch_retention.retention(q[:, :cut], k[:, :cut], v[:, :cut], gamma, mode=mode,
                                              chunk_size=chunk_size, initial_state=initial_state)
            o2, s2 = torch_retention.retention(q[:, cut:], k[:, cut:], v[:, cut:], gamma, mode=mode,
                                               chunk_size=chunk_size, initial_state=None)
            return torch.cat([o1, o2], dim=1), s2

        @mixers.hookimpl
        def register_backends(register):
            register(Backend(op="retention", name="off_by_one", fn=off_by_one, priority=-20))
            register(Backend(op="retention", name="ragged_chunks", fn=ragged_chunks, priority=-20))
    """,
    ),
}


AGAIN_DISTRIBUTION, AGAIN_VERSION = "fakeplug-wrong-again", "0.4"


def write_wrong_distribution(root: Path, *, again: bool = False) -> Path:
    """Write ``fakeplug-wrong``: a plugin raising at import, a malformed backend, and two wrong backends.

    With ``again``, also ``fakeplug-wrong-again``, whose plugin registers the same two backend names.
    """
    for module, body in WRONG_PLUGINS.values():
        (root / f"{module}.py").write_text(HEADER + textwrap.dedent(body))
    _dist_info(root, WRONG_DISTRIBUTION, WRONG_VERSION, {ep: module for ep, (module, _) in WRONG_PLUGINS.items()})
    if again:
        (root / "wrongplug_again.py").write_text(HEADER + textwrap.dedent(WRONG_PLUGINS["wrong_answers"][1]))
        _dist_info(root, AGAIN_DISTRIBUTION, AGAIN_VERSION, {"wrong_again": "wrongplug_again"})
    return root


def forget_wrong_modules() -> None:
    for name in [m for m in sys.modules if m.startswith("wrongplug_")]:
        del sys.modules[name]


# -- Distributions for the op boundary, the "auto" policy and entry-point names shared between distributions --
OUTPUT_DISTRIBUTION, OUTPUT_VERSION = "fakeplug-output", "0.5"

OUTPUT_PLUGIN = (
    "outplug_backends",
    """
    from mixers.backends import torch_linear_attention, torch_softmax_attention

    def wrong(mutate):
        def fn(*args, **kwargs):
            return mutate(*torch_retention.retention(*args, **kwargs))
        return fn

    def zeros(q, k, v, gamma, *, mode, chunk_size, initial_state):
        o, state = torch_retention.retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size,
                                             initial_state=initial_state)
        return torch.zeros_like(o), state

    SEEN = []

    def right_once(q, k, v, gamma, **kwargs):
        # right on its first call, then it drops the last head: caught only if every call is checked
        o, state = torch_retention.retention(q, k, v, gamma, **kwargs)
        SEEN.append(tuple(q.shape))
        return (o if len(SEEN) == 1 else o[:, :, :-1]), state

    def linear_no_z(*args, **kwargs):
        o, (kv, z) = torch_linear_attention.linear_attention(*args, **kwargs)
        return o, (kv, z[..., :-1])

    def softmax_stale_cache(q, k, v, *, mode, chunk_size, initial_state):
        o, cache = torch_softmax_attention.softmax_attention(q, k, v, mode=mode, chunk_size=chunk_size,
                                                             initial_state=initial_state)
        return o, (k, v, cache.length)  # forgets the cached tokens

    def own_op(x, *, mode):
        return x

    @mixers.hookimpl
    def register_backends(register):
        for name, fn in [
            ("wrong_shape", wrong(lambda o, s: (o[..., :-1], s))),
            ("wrong_dtype", wrong(lambda o, s: (o.double(), s))),
            ("wrong_state", wrong(lambda o, s: (o, s[:, :, :-1]))),
            ("not_a_pair", wrong(lambda o, s: o)),
            ("right_once", right_once),
        ]:
            register(Backend(op="retention", name=name, fn=fn, priority=-30))
        # high priority, right shapes, wrong values: only the "auto" policy keeps it away from models
        register(Backend(op="retention", name="zeros", fn=zeros, priority=1000))
        register(Backend(op="linear_attention", name="no_z", fn=linear_no_z, priority=-30))
        register(Backend(op="softmax_attention", name="stale_cache", fn=softmax_stale_cache, priority=-30))
        # an op no built-in serves, and no mixer uses: "auto" takes any backend of it
        register(Backend(op="fake_free_op", name="free", fn=own_op))
        # a higher-priority backend for another plugin's own op: "auto" leaves that op to its owner
        register(Backend(op="fake_own_op", name="intruder", fn=own_op, priority=100))
    """,
)

OWNER_PLUGIN = (
    "outplug_owner",
    """
    from mixers.retention import MultiScaleRetention

    def own_op(x, *, mode):
        return x

    @mixers.hookimpl
    def register_backends(register):
        register(Backend(op="fake_own_op", name="own", fn=own_op))

    @mixers.hookimpl
    def register_mixers(register):
        register("fake_own_mixer", MultiScaleRetention, ops=("fake_own_op",))
    """,
)


def write_output_distribution(root: Path) -> Path:
    """``fakeplug-output``: plugin ``fake_outputs`` (backends returning wrong structures, shapes, dtypes, or
    zeros at a high priority) and plugin ``fake_owner`` (a mixer with an op of its own)."""
    for module, body in (OUTPUT_PLUGIN, OWNER_PLUGIN):
        (root / f"{module}.py").write_text(HEADER + textwrap.dedent(body))
    _dist_info(
        root, OUTPUT_DISTRIBUTION, OUTPUT_VERSION, {"fake_outputs": OUTPUT_PLUGIN[0], "fake_owner": OWNER_PLUGIN[0]}
    )
    return root


TWIN_NAME = "fake_twin"
HEALTHY_TWIN, HEALTHY_TWIN_VERSION = "fakeplug-twin", "0.7"
BROKEN_TWIN, BROKEN_TWIN_VERSION = "fakeplug-twin-broken", "0.6"
TWIN_BODIES = {
    "healthy": """
    @mixers.hookimpl
    def register_backends(register):
        register(Backend(op="retention", name="twin", fn=delegate, priority=-40))
    """,
    # exits at import
    "exit": """
    import sys

    sys.exit("twin gives up")
    """,
    # a valid hook before an invalid one: pluggy keeps what it registered before it rejects the plugin
    "bad_hook": """
    @mixers.hookimpl
    def register_backends(register):
        register(Backend(op="retention", name="twin_partial", fn=delegate, priority=-40))

    @mixers.hookimpl
    def register_mixers(registrar):
        pass
    """,
}


def write_twin_distribution(root: Path, kind: str) -> Path:
    """A distribution declaring entry point ``fake_twin``: the healthy one, or a broken one (``kind``)."""
    module = f"twinplug_{kind}"
    (root / f"{module}.py").write_text(HEADER + textwrap.dedent(TWIN_BODIES[kind]))
    name, version = (HEALTHY_TWIN, HEALTHY_TWIN_VERSION) if kind == "healthy" else (BROKEN_TWIN, BROKEN_TWIN_VERSION)
    _dist_info(root, name, version, {TWIN_NAME: module})
    return root


def write_interrupt_distribution(root: Path) -> Path:
    """``fakeplug-interrupt``: plugin ``fake_interrupt`` raises KeyboardInterrupt at import (as Ctrl-C would)."""
    (root / "intplug.py").write_text("raise KeyboardInterrupt\n")
    _dist_info(root, "fakeplug-interrupt", "0.8", {"fake_interrupt": "intplug"})
    return root


def forget_other_fake_modules() -> None:
    for name in [m for m in sys.modules if m.startswith(("outplug_", "twinplug_", "intplug"))]:
        del sys.modules[name]
