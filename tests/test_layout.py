"""The package's shape: small modules, and no module reaching into another one's private names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gradfilter_ops"
MAX_LINES = 300


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def module_name(path: Path) -> str:
    """The dotted name of a file in the repository (a file outside it: "")."""
    if not path.is_relative_to(ROOT):
        return ""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether `name` (dotted) is a module or package of gradfilter_ops."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The dotted module an `from ... import` reads from, relative imports resolved for `path`."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path) -> list[tuple[str, str, int]]:
    """(module, private name, line) for every private name of another gradfilter_ops module that
    `path` imports (`from gradfilter_ops.x import _name`) or reads (`x._name` on an imported module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = module_name(path)
    aliases: dict[str, str] = {}  # local name -> gradfilter_ops module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gradfilter_ops":
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["gradfilter_ops"] = "gradfilter_ops"
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, path)
            if source.split(".")[0] != "gradfilter_ops":
                continue
            for alias in node.names:
                if private(alias.name) and source != own:
                    found.append((source, alias.name, node.lineno))
                elif is_module(f"{source}.{alias.name}"):
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            target = dotted(node.value, aliases)
            if target is not None and is_module(target) and target != own:
                found.append((target, node.attr, node.lineno))
    return found


def dotted(node: ast.AST, aliases: dict[str, str]):
    """The gradfilter_ops module an expression such as `ensemble` or `gradfilter_ops.engine` names, or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def test_no_module_is_longer_than_300_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
               for p in python_files("gradfilter_ops")}
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines; split them by concern: {too_long}"


def test_no_private_name_is_used_across_modules():
    uses = {f"{p.relative_to(ROOT)}:{line}: {module}.{name}"
            for p in python_files("gradfilter_ops", "tools", "tests")
            for module, name, line in private_uses(p)}
    assert not uses, "private names used outside their module; give them a public name:\n" + "\n".join(sorted(uses))


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The AST check on a file with each kind of use, and with uses that are allowed."""
    probe = tmp_path / "probe.py"
    probe.write_text("import gradfilter_ops.engine as ensemble\n"
                     "import gradfilter_ops.scorer\n"
                     "from gradfilter_ops import records\n"
                     "from gradfilter_ops.proxy import _preset_folder\n"
                     "ensemble._train_member\n"
                     "gradfilter_ops.scorer._rows\n"
                     "records._hidden\n"
                     "ensemble.Snapshots._private_method\n"
                     "records.__name__\n", encoding="utf-8")
    found = sorted((module, name) for module, name, _ in private_uses(probe))
    assert found == [("gradfilter_ops.engine", "_train_member"), ("gradfilter_ops.proxy", "_preset_folder"),
                     ("gradfilter_ops.records", "_hidden"), ("gradfilter_ops.scorer", "_rows")]
