"""The documentation runs: every ```python block of README.md and docs/**/*.md, and the quick ``seqmixers``
commands of its shell blocks, so that the docs cannot drift from the code (issue 21). The fence conventions
are in docs/testing.md (section "The documentation's examples"):

- ```python runs. The blocks of one file run in document order in one namespace, in a temporary working
  directory, with a fresh registry; the file's shell blocks run in the same directory, in the same order.
- ```python signature shows signatures: each call ``NAME(params)`` in it must match ``inspect.signature``
  (names, order, keyword-only marker, defaults); a last ``...`` stands for the parameters left out.
- ```bash, ```sh or ```console (only its ``$ `` lines) runs each command in process, through the
  ``seqmixers`` entry point (``models.cli.main``), and wants exit code 0. Only ``seqmixers ...`` and
  ``python -m mixers|models ...`` commands run; a block with any other command must be marked no-ci.
- ```LANG no-ci: REASON is not run here (a GPU, several processes, the network, minutes); REASON says why.
  Its Python must still compile, and its ``seqmixers`` command lines (torchrun's too) must parse.
- ```toml and ```json blocks must parse; a toml block with a ``[model]`` table must load as a run file.

``python tests/test_docs.py`` lists every block and what the test does with it. Numbers quoted in the docs
are checked at the end of this file against the code and ``benchmarks/results/``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import re
import shlex
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
KNOWN = {"python", "toml", "json", "text", "", *SHELLS}  # a new kind of block is a decision: add it here
PYTHON_M = ("mixers", "models", "models.cli")  # the python -m forms of the seqmixers command
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, what the test does with it, and its text (dedented)."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    mark: str  # "run", "signature" or "no-ci"
    reason: str
    body: str
    error: str = ""  # a malformed fence info string

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def _parse_info(info: str) -> tuple[str, str, str, str]:
    """``(lang, mark, reason, error)`` from a fence's info string, e.g. ``python no-ci: needs a GPU``."""
    lang, _, rest = info.strip().partition(" ")
    rest = rest.strip()
    if not rest:
        return lang, "run", "", ""
    if rest == "signature" and lang == "python":
        return lang, "signature", "", ""
    if rest.startswith("no-ci"):
        reason = rest[len("no-ci") :].lstrip(":").strip()
        return lang, "no-ci", reason, "" if reason else "a no-ci mark needs a reason: 'no-ci: WHY'"
    expected = "expected LANG, 'python signature' or 'LANG no-ci: WHY'"
    return lang, "run", "", f"unknown fence info {info.strip()!r}: {expected}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file (indented fences too, as inside list items)."""
    lines, found, i = path.read_text(encoding="utf-8").splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        close = re.compile(rf"^ {{0,{indent}}}{re.escape(fence[0]) * len(fence)}+\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), None)
        assert end is not None, f"{path}:{i + 1}: a fence that is never closed"
        body = "\n".join(re.sub(rf"^ {{0,{indent}}}", "", line) for line in lines[i + 1 : end])
        lang, mark, reason, error = _parse_info(m["info"])
        found.append(Block(path, i + 1, lang, mark, reason, body, error))
        i = end + 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]


# -- shell commands ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    words: list[str]
    argv: list[str] | None  # the seqmixers arguments, for a seqmixers command (run by torchrun or not)
    torchrun: bool


def _command(words: list[str]) -> Command:
    """What a command line is: ``seqmixers ARGS``, ``python -m mixers|models ARGS``, torchrun of either, or other."""
    while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    torchrun, rest = words[:1] == ["torchrun"], words
    if torchrun:  # torchrun [opts] -m models.cli ARGS, or torchrun [opts] --no-python seqmixers ARGS
        at = {w: i for i, w in reversed(list(enumerate(words)))}
        rest = words[at["--no-python"] + 1 :] if "--no-python" in at else ["python", *words[at.get("-m", len(words)) :]]
    if rest[:1] == ["seqmixers"]:
        return Command(words, rest[1:], torchrun)
    if len(rest) >= 3 and re.fullmatch(r"python3?", rest[0]) and rest[1] == "-m" and rest[2] in PYTHON_M:
        return Command(words, rest[3:], torchrun)
    return Command(words, None, torchrun)


def commands(block: Block) -> list[Command]:
    """The commands of a shell block: console blocks' ``$`` lines, every line of the others; continuation
    lines joined, comments dropped, and ``&&``, ``||``, ``;``, ``|`` separating commands."""
    lines = block.body.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in text.splitlines():
        words: list[str] = []
        for word in [*shlex.split(line, comments=True), ";"]:
            if word in ("&&", "||", ";", "|"):
                if words:
                    found.append(_command(words))
                words = []
            else:
                words.append(word)
    return found


def run_seqmixers(argv: list[str]) -> int:
    """``seqmixers ARGV`` in this process, as the console script runs it; its exit code."""
    from models.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # --help, --version, a usage error
        return exc.code if isinstance(exc.code, int) else 1


def parse_seqmixers(argv: list[str]) -> str | None:
    """Why ``seqmixers ARGV`` does not parse (None if it does, or if it names no built-in command)."""
    from models.cli import parser

    p = parser()
    builtins = next(a.choices for a in p._actions if isinstance(a.choices, dict))
    if argv and not argv[0].startswith("-") and argv[0] not in builtins:
        return None  # a plugin's command (the plugins tutorial's), which this installation does not have
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            p.parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else f"seqmixers {shlex.join(argv)} does not parse: {err.getvalue().strip()}"
    return None


# -- the checks of blocks -----------------------------------------------------------------------------------
def test_every_block_runs_or_says_why_not():
    """Each python or shell block runs, is a signature, or carries ``no-ci: REASON``; every fence is known."""
    problems = [f"{b.where}: {b.error}" for b in ALL if b.error]
    problems += [
        f"{b.where}: unknown block language {b.lang!r} (known: {sorted(KNOWN)})" for b in ALL if b.lang not in KNOWN
    ]
    problems += [
        f"{b.where}: only python and shell blocks take marks"
        for b in ALL
        if b.mark != "run" and b.lang not in ("python", *SHELLS)
    ]
    for b in ALL:
        if b.lang in SHELLS and b.mark == "run":
            others = [shlex.join(c.words) for c in commands(b) if c.argv is None or c.torchrun]
            problems += [
                f"{b.where}: `{c}` is not a command the doc test runs: mark the block 'no-ci: WHY'" for c in others
            ]
            if not commands(b):
                problems.append(f"{b.where}: a shell block without commands")
    assert not problems, "\n".join(problems)


NOT_RUN = [b for b in ALL if b.mark == "no-ci"]


@pytest.mark.parametrize("block", NOT_RUN, ids=[b.where for b in NOT_RUN])
def test_blocks_not_run_in_ci_still_compile_and_parse(block):
    """The blocks CI cannot run (listed by id, each with its reason): Python compiles, commands parse."""
    assert block.reason
    if block.lang == "python":
        compile(block.body, block.where, "exec")
    for command in commands(block) if block.lang in SHELLS else []:
        if command.argv is not None:
            assert parse_seqmixers(command.argv) is None, f"{block.where}: {parse_seqmixers(command.argv)}"


def _module_name(path: Path) -> str:
    return "docs_" + re.sub(r"\W", "_", str(path.relative_to(ROOT)))


@contextlib.contextmanager
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: Path):
    """A temporary working directory, a fresh registry, and torch's threads, dtype and RNG put back after."""
    from mixers.registry import Registry
    from mixers.testing.conformance import using_registry

    monkeypatch.chdir(tmp_path)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    module = types.ModuleType(_module_name(path))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        with torch.random.fork_rng(), using_registry(Registry().load()):
            yield module
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


RUN_FILES = [p for p in DOCS if any(b.mark == "run" and b.lang in ("python", *SHELLS) for b in blocks(p))]


@pytest.mark.parametrize("path", RUN_FILES, ids=[str(p.relative_to(ROOT)) for p in RUN_FILES])
def test_examples_run(path, tmp_path, monkeypatch):
    """A file's python blocks and shell commands, in document order: tracebacks point at the Markdown lines.
    Each block has ``BLOCK_SECONDS``: a slower one is to be made smaller or marked no-ci."""
    with _isolated(tmp_path, monkeypatch, path) as module:
        for block in blocks(path):
            if block.mark != "run" or block.lang not in ("python", *SHELLS):
                continue
            with _time_limit(block):
                if block.lang == "python":
                    code = compile("\n" * block.line + block.body, str(path), "exec")  # line numbers of the .md
                    exec(code, module.__dict__)
                    continue
                for command in commands(block):
                    words = shlex.join(command.words)
                    assert command.argv is not None and not command.torchrun, f"{block.where}: `{words}` is not run"
                    code = run_seqmixers(command.argv)
                    assert code == 0, f"{block.where}: `{words}` exited {code}"


BLOCK_SECONDS = 60


@contextlib.contextmanager
def _time_limit(block: Block):
    """Stop a block that runs longer than ``BLOCK_SECONDS`` (POSIX main thread; elsewhere no limit)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{block.where} ran over {BLOCK_SECONDS} s: make the example smaller or mark it no-ci")

    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(BLOCK_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- signatures ---------------------------------------------------------------------------------------------
RECEIVERS = {"model": "models.lm.LanguageModel", "mixer": "mixers.interface.TokenMixer"}


def _resolve(name: str) -> Any:
    """A documented callee: a dotted import path, or ``model.x`` / ``mixer.x`` (``mixer(...)`` is ``forward``)."""
    head, _, attr = name.partition(".")
    if head in RECEIVERS:
        module, _, cls = RECEIVERS[head].rpartition(".")
        return getattr(getattr(importlib.import_module(module), cls), attr or "forward")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        with contextlib.suppress(ModuleNotFoundError):
            obj = importlib.import_module(".".join(parts[:i]))
            for part in parts[i:]:
                obj = getattr(obj, part)
            return obj
    raise LookupError(f"cannot resolve {name!r}")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets and strings."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def signature_calls(body: str) -> list[tuple[str, list[str]]]:
    """``(callee, [entries])`` for each outermost call ``NAME(...)`` of a signature block."""
    text = "\n".join(line.split("  #")[0] for line in body.splitlines())
    calls, i = [], 0
    while m := re.compile(r"([A-Za-z_][\w.]*)\(").search(text, i):
        depth, j = 0, m.end() - 1
        for j in range(m.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
        calls.append((m[1], _split_top(text[m.end() : j])))
        i = j + 1
    return calls


def signature_mismatches(callee: str, entries: list[str]) -> list[str]:
    """How the documented ``callee(entries)`` differs from the real signature (empty: it matches)."""
    params = [p for p in inspect.signature(_resolve(callee)).parameters.values() if p.name not in ("self", "cls")]
    partial = entries[-1:] == ["..."]
    entries = entries[:-1] if partial else entries
    documented, keyword_only = [], False
    for entry in entries:
        if entry == "*":
            keyword_only = True
            continue
        m = re.fullmatch(r"(\*{0,2}\w+)(?:\s*=\s*(.+))?", entry, re.S)
        if not m:
            return [f"{callee}: {entry!r} is not a parameter (write NAME, NAME=DEFAULT, * or a last ...)"]
        documented.append((m[1].lstrip("*"), m[2], keyword_only))
    names = [p.name for p in params]
    shown = [name for name, _, _ in documented]
    if shown != (names[: len(shown)] if partial else names):
        return [f"{callee}: documented parameters {shown}, real ones {names}"]
    problems = []
    for (name, default, kw_only), p in zip(documented, params, strict=False):
        if kw_only != (p.kind is inspect.Parameter.KEYWORD_ONLY):
            problems.append(
                f"{callee}: {name} is {'not ' * (not kw_only)}documented keyword-only; it is {p.kind.description}"
            )
        has_default = p.default is not inspect.Parameter.empty
        if (default is not None) != has_default:
            problems.append(
                f"{callee}: {name} documented {'with' if default else 'without'} a default; real: {p.default!r}"
            )
        elif default not in (None, "...") and eval(default, {"torch": torch}) != p.default:  # our docs' text
            problems.append(f"{callee}: {name} documented default {default}, real {p.default!r}")
    return problems


SIGNATURES = [b for b in ALL if b.mark == "signature"]


@pytest.mark.parametrize("block", SIGNATURES, ids=[b.where for b in SIGNATURES])
def test_documented_signatures_match_the_code(block):
    calls = signature_calls(block.body)
    assert calls, f"{block.where}: a signature block without a call"
    problems = [p for callee, entries in calls for p in signature_mismatches(callee, entries)]
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


# -- data blocks --------------------------------------------------------------------------------------------
DATA = [b for b in ALL if b.lang in ("toml", "json")]


@pytest.mark.parametrize("block", DATA, ids=[b.where for b in DATA])
def test_config_and_data_blocks_parse(block, tmp_path):
    """TOML and JSON blocks parse; a TOML run file (one with [model]) loads and its model config is valid."""
    from models.config import load_run_config, read_document

    path = tmp_path / f"block.{block.lang}"
    path.write_text(block.body, encoding="utf-8")
    if "model" in read_document(path):
        load_run_config(path)


# -- the checker itself catches drift ------------------------------------------------------------------------
BROKEN = """
```python
undefined_name + 1
```

```python signature
o, state = mixers.functional.retention(q, k, v, gamma, *, mode, chunk_size=64)
```

```bash
pip install seqmixers
```

```bash no-ci
seqmixers train --config retnet-tiny --stepz 3
```

```console no-ci: the options drifted
$ seqmixers generate model.safetensors --max-new-tokenz 3
```
"""


def test_the_checks_catch_broken_examples(tmp_path, monkeypatch):
    """A failing example, a wrong signature, an unmarked or reasonless block and a bad option are all caught."""
    path = tmp_path / "broken.md"
    path.write_text(BROKEN, encoding="utf-8")
    found = blocks(path)
    with pytest.raises(NameError, match="undefined_name"):
        exec(compile("\n" * found[0].line + found[0].body, str(path), "exec"), {})
    ((callee, entries),) = signature_calls(found[1].body)
    assert signature_mismatches(callee, entries) == [
        f"{callee}: documented parameters {['q', 'k', 'v', 'gamma', 'mode', 'chunk_size']}, real ones "
        f"{[p for p in inspect.signature(_resolve(callee)).parameters]}"
    ]
    assert [c.argv for c in commands(found[2])] == [None]  # not a command the test runs: it must be marked
    assert found[3].error.startswith("a no-ci mark needs a reason")
    (command,) = commands(found[4])
    assert "--max-new-tokenz" in parse_seqmixers(command.argv)
    monkeypatch.setattr(sys.modules[__name__], "BLOCK_SECONDS", 1)
    with pytest.raises(TimeoutError, match="ran over 1 s"), _time_limit(found[0]):
        time.sleep(10)
    assert signature_mismatches("models.lm.LanguageModel.generate", ["prompt", "max_new_tokens", "..."]) == []
    assert (
        "temperature documented default 2.0"
        in signature_mismatches(
            "models.lm.LanguageModel.generate", ["prompt", "max_new_tokens", "*", "temperature=2.0", "..."]
        )[0]
    )


# -- the testing API is documented --------------------------------------------------------------------------
def test_every_public_name_of_strategies_and_reference_is_documented():
    """docs/testing-api.md documents each public name of ``mixers.testing.strategies`` and
    ``mixers.testing.reference``, and each core op's cases and reference (``mixers/ops/<op>/testing.py``,
    ``reference.py``: the classes and functions defined there)."""
    from mixers.registry import get_registry
    from mixers.testing import reference, strategies

    text = (ROOT / "docs" / "testing-api.md").read_text(encoding="utf-8")
    folders = [
        importlib.import_module(f"mixers.ops.{op.name}.{part}")
        for op in get_registry().ops.values()
        if op.plugin.startswith("mixers.ops.")
        for part in ("testing", "reference")
    ]
    own = [
        n
        for m in folders
        for n, v in vars(m).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == m.__name__
    ]
    names = [*strategies.__all__, *reference.__all__, *own]
    missing = [name for name in names if not re.search(rf"`{name}[`(]", text)]
    assert not missing, f"docs/testing-api.md does not document {missing}"


# -- numbers quoted in the docs -----------------------------------------------------------------------------
def _preset_parameters() -> dict[str, int]:
    from models import build_model
    from models.config import load_run_config, presets

    return {name: build_model(load_run_config(path)[0]).num_parameters() for name, path in presets().items()}


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of a text: rows of cells (the header first, the ``|---|`` line left out)."""
    found, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|[-:| ]+\|", line.strip()):
                rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            found, rows = [*found, rows], []
    return found


def test_parameter_counts_quoted_for_the_presets_are_the_models():
    """In every table with a "params" or "parameters" column (README's demo table, models.md's presets), a
    preset's row gives what building the preset gives; so does the rounded "about Nk parameters" of models.md."""
    counts = _preset_parameters()
    quoted = []
    for path in DOCS:
        for header, *rows in tables(path.read_text(encoding="utf-8")):
            column = next((i for i, cell in enumerate(header) if cell.lower().startswith("param")), None)
            for row in rows if column is not None else []:
                if row[0].strip("`") in counts:
                    quoted.append((path, row[0].strip("`"), int(row[column].replace(",", ""))))
    assert {name for _, name, _ in quoted} == set(counts), quoted  # every preset is quoted somewhere
    wrong = [
        f"{p.relative_to(ROOT)}: {name} quoted {n:,}, builds {counts[name]:,}"
        for p, name, n in quoted
        if counts[name] != n
    ]
    assert not wrong, "\n".join(wrong)
    about = re.search(r"about (\d+)k parameters", (ROOT / "docs" / "models.md").read_text(encoding="utf-8"))
    assert about and all(abs(n - 1000 * int(about[1])) < 1000 for n in counts.values()), (about, counts)  # within 1k


def test_readme_demo_table_is_the_recorded_demo():
    """The README's demo table is ``benchmarks/results/demo.json``, rounded as printed (model, parameters,
    perplexity, tokens/s, decode ms at the two table lengths)."""
    results = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`benchmarks/results/demo.json`" in text
    for m in results["models"]:
        decode = {row["T"]: row for row in m["decode"]}
        a, b = results["table_lengths"]
        want = (
            f"| {m['name']} | {m['params']:,} | {m['val_ppl']:.2f} | {m['tokens_per_s']:,.0f} | "
            f"{decode[a]['decode_ms']:.2f} / {decode[b]['decode_ms']:.2f} |"
        )
        assert want in text, f"README.md has no row {want!r} (from demo.json)"


def test_corpus_size_quoted_is_the_embedded_corpus():
    """Wherever the docs give the embedded corpus's size, it is that of ``models.training.data.default_corpus()`` (which
    depends a little on the Python version: 2% either way)."""
    from models.training.data import default_corpus

    kib = len(default_corpus()) / 1024
    quotes = {
        "README.md": r"300 steps on (\d+) KiB of text",
        "docs/cli.md": r"`pydoc_data\.topics`, (\d+) KiB",
        "docs/models.md": r"behind `help\(\"if\"\)`, (\d+) KiB",
    }
    for doc, pattern in quotes.items():
        m = re.search(pattern.replace(" ", r"\s+"), (ROOT / doc).read_text(encoding="utf-8"))  # lines may wrap
        assert m, f"{doc}: no corpus size quoted as {pattern!r}"
        assert abs(int(m[1]) - kib) <= 0.02 * kib, f"{doc} quotes {m[1]} KiB; the corpus is {kib:.0f} KiB"


def test_compile_time_quoted_covers_the_recorded_first_calls():
    """cli.md's compile time of ``generate --compile`` spans the first compiled calls that
    ``benchmarks/results/compile_decode*.json`` recorded (warm and cold inductor caches)."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    m = re.search(r"compiled once, on the first token \((\d+) to (\d+) s".replace(" ", r"\s+"), text)
    assert m, "docs/cli.md: no compile time quoted as 'compiled once, on the first token (A to B s'"
    seconds = [
        row["compile_s"]
        for path in sorted((ROOT / "benchmarks" / "results").glob("compile_decode*.json"))
        for row in json.loads(path.read_text())["decode"]
    ]
    assert seconds and int(m[1]) <= min(seconds) and max(seconds) <= int(m[2]) + 1, (m[0], sorted(seconds))
    assert all(
        f"`benchmarks/results/{p.name}`" in text for p in (ROOT / "benchmarks" / "results").glob("compile_decode*.json")
    )


def _table_default(text: str) -> Any:
    """A default as models.md's tables write it: ``none``, ``false``, a number, a quoted string, a list or table."""
    text = text.strip().strip("`")
    words = {"none": None, "false": False, "true": True, "{}": {}}
    return words[text] if text in words else ast.literal_eval(text)


def test_config_defaults_in_models_md_are_the_dataclasses():
    """models.md's ModelConfig and TrainConfig tables give each field's default as the dataclass has it (rows
    may group fields, ``| `a`, `b` | 1, 2 |``), and every field has a row."""
    import dataclasses

    import models

    text = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    for cls, heading in ((models.ModelConfig, "## Config reference"), (models.TrainConfig, "### TrainConfig")):
        header, *rows = tables(text[text.index(heading) :])[0]
        column, documented = header.index("default"), {}
        for row in rows:
            names = re.findall(r"`(\w+)`", row[0])
            values = _split_top(row[column]) if len(names) > 1 else [row[column]]
            assert len(values) == len(names), f"models.md {heading}: row {row}"
            documented.update(zip(names, values, strict=True))
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            assert f.name in documented, f"models.md {heading}: no row for {f.name!r}"
            assert _table_default(documented[f.name]) == default, (cls.__name__, f.name, documented[f.name], default)


def _sections(text: str) -> list[str]:
    return re.split(r"^#+ ", text, flags=re.M)


def test_benchmark_figures_name_their_result_file():
    """A section that quotes a benchmark script's table names the JSON it comes from, and every result file
    the docs name exists."""
    problems = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for section in _sections(text):
            script = re.search(r"benchmarks/(\w+)\.py", section)
            table = re.search(r"^\|.*\d.*\|$", section, re.M)
            if script and table and "benchmarks/results/" not in section and "not yet measured" not in section:
                problems.append(f"{path.relative_to(ROOT)}: section {section.splitlines()[0]!r} has no result file")
        for name in re.findall(r"benchmarks/results/([\w./-]+\.(?:json|png))", text):
            if not (ROOT / "benchmarks" / "results" / name).exists():
                problems.append(f"{path.relative_to(ROOT)}: benchmarks/results/{name} does not exist")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":  # the list of blocks and what the test does with each
    for b in ALL:
        if b.lang in ("python", *SHELLS, "toml", "json"):
            what = {"run": "runs", "signature": "signature checked", "no-ci": f"not run in CI: {b.reason}"}[b.mark]
            if b.lang in ("toml", "json"):
                what = "parsed"
            print(f"{b.where:36} {b.lang or '-':8} {what}")
