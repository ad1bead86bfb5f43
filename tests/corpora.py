"""Small raw corpora that tests write for themselves: the pydoc help topics (they ship with
CPython) as jsonl, parquet, arrow and plain text, plus a few empty documents."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def topics() -> list[str]:
    from pydoc_data.topics import topics as all_topics

    return [all_topics[key] for key in sorted(all_topics)]


def write_jsonl(path: Path, texts: list, field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    return path


def write_parquet(path: Path, texts: list, field: str = "text") -> Path:
    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path)
    return path


def write_arrow(path: Path, texts: list, field: str = "text") -> Path:
    table = pa.table({field: texts})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_mixed_corpus(directory: Path) -> tuple[list[Path], list[str]]:
    """Even topics (and two empty documents) as jsonl, odd topics as parquet. Returns the files
    and the non-empty documents in the order prepare reads them (sorted file names)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = topics()
    jsonl = write_jsonl(directory / "a.jsonl", docs[0::2][:20] + ["", None] + docs[0::2][20:])
    parquet = write_parquet(directory / "b.parquet", docs[1::2])
    return [jsonl, parquet], docs[0::2] + docs[1::2]
