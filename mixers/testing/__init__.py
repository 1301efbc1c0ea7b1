"""The seqmixers conformance kit: the project's property tests, packaged for plugin authors.

``check_mixer("my_mixer")`` and ``check_op_backend("retention", "my_backend")`` run the whole suite and
raise ``ConformanceError`` (an ``AssertionError``) with every failed check and, for a property, the kit's
own one-line report of the counterexample hypothesis shrank (``ConformanceError.counterexamples``).
The pytest plugin (``mixers.testing.pytest_plugin``, installed through the ``pytest11`` entry point) turns
the same checks into one test each: ``pytest --seqmixers-conformance=NAME[:BACKEND]``, or
``test_conformance = mixer_conformance_tests("my_mixer")`` in a test module.

Needs hypothesis (``pip install seqmixers[testing]``). Names load lazily from the submodules
(``asserts``, ``strategies``, ``reference``, ``ops``, ``conformance``, ``profiles``, ``pytest_plugin``), so neither
``import mixers`` nor pytest's loading of the plugin imports hypothesis.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "asserts": (
        "RTOL",
        "assert_raises_mentioning",
        "assert_rel_close",
        "assert_states_close",
        "max_rel_error",
        "norm_rel_error",
    ),
    "conformance": (
        "D_MODEL",
        "MIXER_CHECKS",
        "NUM_HEADS",
        "OP_CHECKS",
        "REFERENCE_BACKEND",
        "BackendUnavailable",
        "Check",
        "CheckNotApplicable",
        "ConformanceError",
        "Counterexample",
        "MixerTarget",
        "OpTarget",
        "builtin_registry",
        "check_cases",
        "check_mixer",
        "check_op_backend",
        "mixer_target",
        "mixer_targets",
        "op_target",
        "op_targets",
        "run_check",
        "run_split",
        "using_registry",
    ),
    "ops": (
        "OP_SPECS",
        "BadInput",
        "OpSpec",
        "abs_state",
        "core_bad_inputs",
        "each_state_tensor",
        "get_op_spec",
        "standard_bad_inputs",
        "state_tensors",
    ),
    "strategies": ("OpInputs",),
    "pytest_plugin": ("mixer_conformance_tests", "op_conformance_tests"),
    "profiles": ("load_profiles",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
_SUBMODULES = ("asserts", "conformance", "ops", "profiles", "pytest_plugin", "reference", "strategies")

__all__ = sorted([*_MODULE_OF, *_SUBMODULES])


def _import(module: str) -> Any:
    try:
        return importlib.import_module(f"mixers.testing.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in ("hypothesis", "pytest"):
            raise ImportError(
                f"mixers.testing needs {exc.name}: pip install 'seqmixers[testing]' (hypothesis and pytest)"
            ) from exc
        raise


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return _import(name)
    if name in _MODULE_OF:
        return getattr(_import(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'mixers.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
