"""The layout's rules, read from the source (no TensorFlow): no import cycle inside msa_xla, no
private TensorFlow/tf_keras name outside runtime/compat.py, each choice list and exit code defined
once (docs/ARCHITECTURE.md, "Rules"); and ruff is clean."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "msa_xla"
COMPAT = PACKAGE / "runtime" / "compat.py"


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _trees(paths):
    return {p: ast.parse(p.read_text(), str(p)) for p in paths}


def _imports(name, tree):
    """The msa_xla modules `name` imports, anywhere in the file (lazy imports too)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` names the submodule
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    # A module's own ancestors (packages) always run first: not an edge of a cycle.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in MODULES and m != name and m not in ancestors}


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    trees = _trees(MODULES.values())
    graph = {name: _imports(name, trees[path]) for name, path in MODULES.items()}
    assert graph["msa_xla.trainer.loop"] >= {"msa_xla.trainer.step", "msa_xla.runtime.storage"}
    assert _cycles(graph) == []


def _private_uses(path, tree):
    """`x._name` on something other than self/cls, and imports of TF's or Keras' private
    packages (tensorflow.python, tf_keras.src)."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"{path.relative_to(ROOT)}:{node.lineno} import {m}" for m in modules
                  if m.startswith(("tensorflow.python", "tf_keras.src", "keras.src"))]
    return found


def test_private_framework_names_only_in_compat():
    trees = _trees(MODULES.values())
    outside = [use for path, tree in trees.items() if path != COMPAT
               for use in _private_uses(path, tree)]
    assert outside == []
    assert len(_private_uses(COMPAT, trees[COMPAT])) >= 5  # the check sees what compat.py holds


def _literal_constants(paths):
    """{value: [module:NAME, ...]} for module-level NAME = (tuple of literals)."""
    seen = {}
    for path, tree in _trees(paths).items():
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()
                    and isinstance(node.value, ast.Tuple)):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                seen.setdefault(value, []).append(f"{path.relative_to(ROOT)}:{node.targets[0].id}")
    return seen


def test_each_choice_list_is_defined_once():
    paths = list(MODULES.values()) + sorted((ROOT / "tools").glob("*.py"))
    repeated = {value: where for value, where in _literal_constants(paths).items()
                if len(where) > 1}
    assert repeated == {}
    options = {w.split(":")[1] for where in _literal_constants([PACKAGE / "options.py"]).values()
               for w in where}
    assert {"MODALITIES", "TEXT_INPUTS", "STRATEGIES", "POLICIES", "ATTENTION_IMPLS"} <= options


@pytest.mark.parametrize("code", [3, 4, 143])
def test_exit_codes_are_written_only_in_cli(code):
    """The distinctive exit codes appear as literals only in cli.py (2 and 0 are too common a
    number to search for; they are checked through the commands' tests)."""
    where = []
    for path, tree in _trees(MODULES.values()).items():
        for node in ast.walk(tree):
            exits = (isinstance(node, ast.Call) and getattr(node.func, "attr",
                                                            getattr(node.func, "id", "")) == "exit")
            values = ([node.value] if isinstance(node, ast.Return) else
                      node.args if exits else [])
            if any(isinstance(v, ast.Constant) and v.value == code for v in values):
                where.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert where == []
    assert f"= {code} " in (PACKAGE / "cli.py").read_text()


def test_ruff_is_clean():
    """The linter configured in pyproject.toml, over the package, the tests and the tools."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "msa_xla", "tests", "tools"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
