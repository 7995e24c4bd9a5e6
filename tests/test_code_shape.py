"""The library, server and converter stay readable in pieces: no module over 350 lines, no
function over 60 lines unless a comment in it starting "(Over 60 lines" says why."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dllm_jax", "serve", "convert")
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
EXPLAINED = "(Over 60 lines"


def _sources():
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_the_line_limit(package):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_over_the_line_limit_unless_it_says_why(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if n > MAX_FUNCTION_LINES and EXPLAINED not in body:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
