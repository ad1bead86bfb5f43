"""data/: prepared datasets for training: splits, packing with document boundaries, blends,
and a sample order that depends only on (seed, step), whatever the dp size, across a resume."""
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.blend import BlendedLoader, Permutation
from data.build import build_loaders, check_data_config, open_blend
from data.errors import DataError
from data.loader import GlobalBatchLoader, PackedTokens
from data.prepare import prepare
from data.prepared import PreparedDataset
from data.tokenizer import Tokenizer
from data.tokenizer_train import train_from_files
from launcher.config import load_config, validate
from tests.conftest import TINY
from tests.corpora import topics, write_mixed_corpus

VOCAB = 512
SEQ_LEN = 32
quiet = dict(log=lambda line: None, progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three prepared datasets: a (jsonl, several shards), b (parquet), c (one line = one document)."""
    root = tmp_path_factory.mktemp("blend")
    files, _ = write_mixed_corpus(root / "raw")
    (root / "raw" / "lines.txt").write_text("\n".join(topics()[:20]))
    train_from_files([str(f) for f in files], root / "spm", VOCAB, log=lambda line: None)
    prepare([str(files[0])], root / "a", root / "spm.model", shard_tokens=30_000, **quiet)
    prepare([str(files[1])], root / "b", root / "spm.model", **quiet)
    prepare([str(root / "raw" / "lines.txt")], root / "c", root / "spm.model", text_unit="line", **quiet)
    return root


def data_cfg(root, prepared, **changes):
    cfg = dict(source="pydoc", vocab_size=VOCAB, valid_fraction=0.05, cache_dir="", prepared=prepared, tokenizer="",
               splits=[90, 10, 0], document_mask=False)
    return SimpleNamespace(**(cfg | changes))


BLEND = [{"path": "a", "weight": 0.6}, {"path": "b", "weight": 0.3}, {"path": "c", "weight": 0.1}]


def blend_cfg(root, weights=(0.6, 0.3, 0.1), **changes):
    return data_cfg(root, [{"path": str(root / e["path"]), "weight": w} for e, w in zip(BLEND, weights)], **changes)


def documents(dataset, split_ranges):
    """Token arrays of the documents in the ranges, in order."""
    return [dataset.shards[s][i] for s, first, end in split_ranges for i in range(first, end)]


def test_permutation_is_a_bijection_chosen_by_its_key():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(Permutation(n, (5, n)).__call__(np.arange(n)).tolist()) == list(range(n))
    a, b = Permutation(1000, (0, 1))(np.arange(1000)), Permutation(1000, (0, 2))(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    assert np.array_equal(Permutation(10**12, (3,))(np.array([5, 7])), Permutation(10**12, (3,))(np.array([5, 7])))


def test_splits_partition_the_documents(root):
    dataset = PreparedDataset(root / "c")
    fractions = [80, 15, 5]
    split = {name: dataset.split_ranges(fractions, name) for name in ("train", "valid", "test")}
    ids = {name: [(s, i) for s, a, b in ranges for i in range(a, b)] for name, ranges in split.items()}
    everything = [(s, i) for s, shard in enumerate(dataset.shards) for i in range(len(shard))]
    assert sorted(ids["train"] + ids["valid"] + ids["test"]) == everything
    n = len(everything)
    assert n > 1000  # several split blocks
    for name, share in zip(ids, (0.80, 0.15, 0.05)):
        assert abs(len(ids[name]) / n - share) < 0.01
    assert len(split["valid"]) > 1  # valid documents come from every block of the corpus, not only its end


def test_packed_samples_tile_the_split_and_mark_document_starts(root):
    blend = open_blend(data_cfg(root, [str(root / "a")]), seed=0)
    samples = blend.samples("valid", SEQ_LEN).components[0]
    docs = documents(blend.datasets[0], blend.datasets[0].split_ranges(blend.fractions, "valid"))
    stream = np.concatenate(docs)
    starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
    assert samples.num_tokens == len(stream) and len(samples) == (len(stream) - 1) // SEQ_LEN
    for i in range(len(samples)):
        lo = i * SEQ_LEN
        assert samples[i].tolist() == stream[lo:lo + SEQ_LEN + 1].tolist()
        expected = starts[(starts > lo) & (starts <= lo + SEQ_LEN)] - lo
        assert samples.document_starts(i).tolist() == expected.tolist()


def test_document_info_restarts_positions_after_each_eos(root):
    data, loader, _ = build_loaders(blend_cfg(root), SEQ_LEN, 8, 4, 0, 1, seed=3, log=lambda line: None)
    eos = data.tokenizer.eos_id
    seen_boundary = False
    for step in range(5):
        for batch in loader.micro_batches(step, documents=True):
            inputs, positions, document_ids = batch["tokens"], batch["positions"], batch["document_ids"]
            assert positions.shape == document_ids.shape == inputs.shape
            new_document = torch.zeros_like(inputs, dtype=torch.bool)
            new_document[:, 1:] = inputs[:, :-1] == eos
            assert torch.equal(positions == 0, new_document | (torch.arange(SEQ_LEN) == 0))
            assert torch.equal(document_ids, new_document.long().cumsum(1))
            seen_boundary |= bool(new_document.any())
    assert seen_boundary


def test_single_dataset_loader_reports_documents_too(root):
    eos = Tokenizer(root / "spm.model").eos_id
    loader = GlobalBatchLoader(PackedTokens(root / "b" / "shard-00000", SEQ_LEN), 8, 4, 1, 2, seed=0)
    for batch in loader.micro_batches(3, documents=True):
        inputs = batch["tokens"]
        new_document = torch.zeros_like(inputs, dtype=torch.bool)
        new_document[:, 1:] = inputs[:, :-1] == eos
        assert torch.equal(batch["document_ids"], new_document.long().cumsum(1))
        assert torch.equal(batch["positions"] == 0, new_document | (torch.arange(SEQ_LEN) == 0))


def test_blend_weights_are_honoured(root):
    weights = (0.6, 0.3, 0.1)
    samples = open_blend(blend_cfg(root, weights), seed=0).samples("train", SEQ_LEN)
    n = 20_000
    counts = np.bincount(samples.dataset_of(np.arange(n)), minlength=3)
    for count, w in zip(counts, weights):
        assert abs(count - w * n) < 3 * math.sqrt(n * w * (1 - w))  # well within sampling error
    # ... and over any window, e.g. a later step's rows
    counts = np.bincount(samples.dataset_of(np.arange(10**7, 10**7 + 4096)), minlength=3)
    assert np.allclose(counts / 4096, weights, atol=0.02)


def test_each_epoch_of_a_dataset_visits_all_its_samples_once(root):
    samples = open_blend(blend_cfg(root, (0.5, 0.25, 0.25)), seed=0).samples("train", SEQ_LEN)
    b = samples.components[1]
    positions = np.arange(3 * 4 * b.num_samples + 5000)
    located = samples.locate(positions)
    drawn = [i for component, i in located if component is b]
    assert len(drawn) >= 2 * b.num_samples
    first, second = drawn[:b.num_samples], drawn[b.num_samples:2 * b.num_samples]
    assert sorted(first) == sorted(second) == list(range(b.num_samples))
    assert first != second  # each epoch is shuffled anew


@pytest.mark.parametrize("weights", [(0.6, 0.3, 0.1), (0.1, 0.1, 0.8)])
def test_a_blends_distinct_samples_end_before_its_first_repeat(root, weights):
    """distinct_samples (how many valid rows an eval may read): the valid blend's positions before it hold no
    sample twice and the one at it repeats one of them, from whichever dataset its weights exhaust first; a limit
    below it is kept, and every dp rank's loader says the same."""
    valid = [build_loaders(blend_cfg(root, weights), SEQ_LEN, 8, 4, rank, 2, 7, log=lambda line: None)[2]
             for rank in range(2)]
    n = valid[0].distinct_samples(10**6)
    located = [(id(component), i) for component, i in valid[0].samples.locate(np.arange(n + 1))]
    assert len(set(located[:n])) == n and located[n] in located[:n]
    assert 0 < n < valid[0].samples.num_samples  # a dataset runs out before the blend's samples do
    assert valid[1].distinct_samples(10**6) == n and valid[0].distinct_samples(n - 3) == n - 3


def global_batch(loaders, step):
    """Step's global batch gathered from all dp ranks in rank order, with its document info."""
    rows, positions, ids = [], [], []
    for loader in loaders:
        for batch in loader.micro_batches(step, documents=True):
            rows.append(torch.cat([batch["tokens"], batch["targets"][:, -1:]], dim=1))
            positions.append(batch["positions"])
            ids.append(batch["document_ids"])
    return torch.cat(rows), torch.cat(positions), torch.cat(ids)


def loaders(cfg, dp_size, micro_batch_size, seed=7, gbs=8):
    return [build_loaders(cfg, SEQ_LEN, gbs, micro_batch_size, rank, dp_size, seed, log=lambda line: None)[1]
            for rank in range(dp_size)]


def test_steps_100_to_110_do_not_depend_on_dp_size_or_a_resume(root):
    cfg = blend_cfg(root)
    straight = loaders(cfg, dp_size=1, micro_batch_size=4)[0]
    straight.step = 0
    for _ in range(100):
        straight.next()  # dp=1 throughout
    expected = [global_batch([straight], step) for step in range(100, 111)]

    first_half = loaders(cfg, dp_size=2, micro_batch_size=2)  # dp=2 for 50 steps ...
    for _ in range(50):
        for loader in first_half:
            loader.next()
    state = first_half[0].state_dict()
    second_half = loaders(cfg, dp_size=4, micro_batch_size=1)  # ... then resumed on dp=4
    for loader in second_half:
        loader.load_state_dict(state)
        assert loader.step == 50
        for _ in range(50):
            loader.next()
    for offset, step in enumerate(range(100, 111)):
        assert second_half[0].step == step
        got = global_batch(second_half, step)
        for a, b in zip(got, expected[offset]):
            assert torch.equal(a, b)
        for loader in second_half:
            loader.next()
    assert not torch.equal(expected[0][0], expected[1][0])


def test_resume_onto_other_data_is_refused(root):
    loader = loaders(blend_cfg(root), 1, 8)[0]
    other = loaders(blend_cfg(root, (0.5, 0.3, 0.2)), 1, 8)[0]
    with pytest.raises(DataError, match="other data"):
        other.load_state_dict(loader.state_dict())
    assert isinstance(loader, BlendedLoader)
    other_seq = build_loaders(blend_cfg(root), SEQ_LEN * 2, 8, 8, 0, 1, 7, log=lambda line: None)[1]
    with pytest.raises(DataError, match="seq_len"):
        other_seq.load_state_dict(loader.state_dict())


def copy_dataset(root, name, tmp_path):
    return shutil.copytree(root / name, tmp_path / name)


def test_truncated_bin_is_named(root, tmp_path):
    ds = copy_dataset(root, "a", tmp_path)
    bin_path = ds / "shard-00001.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{bin_path} holds .* bytes but"):
        check_and_open(tmp_path, "a")


def test_idx_from_another_shard_is_named(root, tmp_path):
    ds = copy_dataset(root, "a", tmp_path)
    shutil.copy(ds / "shard-00001.idx", ds / "shard-00000.idx")
    with pytest.raises(DataError, match="shard-00000.bin holds .* bytes but .*shard-00000.idx describes"):
        check_and_open(tmp_path, "a")


def test_consistent_pair_from_another_run_is_named(root, tmp_path):
    ds = copy_dataset(root, "a", tmp_path)
    for suffix in (".bin", ".idx"):
        shutil.copy(root / "b" / f"shard-00000{suffix}", ds / f"shard-00001{suffix}")
    with pytest.raises(DataError, match="shard-00001.idx holds .* but .*manifest.json says"):
        check_and_open(tmp_path, "a")


def test_truncated_idx_is_named(root, tmp_path):
    ds = copy_dataset(root, "b", tmp_path)
    idx = ds / "shard-00000.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match=f"{idx} is truncated"):
        check_and_open(tmp_path, "b")


def check_and_open(where, name, **changes):
    cfg = data_cfg(where, [str(where / name)], **changes)
    check_data_config(cfg)
    return build_loaders(cfg, SEQ_LEN, 8, 8, 0, 1, 0, log=lambda line: None)


@pytest.fixture(scope="module")
def other_tokenizer(root):
    train_from_files([str(root / "raw" / "b.parquet")], root / "other", 700, log=lambda line: None)
    return root / "other.model"


def test_tokenizer_that_differs_from_the_datasets_is_named(root, other_tokenizer, tmp_path):
    with pytest.raises(DataError) as error:
        check_and_open(root, "a", tokenizer=str(other_tokenizer), vocab_size=768)
    message = str(error.value)
    assert str(other_tokenizer) in message and str(root / "a") in message and "vocab 768" in message
    prepare([str(root / "raw" / "b.parquet")], tmp_path / "d", other_tokenizer, **quiet)
    with pytest.raises(DataError, match=f"{root / 'a'}/tokenizer.model .* not the one {tmp_path / 'd'}"):
        check_data_config(data_cfg(root, [str(root / "a"), str(tmp_path / "d")]))


def test_config_mistakes_are_named(root, tmp_path):
    with pytest.raises(DataError, match="data.vocab_size=1024 .* set data.vocab_size=512"):
        check_and_open(root, "a", vocab_size=1024)
    with pytest.raises(DataError, match=f"prepared dataset {tmp_path / 'nope'} does not exist"):
        check_and_open(tmp_path, "nope")
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        check_and_open(tmp_path, "raw")
    with pytest.raises(DataError, match=r"data.prepared\[0\].weight = -1"):
        check_data_config(data_cfg(root, [{"path": str(root / "a"), "weight": -1}]))
    with pytest.raises(DataError, match=r"data.prepared\[0\].weight = inf"):
        check_data_config(data_cfg(root, [{"path": str(root / "a"), "weight": float("inf")}]))
    with pytest.raises(DataError, match="gives a dataset 1.0e-07 of the blend"):  # its blocks: 10^7 samples each
        check_data_config(data_cfg(root, [{"path": str(root / "a"), "weight": 1e7}, {"path": str(root / "b")}]))
    with pytest.raises(DataError, match="data.splits"):
        check_and_open(root, "a", splits=[90, 10])
    with pytest.raises(DataError, match="data.splits"):
        check_and_open(root, "a", splits=[float("inf"), 1, 0])
    with pytest.raises(DataError, match="the valid split of .* has no documents"):
        check_and_open(root, "a", splits=[100, 0, 0])
    with pytest.raises(DataError, match="data.source=stdlib and data.prepared"):
        check_and_open(root, "a", source="stdlib")


def test_config_points_training_at_a_blend(root, tmp_path):
    blend = "[" + ", ".join(f"{{path: {root / e['path']}, weight: {e['weight']}}}" for e in BLEND) + "]"
    config = tmp_path / "blend.yaml"  # tiny.yaml without data.vocab_size
    config.write_text(TINY.read_text().replace("  vocab_size: 4096\n", ""))
    cfg = load_config(config, [f"data.prepared={blend}", "data.splits=[95, 5, 0]"])
    assert cfg.data.vocab_size == VOCAB  # left out: the tokenizer's
    assert cfg.model_config().vocab_size == VOCAB
    validate(cfg, 1)
    cfg.dump(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").data == cfg.data
    tokenizer = Tokenizer(root / "a" / "tokenizer.model")
    assert cfg.data.vocab_size == tokenizer.vocab_size
    with pytest.raises(DataError, match="set data.vocab_size=512"):
        validate(load_config(TINY, [f"data.prepared={blend}"]), 1)  # tiny.yaml sets vocab_size 4096
