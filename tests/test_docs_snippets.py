"""The docs cannot drift from the code: every `python -c` snippet that README.md and docs/*.md give runs, every
`gradfilter_ops` module, name and file they name exists (also as `module.name` in inline code, where `module` is a
module of the package or of tools/), and every relative link points at a file."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Snippets not run, each with why (matched by a substring of the snippet); their imports are still checked.
SKIPPED = {
    "bench_speed.ops_per_batch": "docs/speed.md's operation count: 3 minutes of compute on 2 CPU cores",
}
# Files the snippets read by the name the docs give a user's own data.
PLACEHOLDER_FILES = {"my.jsonl": '{"instruction": "Say hello.", "output": "Hello."}\n'}

PYTHON_C = re.compile(r"""\bpython3? -c (?:"([^"]*)"|'([^']*)')""")
HEREDOC = re.compile(r"\bpython3? - <<'?(\w+)'?[^\n]*\n(.*?)\n\1\n", re.S)
FROM_IMPORT = re.compile(r"^\s*from (gradfilter_ops(?:\.\w+)*) import ([\w ,()]+?)\s*(?:#.*)?$", re.M)
PLAIN_IMPORT = re.compile(r"^\s*import (gradfilter_ops(?:\.\w+)*)", re.M)
DOTTED = re.compile(r"\bgradfilter_ops(?:\.\w+)+")
FILE_PATH = re.compile(r"(?<![\w./-])((?:gradfilter_ops|tools|tests|recipes)/[\w./-]*\w)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SHORT_REF = re.compile(r"`([A-Za-z_]\w*(?:\.\w+)+)`")
FILE_SUFFIXES = {"csv", "gguf", "json", "jsonl", "md", "npz", "png", "py", "safetensors", "sh", "toml", "txt", "yaml"}


@dataclass(frozen=True)
class Snippet:
    """Python code a doc tells the reader to run: `kind` is `-c` or `heredoc`."""
    kind: str
    code: str


def snippets(text: str) -> list[Snippet]:
    """Every `python -c "..."` and `python - <<'PY' ... PY` snippet of a markdown text, in order."""
    found = [Snippet("-c", m.group(1) if m.group(1) is not None else m.group(2)) for m in PYTHON_C.finditer(text)]
    return found + [Snippet("heredoc", m.group(2)) for m in HEREDOC.finditer(text)]


def import_names(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every `from gradfilter_ops... import a, b` and `import gradfilter_ops...` line."""
    found = []
    for m in FROM_IMPORT.finditer(text):
        names = (n.strip().split(" as ")[0].strip() for n in m.group(2).strip("() ").split(","))
        found.append((m.group(1), tuple(n for n in names if n)))
    return found + [(m.group(1), ()) for m in PLAIN_IMPORT.finditer(text)]


def resolve(dotted: str) -> str | None:
    """None if `gradfilter_ops.a.b.c` names a module or an attribute chain that exists; else what is missing."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        here = ".".join(parts[:depth])
        if isinstance(obj, ModuleType) and hasattr(obj, "__path__") \
                and importlib.util.find_spec(f"{here}.{part}") is not None:
            obj = importlib.import_module(f"{here}.{part}")
            continue
        return f"`{here}` has no `{part}`"
    return None


def package_modules() -> dict[str, list[str]]:
    """Each module file's name in the package (`grads`) -> its dotted paths (`gradfilter_ops.engine.grads`)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "gradfilter_ops").rglob("*.py")):
        if path.stem != "__init__":
            found.setdefault(path.stem, []).append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def tool_names(stem: str) -> set[str]:
    """The top-level names of tools/<stem>.py, read without importing it (the tools import torch at the top)."""
    names = set()
    for node in ast.parse((ROOT / "tools" / f"{stem}.py").read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def short_ref_problem(ref: str, modules: dict[str, list[str]]) -> str | None:
    """For `module.name` in inline code: what is missing, if `module` is a module of the package (one of its
    paths must have `name`) or of tools/; None otherwise (file names and other libraries are not checked)."""
    first, *rest = ref.split(".")
    if rest[-1] in FILE_SUFFIXES:
        return None
    if first in modules:
        whys = [resolve(".".join([path, *rest])) for path in modules[first]]
        return None if None in whys else f"{ref}: {'; '.join(whys)}"
    if (ROOT / "tools" / f"{first}.py").exists() and rest[0] not in tool_names(first):
        return f"{ref}: `tools/{first}.py` has no `{rest[0]}`"
    return None


def problems(text: str, doc_dir: Path = ROOT) -> list[str]:
    """What a markdown text names that does not exist: modules, names, repository files, relative links."""
    found = []
    for module, names in import_names(text):
        found += [f"from {module} import {name}: {why}" for name in names or ("",)
                  if (why := resolve(f"{module}.{name}" if name else module))]
    for dotted in sorted(set(DOTTED.findall(text))):
        if why := resolve(dotted):
            found.append(f"{dotted}: {why}")
    modules = package_modules()
    found += [why for ref in sorted(set(SHORT_REF.findall(text))) if (why := short_ref_problem(ref, modules))]
    for path in sorted(set(FILE_PATH.findall(text))):
        if not (ROOT / path).exists():
            found.append(f"{path}: no such file or folder in the repository")
    for target in sorted(set(LINK.findall(text))):
        local = target.split("#")[0]
        if local and "://" not in target and not (doc_dir / local).exists():
            found.append(f"link {target}: no such file")
    return found


def skip_reason(snippet: Snippet) -> str | None:
    return next((why for key, why in SKIPPED.items() if key in snippet.code), None)


def run_snippet(snippet: Snippet, cwd: Path) -> tuple[int, str]:
    """Runs a snippet as `python -c` would, in this process (torch is imported once for every snippet), as
    `__main__` in `cwd` holding the placeholder files; returns its exit status and, on failure, the error."""
    for name, content in PLACEHOLDER_FILES.items():
        (cwd / name).write_text(content, encoding="utf-8")
    with contextlib.chdir(cwd):
        try:
            exec(compile(snippet.code, f"<{snippet.kind} snippet>", "exec"), {"__name__": "__main__"})
        except SystemExit as stop:
            return (stop.code if isinstance(stop.code, int) else 1), str(stop.code)
        except Exception:  # noqa: BLE001 - any error of a snippet is the failure to report
            return 1, traceback.format_exc(limit=-3)
    return 0, ""


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_named_modules_names_files_and_links_exist(doc):
    assert problems(doc.read_text(encoding="utf-8"), doc.parent) == []


def test_every_snippet_runs(tmp_path):
    ran, skipped = [], []
    for doc in DOCS:
        for snippet in snippets(doc.read_text(encoding="utf-8")):
            if skip_reason(snippet):
                compile(snippet.code, f"<{_doc_id(doc)} snippet>", "exec")  # not run, but it must parse
                skipped.append(snippet)
                continue
            status, error = run_snippet(snippet, tmp_path)
            assert status == 0, f"{_doc_id(doc)}: {snippet.code!r} failed:\n{error}"
            ran.append(snippet)
    assert ran, "the docs give no `python -c` snippet any more: the parser no longer finds them"
    # Every skip names a snippet the docs still give, so the list cannot go stale.
    assert {key for key in SKIPPED if any(key in s.code for s in skipped)} == set(SKIPPED)


CHECKER_DOC = """\
Check a file with `python -c "from gradfilter_ops.jsonl import read_jsonl; read_jsonl('my.jsonl')"`.

```python
from gradfilter_ops.selection import select, no_such_selector   # one real name, one not
from gradfilter_ops.no_such_module import Thing
import gradfilter_ops.engine.grads
```

The per-example norms live in `gradfilter_ops.engine.grads.per_example_grad_sq_norms`, the old
`gradfilter_ops.grads.per_example_grad_sq_norms` is gone, as is `gradfilter_ops/ensemble/`; the head is in
`gradfilter_ops/engine/head.py` (`head.token_losses`, not `head.fused_loss`), `selection.select` is in two modules,
the FLOPs come from `bench_speed.forward_flops`, not `bench_speed.count_flops`; `torch.autograd.grad` and
`summary.json` are not ours to check. See [the speed page](docs/speed.md) and [a lost page](docs/nowhere.md).

```bash
python - <<'PY'
import sys; sys.exit(3)
PY
```
"""


def test_checker_reports_each_missing_thing_and_nothing_else():
    assert problems(CHECKER_DOC) == [
        "from gradfilter_ops.selection import no_such_selector: `gradfilter_ops.selection` has no `no_such_selector`",
        "from gradfilter_ops.no_such_module import Thing: `gradfilter_ops` has no `no_such_module`",
        "gradfilter_ops.grads.per_example_grad_sq_norms: `gradfilter_ops` has no `grads`",
        "gradfilter_ops.no_such_module: `gradfilter_ops` has no `no_such_module`",
        "bench_speed.count_flops: `tools/bench_speed.py` has no `count_flops`",
        "head.fused_loss: `gradfilter_ops.engine.head` has no `fused_loss`",
        "gradfilter_ops/ensemble: no such file or folder in the repository",
        "link docs/nowhere.md: no such file",
    ]


def test_parser_finds_both_snippet_forms_and_a_failing_one_fails(tmp_path):
    found = snippets(CHECKER_DOC)
    assert [s.kind for s in found] == ["-c", "heredoc"]
    assert found[0].code == "from gradfilter_ops.jsonl import read_jsonl; read_jsonl('my.jsonl')"
    assert run_snippet(found[1], tmp_path) == (3, "3")
    status, error = run_snippet(Snippet("-c", "from gradfilter_ops.jsonl import read_jsonl; read_jsonl('gone.jsonl')"),
                                tmp_path)
    assert status == 1 and "gone.jsonl" in error
