"""data/: `prepare` (raw files -> sharded megatron datasets) and `tokenizer train`, good and bad input."""
import bz2
import gzip
import json
import os
import shutil

import pytest

from data.errors import DataError
from data.indexed import open_indexed
from data.prepare import prepare
from data.tokenizer import Tokenizer
from data.tokenizer_train import train_from_files
from tests.corpora import topics, write_arrow, write_jsonl, write_mixed_corpus, write_parquet

VOCAB = 512  # trains in about a second; padded to a multiple of 128 it stays 512
quiet = dict(log=lambda line: None, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_mixed_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory):
    files, _ = corpus
    out = tmp_path_factory.mktemp("tok") / "spm"
    train_from_files([str(f) for f in files], out, VOCAB, special_tokens=["<image>"], log=lambda line: None)
    return out.with_name("spm.model")


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_path, tmp_path_factory):
    files, _ = corpus
    out = tmp_path_factory.mktemp("prepared") / "ds"
    manifest = prepare([str(f) for f in files], out, tokenizer_path, **quiet)
    return out, manifest


def stored_documents(out, manifest):
    """Token lists of every document, over all shards in order."""
    docs = []
    for shard in manifest["shards"]:
        dataset = open_indexed(out / shard["name"], manifest["vocab_size"])
        docs += [dataset[i].tolist() for i in range(len(dataset))]
    return docs


def test_jsonl_and_parquet_become_one_document_each(prepared, corpus, tokenizer_path):
    out, manifest = prepared
    _, texts = corpus
    tok = Tokenizer(tokenizer_path)
    docs = stored_documents(out, manifest)
    assert [tok.decode(d[:-1]) for d in docs] == texts  # file order, row order, all text kept
    assert all(d[-1] == tok.eos_id and tok.eos_id not in d[:-1] for d in docs)
    assert manifest["num_documents"] == len(texts) and manifest["num_dropped_empty"] == 2
    assert manifest["num_tokens"] == sum(map(len, docs))
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint == Tokenizer(out / "tokenizer.model").fingerprint
    assert manifest["dtype"] == "uint16"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial build left


def test_bos_and_shards_at_document_boundaries(corpus, tokenizer_path, tmp_path):
    files, texts = corpus
    manifest = prepare([str(f) for f in files], tmp_path / "ds", tokenizer_path, bos=True, shard_tokens=20_000,
                       **quiet)
    tok = Tokenizer(tokenizer_path)
    assert len(manifest["shards"]) > 3
    assert all(s["tokens"] >= 20_000 for s in manifest["shards"][:-1])
    docs = stored_documents(tmp_path / "ds", manifest)
    assert [tok.decode(d[1:-1]) for d in docs] == texts
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)


def test_num_proc_does_not_change_the_output(corpus, tokenizer_path, prepared, tmp_path):
    files, _ = corpus
    out, manifest = prepared
    parallel = prepare([str(f) for f in files], tmp_path / "ds", tokenizer_path, num_proc=2, **quiet)
    assert parallel["dataset_id"] == manifest["dataset_id"]
    for shard in manifest["shards"]:
        for suffix in (".bin", ".idx"):
            name = shard["name"] + suffix
            assert (tmp_path / "ds" / name).read_bytes() == (out / name).read_bytes()


def test_rerun_is_a_no_op_unless_forced(corpus, tokenizer_path, tmp_path):
    files, _ = corpus
    inputs, out = [str(f) for f in files], tmp_path / "ds"
    prepare(inputs, out, tokenizer_path, **quiet)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    prepare(inputs, out, tokenizer_path, log=lines.append, progress=False)
    assert "nothing to do" in lines[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(DataError, match="bos=False, not True.*--force"):
        prepare(inputs, out, tokenizer_path, bos=True, **quiet)
    assert prepare(inputs, out, tokenizer_path, bos=True, force=True, **quiet)["bos_id"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} != before


def test_an_output_inside_the_input_directory_is_no_input(corpus, tokenizer_path, tmp_path):
    """The output's own files (manifest.json) are never read as input: the rerun is a no-op, not "inputs changed"."""
    files, _ = corpus
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in files:
        shutil.copy(f, raw)
    first = prepare([str(raw)], raw / "out", tokenizer_path, **quiet)
    lines = []
    assert prepare([str(raw)], raw / "out", tokenizer_path, log=lines.append, progress=False) == first
    assert "nothing to do" in lines[-1]


def test_a_failed_prepare_leaves_the_old_output_alone(corpus, tokenizer_path, prepared, tmp_path):
    files, _ = corpus
    out, _ = prepared
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "not \xff utf-8"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare([*map(str, files), str(bad)], out, tokenizer_path, force=True, **quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(DataError):
        prepare([str(bad)], tmp_path / "new", tokenizer_path, **quiet)
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_text_units_globs_directories_and_compression(tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    with gzip.open(src / "sub" / "two.txt.gz", "wt") as f:
        f.write("gzipped line\n")
    with bz2.open(src / "sub" / "three.jsonl.bz2", "wt") as f:
        f.write(json.dumps({"body": "bz2 json"}) + "\n")
    write_arrow(src / "sub" / "four.arrow", ["arrow text"], field="body")

    def texts(inputs, **kwargs):
        m = prepare(inputs, tmp_path / "out", tokenizer_path, force=True, **quiet, **kwargs)
        return [tok.decode(d[:-1]) for d in stored_documents(tmp_path / "out", m)]

    assert texts([str(src / "*.txt")]) == ["first paragraph\nstill first\n\nsecond paragraph\n"]
    assert texts([str(src / "one.txt")], text_unit="paragraph") == ["first paragraph\nstill first",
                                                                   "second paragraph\n"]
    assert texts([str(src / "one.txt")], text_unit="line") == ["first paragraph\n", "still first\n",
                                                              "second paragraph\n"]
    assert texts([str(src / "**" / "*.txt*")]) == ["first paragraph\nstill first\n\nsecond paragraph\n",
                                                   "gzipped line\n"]
    assert texts([str(src / "sub")], text_field="body") == ["arrow text", "bz2 json", "gzipped line\n"]


def test_tokenizer_train_bpe_and_unigram(corpus, tokenizer_path, tmp_path):
    files, texts = corpus
    bpe = Tokenizer(tokenizer_path)
    assert bpe.vocab_size == VOCAB and (bpe.bos_id, bpe.eos_id) == (1, 2)
    unigram = train_from_files([str(f) for f in files], tmp_path / "uni", 500, model_type="unigram",
                               special_tokens=["<image>", "<|im_end|>"], pad_to_multiple_of=64,
                               sample_documents=20, log=lambda line: None)
    assert unigram.vocab_size == 512 and unigram.model_path == tmp_path / "uni.model"
    for tok, trained in ((bpe, VOCAB), (unigram, 500)):
        image = tok._sp.piece_to_id("<image>")
        assert tok.encode("a <image> b").count(image) == 1  # a special token is one piece
        for text in texts[:10] + ["naïve ✓ 中文\t\n"]:
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert max(ids) < trained  # the padding pieces are never produced
    with pytest.raises(DataError, match="already exists"):
        train_from_files([str(files[0])], tmp_path / "uni.model", 500, log=lambda line: None)


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def write_bad(tmp_path, kind):
    """A bad input file and the fragments its error must contain."""
    docs = topics()[:3]
    if kind == "missing-field":
        path = write_jsonl(tmp_path / "x.jsonl", docs, field="content")
        return path, ["no field 'text'", "content", "--text-field"]
    if kind == "json-named-parquet":
        path = write_jsonl(tmp_path / "x.parquet", docs)
        return path, ["not a parquet file"]
    if kind == "parquet-named-jsonl":
        path = write_parquet(tmp_path / "x.jsonl", docs)
        return path, ["JSON"]
    if kind == "text-named-arrow":
        (path := tmp_path / "x.arrow").write_text("just text\n")
        return path, ["not a valid Arrow IPC file"]
    if kind == "invalid-utf8-text":
        (path := tmp_path / "x.txt").write_bytes(b"caf\xe9 latin-1\n")
        return path, ["not valid UTF-8", "0xe9"]
    if kind == "invalid-utf8-jsonl":
        (path := tmp_path / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
        return path, ["not valid UTF-8"]
    if kind == "numbers-not-text":
        (path := tmp_path / "x.jsonl").write_text('{"text": 5}\n')
        return path, ["holds int values, not text"]
    if kind == "empty-corpus":
        path = write_jsonl(tmp_path / "x.jsonl", ["", "  \n", None])
        return path, ["no non-empty documents", "3 empty"]
    if kind == "empty-file":
        (path := tmp_path / "x.jsonl").write_text("")
        return path, ["no non-empty documents"]
    if kind == "unknown-extension":
        (path := tmp_path / "x.csv").write_text("text\nhello\n")
        return path, ["unknown extension"]
    raise AssertionError(kind)


BAD_INPUTS = ["missing-field", "json-named-parquet", "parquet-named-jsonl", "text-named-arrow", "invalid-utf8-text",
              "invalid-utf8-jsonl", "numbers-not-text", "empty-corpus", "empty-file", "unknown-extension"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_file(kind, tokenizer_path, tmp_path):
    path, fragments = write_bad(tmp_path, kind)
    with pytest.raises(DataError) as error:
        prepare([str(path)], tmp_path / "out", tokenizer_path, **quiet)
    assert_one_line(error, str(path), *fragments)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_inputs_are_named(tokenizer_path, tmp_path):
    with pytest.raises(DataError) as error:
        prepare([str(tmp_path / "nothing-*.jsonl")], tmp_path / "out", tokenizer_path, **quiet)
    assert_one_line(error, "no files match", "nothing-*.jsonl")
    with pytest.raises(DataError) as error:
        prepare([str(tmp_path / "gone.jsonl")], tmp_path / "out", tokenizer_path, **quiet)
    assert_one_line(error, "gone.jsonl", "does not exist")
    with pytest.raises(DataError) as error:
        train_from_files([str(tmp_path / "gone.jsonl")], tmp_path / "tok", 100, log=lambda line: None)
    assert_one_line(error, "gone.jsonl", "does not exist")


def test_unreadable_tokenizer_is_named(corpus, tmp_path):
    files, _ = corpus
    (bad := tmp_path / "bad.model").write_bytes(os.urandom(64))
    with pytest.raises(DataError) as error:
        prepare([str(files[0])], tmp_path / "out", bad, **quiet)
    assert_one_line(error, str(bad), "sentencepiece")
