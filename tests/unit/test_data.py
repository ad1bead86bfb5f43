"""data/: embedded corpus, tokenizer, cached preparation, packed samples, global batches."""

import json
import shutil
import threading
from collections import Counter

import pytest
import torch

from data.corpus import embedded_documents
from data.embedded import _valid_split, open_indexed, prepare_embedded
from data.errors import DataError
from data.loader import GlobalBatchLoader, PackedTokens

VOCAB = 512  # small: the tokenizer trains in well under a second
VALID_FRACTION = 0.05


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def prepared(cache_dir):
    return prepare_embedded("pydoc", VOCAB, cache_dir, VALID_FRACTION, log=lambda line: None)


@pytest.fixture(scope="session")
def documents():
    return embedded_documents("pydoc")


def split_documents(prefix, tokenizer):
    """The texts stored under prefix, one per megatron document."""
    dataset = open_indexed(prefix, tokenizer.vocab_size)
    texts = []
    for i in range(len(dataset)):
        tokens = dataset[i].tolist()
        assert tokens[-1] == tokenizer.eos_id
        texts.append(tokenizer.decode(tokens[:-1]))
    return texts


def test_tokenizer_round_trips_text(prepared, documents):
    tok = prepared.tokenizer
    assert tok.vocab_size == VOCAB
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert len(tok.fingerprint) == 16
    paragraphs = [p for doc in documents[::10] for p in doc.split("\n\n")[:3]]
    # Indentation, tabs, newlines and characters the corpus lacks (byte fallback) survive.
    paragraphs.append("  def f(x):\n\treturn x  # naïve ✓ 中文\n\n")
    for text in paragraphs:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_tokenizer_file_does_not_depend_on_where_it_was_trained(documents, tmp_path):
    from data.tokenizer import train_tokenizer

    a, b = tmp_path / "a", tmp_path / "b" / "elsewhere"
    a.mkdir(), b.mkdir(parents=True)
    here, there = (train_tokenizer(documents[:200], directory / "tok", VOCAB) for directory in (a, b))
    assert here.read_bytes() == there.read_bytes()


def test_second_prepare_reuses_the_cache(prepared, cache_dir):
    target = prepared.train_prefix.parent
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in target.iterdir()}
    lines = []
    again = prepare_embedded("pydoc", VOCAB, cache_dir, VALID_FRACTION, log=lines.append)
    assert lines == [f"using cached data at {target}"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in target.iterdir()} == before
    assert again.tokenizer.fingerprint == prepared.tokenizer.fingerprint
    assert (again.num_train_tokens, again.num_valid_tokens) == (
        prepared.num_train_tokens,
        prepared.num_valid_tokens,
    )


@pytest.mark.parametrize("damage", ["manifest", "missing_file"])
def test_mismatching_cache_is_rebuilt(prepared, tmp_path, damage):
    target = tmp_path / prepared.train_prefix.parent.name
    shutil.copytree(prepared.train_prefix.parent, target)
    if damage == "manifest":
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["valid_fraction"] = 0.5
        (target / "manifest.json").write_text(json.dumps(manifest))
    else:
        (target / "valid.idx").unlink()
    lines = []
    rebuilt = prepare_embedded("pydoc", VOCAB, tmp_path, VALID_FRACTION, log=lines.append)
    assert lines[0].startswith(f"rebuilding {target}")
    assert json.loads((target / "manifest.json").read_text())["valid_fraction"] == VALID_FRACTION
    assert rebuilt.num_valid_tokens == prepared.num_valid_tokens
    open_indexed(rebuilt.valid_prefix, rebuilt.tokenizer.vocab_size)


def test_concurrent_prepares_build_once(tmp_path):
    # flock locks belong to open file descriptions, so threads contend like processes do.
    lines = []
    threads = [
        threading.Thread(
            target=prepare_embedded, args=("pydoc", VOCAB, tmp_path, VALID_FRACTION, lines.append)
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(line.startswith("training tokenizer") for line in lines) == 1
    assert sum(line.startswith("using cached data") for line in lines) == 2
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [f"pydoc-v512-valid{VALID_FRACTION:g}"]


def test_another_valid_fraction_is_a_cache_of_its_own(tmp_path):
    """A run with another split builds beside the cache others read, rather than rebuilding it in place (which
    deleted the files a concurrent run of the first split was reading): both stay, reused as they are."""
    lines = []
    first = prepare_embedded("pydoc", VOCAB, tmp_path, VALID_FRACTION, lines.append)
    other = prepare_embedded("pydoc", VOCAB, tmp_path, 0.2, lines.append)
    again = prepare_embedded("pydoc", VOCAB, tmp_path, VALID_FRACTION, lines.append)
    assert first.train_prefix.parent != other.train_prefix.parent
    assert again.train_prefix == first.train_prefix and other.num_valid_tokens > first.num_valid_tokens
    assert not any(line.startswith("rebuilding") for line in lines)
    assert sum(line.startswith("training tokenizer") for line in lines) == 2


def test_train_and_valid_split_the_corpus(prepared, documents):
    train = split_documents(prepared.train_prefix, prepared.tokenizer)
    valid = split_documents(prepared.valid_prefix, prepared.tokenizer)
    assert train and valid
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(documents)
    # Documents keep corpus order within a split.
    assert train == [doc for doc in documents if doc in set(train)]
    assert prepared.num_valid_tokens < prepared.num_train_tokens


def test_copies_of_a_text_stay_on_one_side_of_the_split():
    """The stdlib corpus holds some docstrings more than once: every copy is train or every copy valid."""

    documents = embedded_documents("stdlib")
    is_valid = _valid_split(documents, VALID_FRACTION)
    sides: dict[str, set[bool]] = {}
    for doc, valid in zip(documents, is_valid):
        sides.setdefault(doc, set()).add(valid)
    assert any(n > 1 for n in Counter(documents).values())  # the case exists
    assert all(len(side) == 1 for side in sides.values())
    assert 0 < sum(is_valid) < len(documents)


def test_packed_samples_tile_the_token_stream(prepared, documents):
    tok = prepared.tokenizer
    train_texts = set(split_documents(prepared.train_prefix, tok))
    stream = [t for doc in documents if doc in train_texts for t in tok.encode(doc) + [tok.eos_id]]
    assert len(stream) == prepared.num_train_tokens

    seq_len = 100
    samples = PackedTokens(prepared.train_prefix, seq_len)
    assert len(samples) == (len(stream) - 1) // seq_len
    rebuilt = samples[0].tolist()
    for i in range(1, len(samples)):
        sample = samples[i]
        assert sample.shape == (seq_len + 1,) and sample.dtype == torch.long
        assert sample[0] == rebuilt[-1]  # consecutive samples overlap by one token
        rebuilt += sample[1:].tolist()
    assert rebuilt == stream[: len(rebuilt)]
    assert len(stream) - len(rebuilt) < seq_len


def test_too_few_tokens_for_one_sample(prepared):
    with pytest.raises(DataError, match=f"{prepared.num_valid_tokens} tokens"):
        PackedTokens(prepared.valid_prefix, prepared.num_valid_tokens)


def global_batch(samples, step, dp_size, gbs=8, mbs=2, seed=7):
    """The step's global batch, gathered from all dp ranks in rank order."""
    rows = []
    for rank in range(dp_size):
        loader = GlobalBatchLoader(samples, gbs, mbs, rank, dp_size, seed)
        for batch in loader.micro_batches(step):
            inputs, targets = batch["tokens"], batch["targets"]
            assert torch.equal(batch["positions"], torch.arange(samples.seq_len).expand(mbs, -1))
            assert inputs.shape == targets.shape == (mbs, samples.seq_len)
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            rows.append(torch.cat([inputs, targets[:, -1:]], dim=1))
    return torch.cat(rows)


def test_global_batch_does_not_depend_on_dp_size(prepared):
    samples = PackedTokens(prepared.train_prefix, 32)
    for step in range(6):
        expected = global_batch(samples, step, dp_size=1)
        assert expected.shape == (8, 33)
        for dp_size in (2, 4):
            assert torch.equal(global_batch(samples, step, dp_size), expected)
    assert not torch.equal(global_batch(samples, 0, 1), global_batch(samples, 1, 1))


class NumberedSamples:
    """Stand-in for PackedTokens whose sample i is filled with the number i."""

    def __init__(self, num_samples, seq_len=4):
        self.num_samples = num_samples
        self.seq_len = seq_len

    def __getitem__(self, i):
        return torch.full((self.seq_len + 1,), i, dtype=torch.long)


def served_samples(loader, steps):
    return [int(x) for _ in range(steps) for batch in loader.next() for x in batch["tokens"][:, 0]]


def test_each_epoch_visits_every_sample_once():
    num_samples, gbs = 10, 4  # batches straddle epoch boundaries
    loader = GlobalBatchLoader(NumberedSamples(num_samples), gbs, 2, 0, 1, seed=3)
    served = served_samples(loader, steps=10)
    epochs = [served[i : i + num_samples] for i in range(0, 40, num_samples)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(num_samples))
    assert len({tuple(epoch) for epoch in epochs}) > 1  # each epoch reshuffles


def test_resume_serves_the_same_batches(prepared):
    samples = PackedTokens(prepared.train_prefix, 16)
    first = GlobalBatchLoader(samples, 4, 1, 1, 2, seed=11)
    served_samples(first, steps=3)
    resumed = GlobalBatchLoader(samples, 4, 1, 1, 2, seed=11)
    resumed.load_state_dict(first.state_dict())
    assert resumed.step == 3
    for _ in range(3):
        for a, b in zip(first.next(), resumed.next(), strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("key", ["seed", "global_batch_size"])
def test_resume_with_other_sampling_is_refused(key):
    loader = GlobalBatchLoader(NumberedSamples(10), 4, 1, 0, 1, seed=0)
    state = loader.state_dict() | {key: 2}
    with pytest.raises(DataError, match=key):
        loader.load_state_dict(state)


def test_batch_sizes_must_divide():
    with pytest.raises(DataError, match="global_batch_size 6"):
        GlobalBatchLoader(NumberedSamples(10), 6, 2, 0, 2, seed=0)


def test_truncated_or_missing_files_are_reported(prepared, tmp_path):
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prepared.train_prefix}{suffix}", tmp_path / f"train{suffix}")
    prefix = tmp_path / "train"
    bin_path = tmp_path / "train.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:1000])
    with pytest.raises(DataError, match=str(bin_path)):
        open_indexed(prefix, vocab_size=None)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(DataError, match=str(tmp_path / "train.idx")):
        PackedTokens(prefix, 16)


def test_unknown_source_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match="pydoc"):
        embedded_documents("wikipedia")
    with pytest.raises(DataError, match="stdlib"):
        prepare_embedded("wikipedia", VOCAB, tmp_path, VALID_FRACTION, log=lambda line: None)
    assert not [p for p in tmp_path.iterdir() if p.name != ".lock"]
