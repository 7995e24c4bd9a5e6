"""The import graph of ``dllm_jax``: no cycles, no imports hidden inside functions, and the other
packages (``serve``, ``convert``) use only its public modules."""

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


def _imports(path: Path, name: str, known) -> list[tuple[str, int, bool]]:
    """(imported dllm_jax module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if __name__ == ...` / `try:` blocks at the top level count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "dllm_jax":
                while t not in known:
                    t = t.rsplit(".", 1)[0]
                out.append((t, node.lineno, id(node) in top))
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
