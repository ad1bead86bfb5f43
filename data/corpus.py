"""The default corpus that ships with CPython: no download, same text everywhere."""

import ast
import sysconfig
from pathlib import Path

from data.errors import DataError

SOURCES = ("pydoc", "stdlib")
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-liners: little text, many docs


def embedded_documents(source: str) -> list[str]:
    """The documents of a small corpus, in a deterministic order.

    "pydoc": the interactive-help topics (~0.5 MB). "stdlib": those plus the long
    docstrings of the standard library. Otherwise a path: a UTF-8 .txt file, or a
    directory of them, one document per file (real corpora go through `prepare`).
    """
    if source not in SOURCES:
        return [doc for doc in map(_read_text, text_files(source)) if doc.strip()]
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


def text_files(source: str) -> list[Path]:
    """The .txt files a path source names, or a DataError saying what to set instead."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".txt":
        return [path]
    if path.is_dir() and (files := sorted(path.rglob("*.txt"))):
        return files
    if path.is_dir():
        raise DataError(f"corpus directory {path} holds no .txt files; add some or set data.source to one of "
                        f"{', '.join(SOURCES)}")
    what = "is not a .txt file" if path.exists() else "does not exist"
    raise DataError(f"corpus file {path} {what}; set data.source to one of {', '.join(SOURCES)}, "
                    f"a .txt file or a directory of them")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path} is not valid UTF-8 (byte {e.start}); convert it to UTF-8") from None
