"""Paths and small helpers shared by test modules (importable as ``helpers``: pytest's
``pythonpath`` puts ``tests/`` on the path)."""

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
LLADA_DIR = FIXTURES / "llada_tiny"
NEMOTRON_DIR = FIXTURES / "nemotron_tiny"
