"""The import graph of ``dllm_jax``: no cycles, no imports hidden inside functions, and the other
packages (``serve``, ``convert``) use only its public modules and never import each other;
inside ``serve``, the engine (``serve.engine``) never imports the HTTP front end (``serve.api``).

Every import statement counts wherever it is: inside functions, under ``if TYPE_CHECKING:``
(annotation-only imports), in ``try:`` blocks; relative imports are resolved against the
importing module's package, and ``importlib.import_module("...")`` / ``__import__("...")`` with
a literal name count as imports too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"dllm_jax", "dllm_jax.sampling", "dllm_jax.checkpoint", "dllm_jax.checkpoint.dtypes"}


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(node: ast.AST, name: str, is_package: bool, known) -> list[str]:
    """The modules one AST node imports (``name``: the module the node is in)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's own package, up level - 1 packages
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known or not node.module else base for a in node.names]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                 or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
        return [node.args[0].value]
    return []


def _all_imports(path: Path, name: str, known=()) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file, of any package."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if __name__ == ...` / `try:` blocks at the top level count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    is_package = path.name == "__init__.py"
    return [(t, node.lineno, id(node) in top) for node in ast.walk(tree)
            for t in _targets(node, name, is_package, known)]


def _imports(path: Path, name: str, known) -> list[tuple[str, int, bool]]:
    """(imported dllm_jax module, line, at module level) for every import in the file."""
    out = []
    for t, line, at_top in _all_imports(path, name, known):
        if t.split(".")[0] == "dllm_jax":
            while t not in known:
                t = t.rsplit(".", 1)[0]
            out.append((t, line, at_top))
    return out


def test_dllm_jax_has_no_import_cycles_and_no_hidden_imports():
    modules = _modules("dllm_jax")
    graph: dict[str, set[str]] = {m: set() for m in modules}
    hidden = []
    for name, path in modules.items():
        for target, line, at_top in _imports(path, name, modules):
            if target == name:
                continue
            graph[name].add(target)
            if not at_top:
                hidden.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not hidden, hidden
    # explicit edges only (a package's __init__ importing its children is not a cycle with them)
    done, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in done:
            return
        stack.append(m)
        for t in sorted(graph[m]):
            if not (m.startswith(t + ".") and t in modules):  # a module importing its parent package
                visit(t)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


@pytest.mark.parametrize("package", ["serve", "convert"])
def test_other_packages_use_the_public_api(package):
    known = _modules("dllm_jax")
    private = []
    for name, path in _modules(package).items():
        for target, line, _ in _imports(path, name, known):
            if target not in PUBLIC:
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not private, private


@pytest.mark.parametrize("package, other", [("serve", "convert"), ("convert", "serve")])
def test_serve_and_convert_do_not_import_each_other(package, other):
    """Both read checkpoints through ``dllm_jax.checkpoint``; neither reaches into the other."""
    crossing = []
    for name, path in _modules(package).items():
        for target, line, _ in _all_imports(path, name, _modules(other)):
            if target.split(".")[0] == other:
                crossing.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not crossing, crossing


def test_serve_engine_does_not_import_the_http_front_end():
    """``serve.engine`` (the engine) never imports ``serve.api`` (the HTTP front end) nor the CLI:
    the front end drives the engine, never the other way round, so the engine runs (and is
    tested) without the web layer. ``serve.api`` may import ``serve.engine``."""
    known = _modules("serve")
    assert {"serve.api", "serve.engine"} <= set(known), sorted(known)  # the layout this test is about
    found = []
    for name, path in known.items():
        if name != "serve.engine" and not name.startswith("serve.engine."):
            continue
        for target, line, _ in _all_imports(path, name, known):
            if target == "serve.__main__" or target == "serve.api" or target.startswith("serve.api."):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not found, found


def test_the_walker_sees_every_kind_of_import(tmp_path):
    """Function-level, TYPE_CHECKING, relative and importlib imports are all found."""
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from convert import dcp\n"
                      "def f():\n    import convert.hf_to_orbax\n    from .. import routes\n"
                      "    importlib.import_module('convert.x')\n    __import__('serve.y')\n")
    found = {t for t, _, _ in _all_imports(source, "serve.pkg.mod", {"convert.dcp"})}
    assert {"convert.dcp", "convert.hf_to_orbax", "serve.routes", "convert.x", "serve.y"} <= found, found


def test_dllm_jax_imports_no_server_converter_or_torch():
    """``import dllm_jax`` pulls in neither ``serve``, ``convert`` nor FastAPI; torch is an optional
    extra, imported only inside the DCP reader's functions (when a DCP checkpoint is read)."""
    found = []
    for name, path in _modules("dllm_jax").items():
        for target, line, at_top in _all_imports(path, name):
            root = target.split(".")[0]
            lazy_torch = root == "torch" and not at_top and name == "dllm_jax.checkpoint.dcp"
            if root in ("serve", "convert", "fastapi", "starlette", "uvicorn", "torch") and not lazy_torch:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not found, found
