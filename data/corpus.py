"""The default corpus that ships with CPython: no download, same text everywhere."""

import ast
import sysconfig
from pathlib import Path

from data.errors import DataError

SOURCES = ("pydoc", "stdlib")
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-liners: little text, many docs


def embedded_documents(source: str) -> list[str]:
    """The documents of an embedded corpus, in a deterministic order.

    "pydoc": the interactive-help topics (~0.5 MB). "stdlib": those plus the long
    docstrings of the standard library.
    """
    if source not in SOURCES:
        raise DataError(
            f"unknown embedded corpus {source!r}: choose one of {', '.join(SOURCES)}"
        )
    documents = _pydoc_topics()
    if source == "stdlib":
        documents += _stdlib_docstrings()
    return [doc for doc in documents if doc.strip()]


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docstrings = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if "site-packages" in parts or any(p in ("test", "tests") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. lib2to3 test fixtures written in Python 2
        docstrings += _long_docstrings(tree)
    return docstrings


def _long_docstrings(tree: ast.Module) -> list[str]:
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    docstrings = (ast.get_docstring(node) for node in nodes)
    return [doc for doc in docstrings if doc and len(doc) >= MIN_DOCSTRING_CHARS]
