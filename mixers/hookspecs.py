"""The plugin hooks of seqmixers: everything a plugin, built-in or third-party, can do.

A plugin is a module (or object) with functions marked ``@mixers.hookimpl``. Third-party plugins are
found through the ``seqmixers`` entry-point group; the built-ins are registered through the very same
hooks (see ``mixers.plugins.DEFAULT_PLUGINS``), so a third party can do anything a built-in can.

Hooks hand the plugin a ``register`` callable instead of expecting a return value: the registry checks
each entry as it arrives (duplicates, malformed fields) and records which plugin it came from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import argparse
    from collections.abc import Callable

    from mixers.catalogue import BackendRegistrar, FeatureMapRegistrar, MixerRegistrar, OpRegistrar

    CommandRegistrar = Callable[..., argparse.ArgumentParser]  # register(name, run, *, help="", **options)

PROJECT = "seqmixers"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_ops(register: OpRegistrar) -> None:
    """Register ops: call ``register(mixers.ops.Op(...))`` once per op.

    An ``Op`` is the op's name, its backends' signature (a ``Protocol``), its validation (``prepare``), its state
    type, and where its float64 reference and conformance spec live. Calling it validates, dispatches to a
    registered backend and checks what the backend returned: a plugin op gets that for free (see
    ``docs/plugins.md``). Called before the plugin's other hooks; a name that is taken is refused.
    """


@hookspec
def register_backends(register: BackendRegistrar) -> None:
    """Register op backends: call ``register(Backend(...))`` once per backend.

    Called once per plugin when the registry is first used. ``Backend.op`` names the op the
    backend implements (``"retention"`` for ``mixers.functional.retention``); a plugin may also
    implement an op of its own and dispatch to it with ``mixers.registry.resolve_backend``.
    For an op with a built-in backend, ``backend="auto"`` picks a plugin's backend only where the user
    allows it (``SEQMIXERS_AUTO_PLUGINS`` / ``mixers.allow_plugin_backends``); by name it always runs.
    What the backend returns is checked at the op on every call (its structure, shapes, dtypes and devices).
    Raising here (``SystemExit`` included) marks this plugin as broken; the other plugins still load.
    """


@hookspec
def register_mixers(register: MixerRegistrar) -> None:
    """Register token mixers: call ``register(name, factory, ops=(...), description=...)``.

    ``factory(d_model, **options)`` must return a ``mixers.TokenMixer``. ``ops`` names the ops the
    mixer computes with, so that ``mixers.available()`` can list the backends that serve it.
    """


@hookspec
def register_feature_maps(register: FeatureMapRegistrar) -> None:
    """Register feature maps for linear attention: call ``register(name, fn, description=...)``.

    ``fn(x)`` maps ``[B, T, H, D]`` to ``[B, T, H, D']`` in the dtype of ``x``, acting on each token on
    its own (a map that mixes tokens would break causality). The ``"linear_attention"`` mixer picks
    one by name (``feature_map="elu+1"``).
    """


@hookspec
def register_commands(register: CommandRegistrar) -> None:
    """Add subcommands to the ``seqmixers`` command (as ``llm``'s ``register_commands`` does): call
    ``parser = register(name, run, help=...)``, then ``parser.add_argument(...)`` for its options.

    ``run(args: argparse.Namespace) -> int`` returns the exit code (``None``: 0). ``register`` returns the
    command's ``argparse.ArgumentParser``; keyword options other than ``help`` (``description``, ``aliases``,
    ...) go to argparse's ``add_parser``. A name that is taken (a built-in command or another plugin's) is
    refused. Called when the command line names no built-in command (``seqmixers --help``, ``seqmixers
    PLUGIN_COMMAND``), not at registry load; a plugin whose hook raises (``SystemExit`` included) is reported
    on stderr and its commands are left out (``SEQMIXERS_STRICT_PLUGINS=1``: the command fails instead).
    Import torch inside ``run``, not at the top of the plugin's module.
    """
