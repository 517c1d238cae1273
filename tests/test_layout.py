"""The package's shape: no import cycle between its modules, and no module reaching into another one's
private names or private modules; and the test runner's grouping of the tests, which the suite's speed needs."""

import ast
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gradfilter_ops"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name of a file under `root` (a file outside it: "")."""
    if not path.is_relative_to(root):
        return ""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path = ROOT) -> bool:
    """Whether `name` (dotted) is a module or package under `root`."""
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def absolute(node: ast.ImportFrom, path: Path, root: Path = ROOT) -> str:
    """The dotted module an `from ... import` reads from, relative imports resolved for `path`."""
    if not node.level:
        return node.module or ""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_module_owner(name: str) -> Optional[str]:
    """The package that the private module `name` (dotted) belongs to, e.g. `a.b` for `a.b._c.d`; None for a
    module that is public all the way down."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if private(part):
            return ".".join(parts[:i])
    return None


def outside(own: str, package: str) -> bool:
    """Whether the module `own` lies outside `package` (a private module may be used from within its package)."""
    return own != package and not own.startswith(package + ".")


def private_uses(path: Path, root: Path = ROOT) -> list[tuple[str, str, int]]:
    """(module, private name, line) for every private name of another gradfilter_ops module that
    `path` imports (`from gradfilter_ops.x import _name`) or reads (`x._name` on an imported module),
    and for every private module (`gradfilter_ops.ops._recipe`: module `gradfilter_ops.ops`, name
    `_recipe`) that `path` imports from outside the private module's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = module_name(path, root)
    aliases: dict[str, str] = {}  # local name -> gradfilter_ops module it stands for
    found = []

    def private_module(name: str, line: int) -> None:
        owner = private_module_owner(name)
        if owner is not None and outside(own, owner):
            found.append((owner, name[len(owner):].lstrip(".").split(".")[0], line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gradfilter_ops":
                    private_module(alias.name, node.lineno)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["gradfilter_ops"] = "gradfilter_ops"
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, path, root)
            if source.split(".")[0] != "gradfilter_ops":
                continue
            private_module(source, node.lineno)
            for alias in node.names:
                if is_module(f"{source}.{alias.name}", root):
                    private_module(f"{source}.{alias.name}", node.lineno)
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif private(alias.name) and source != own:
                    found.append((source, alias.name, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            target = dotted(node.value, aliases)
            if target is not None and is_module(target, root) and target != own:
                found.append((target, node.attr, node.lineno))
    return found


def runtime_imports(tree: ast.AST) -> list[ast.stmt]:
    """Every import statement of a module that can run: at module level, in functions and classes, but not
    under `if TYPE_CHECKING:`, which never does."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package: its `__init__`), for the package in folder
    `package`; an import of `a.b.c` counts as one of `a.b.c`, not of the packages `a` and `a.b` that Python
    also runs first (every module would otherwise import its package's `__init__`)."""
    root, top = package.parent, package.name
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        imported = graph.setdefault(module_name(path, root), set())
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                source = absolute(node, path, root)
                names = [f"{source}.{alias.name}" if is_module(f"{source}.{alias.name}", root) else source
                         for alias in node.names]
            for name in names:
                while name and not is_module(name, root):  # `import a.b.name`: the module is `a.b`
                    name = name.rpartition(".")[0]
                if name.split(".")[0] == top:
                    imported.add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle of `graph` as the modules along it, the first repeated at the end; None when acyclic."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        pending = [iter(sorted(graph.get(start, ())))]
        while pending:
            following = next(pending[-1], None)
            if following is None:  # every module below path[-1] is done: so is path[-1]
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                pending.pop()
                continue
            if following in on_path:
                return path[path.index(following):] + [following]
            if following not in done:
                path.append(following)
                on_path.add(following)
                pending.append(iter(sorted(graph.get(following, ()))))
    return None


def dotted(node: ast.AST, aliases: dict[str, str]):
    """The gradfilter_ops module an expression such as `ensemble` or `gradfilter_ops.engine` names, or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base is not None else None
    return None


# Tests that import a private module of ops/, which issue 23's first part reworks: its helpers get public
# names there. Any other use of a private module from outside its package fails the check.
KNOWN_PRIVATE_MODULE_USES = {("tests/test_bad_input.py", "gradfilter_ops.ops._recipe"),
                             ("tests/test_ops.py", "gradfilter_ops.ops._options")}


def test_the_package_has_no_import_cycle():
    """Imports at module level and inside functions both count: a function-level import only defers a cycle."""
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "an import cycle between the package's modules: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    fake = tmp_path / "fakepkg"
    (fake / "sub").mkdir(parents=True)
    sources = {"__init__.py": "from .a import A\n",
               "a.py": "from .sub import b\nA = 1\n",
               "sub/__init__.py": "",
               "sub/b.py": "def late():\n    from ..c import C\n    return C\n",
               "c.py": "import fakepkg.a\nC = 2\n",
               "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import E\nD = 3\n",
               "e.py": "from .d import D\nE = 4\n"}
    for name, text in sources.items():
        (fake / name).write_text(text, encoding="utf-8")
    graph = import_graph(fake)
    assert graph["fakepkg"] == {"fakepkg.a"} and graph["fakepkg.sub.b"] == {"fakepkg.c"}
    assert graph["fakepkg.d"] == set()  # an import for type checkers only never runs
    assert find_cycle(graph) == ["fakepkg.a", "fakepkg.sub.b", "fakepkg.c", "fakepkg.a"]
    (fake / "sub" / "b.py").write_text("def late():\n    return 0\n", encoding="utf-8")
    assert find_cycle(import_graph(fake)) is None


def test_no_private_name_is_used_across_modules():
    uses = {f"{p.relative_to(ROOT)}:{line}: {module}.{name}"
            for p in python_files("gradfilter_ops", "tools", "tests")
            for module, name, line in private_uses(p)
            if (str(p.relative_to(ROOT)), f"{module}.{name}") not in KNOWN_PRIVATE_MODULE_USES}
    assert not uses, "private names used outside their module; give them a public name:\n" + "\n".join(sorted(uses))


def test_the_check_finds_private_modules_used_from_outside_their_package(tmp_path):
    ops = tmp_path / "gradfilter_ops" / "ops"
    ops.mkdir(parents=True)
    for name in ("__init__.py", "_hidden.py", "../__init__.py"):
        (ops / name).write_text("", encoding="utf-8")
    (ops / "op.py").write_text("from ._hidden import helper\nfrom . import _hidden\n", encoding="utf-8")
    (ops.parent / "other.py").write_text("from .ops._hidden import helper\nimport gradfilter_ops.ops._hidden\n",
                                         encoding="utf-8")
    assert private_uses(ops / "op.py", tmp_path) == []  # within its own package: allowed
    assert private_uses(ops.parent / "other.py", tmp_path) == [("gradfilter_ops.ops", "_hidden", 1),
                                                               ("gradfilter_ops.ops", "_hidden", 2)]


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


@pytest.mark.xdist_group("layout")
def test_xdist_groups_reach_the_scheduler(request):
    """Under `--dist loadgroup` a grouped test's id carries its group, which is how the scheduler keeps a file's
    tests (and its module fixtures: a Ray cluster, a `dj-process` run) on one worker; pytest 9.2 loses it."""
    if not getattr(request.config.option, "loadgroup", False):  # set on the workers of `--dist loadgroup`
        pytest.skip("runs under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@layout")
