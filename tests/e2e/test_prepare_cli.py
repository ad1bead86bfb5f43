"""Raw files -> `shardwright tokenizer train` -> `shardwright prepare` -> `shardwright train` on a
blend, through the CLI as a user runs it; a resume onto another dp size continues the same run;
bad input ends with one line naming the file."""
import json

import pytest
import yaml

from data.prepare import prepare
from tests.conftest import TINY
from tests.corpora import topics, write_mixed_corpus
from tests.e2e.test_cli import assert_one_error_line, losses_of, shardwright, tree_digest

VOCAB = 512


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare-cli")
    files, texts = write_mixed_corpus(root / "raw")
    (root / "raw" / "lines.txt").write_text("\n".join(topics()[:10]))
    tok = shardwright("tokenizer", "train", *map(str, files), "--output", str(root / "tok" / "spm"),
                      "--vocab-size", str(VOCAB), "--special-tokens", "<image>")
    assert tok.returncode == 0, tok.stderr[-3000:]
    assert "vocab 512" in tok.stdout and "'<image>': 4" in tok.stdout
    main = shardwright("prepare", *map(str, files), "--tokenizer", str(root / "tok" / "spm.model"),
                       "--output", str(root / "main"), "--num-proc", "2")
    assert main.returncode == 0, main.stderr[-3000:]
    # The second dataset in-process (the CLI path is the same; this saves a process start).
    prepare([str(root / "raw" / "*.txt")], root / "lines", root / "tok" / "spm.model", text_unit="line",
            log=lambda line: None, progress=False)
    return root, texts, main


def train_args(root, run_dir, *extra):
    blend = f"[{{path: {root / 'main'}, weight: 3}}, {{path: {root / 'lines'}, weight: 1}}]"
    overrides = [f"run.dir={run_dir}", f"data.prepared={blend}", "data.splits=[90, 10, 0]", f"data.vocab_size={VOCAB}",
                 "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_len=64",
                 "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.sample_prompt=",
                 "run.tensorboard=false", "run.log_every=100", "checkpoint.every=0", *extra]
    return ["train", str(TINY), *(a for o in overrides for a in ("--set", o))]


def test_prepare_writes_a_dataset_and_reruns_as_a_no_op(prepared):
    root, texts, result = prepared
    manifest = json.loads((root / "main" / "manifest.json").read_text())
    assert manifest["num_documents"] == len(texts) and manifest["num_dropped_empty"] == 2
    assert manifest["stats"]["num_proc"] == 2
    assert f"prepared {root / 'main'}: {len(texts)} documents (2 empty dropped)" in result.stdout
    assert "tokens/s" in result.stdout
    before = tree_digest(root / "main")
    lines = []
    prepare([str(root / "raw" / "a.jsonl"), str(root / "raw" / "b.parquet")], root / "main",
            root / "tok" / "spm.model", num_proc=2, log=lines.append, progress=False)
    assert "nothing to do" in lines[-1]
    assert tree_digest(root / "main") == before


def test_train_on_a_blend_and_resume_on_another_dp_size(prepared, tmp_path):
    root, _, _ = prepared
    straight = shardwright(*train_args(root, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "blend of 2 prepared dataset(s)" in straight.stdout and "weight 0.750" in straight.stdout
    resolved = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())["data"]
    assert resolved["prepared"][1] == {"path": str(root / "lines"), "weight": 1}

    stopped = shardwright(*train_args(root, tmp_path / "resumed", "run.stop_at_step=3"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = shardwright(*train_args(root, tmp_path / "resumed"), "--nproc-per-node", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    want, got = losses_of(tmp_path / "straight"), losses_of(tmp_path / "resumed")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)


def test_bad_input_is_one_line(prepared, tmp_path):
    root, _, _ = prepared
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"body": "text under another name"}\n')
    result = shardwright("prepare", str(bad), "--tokenizer", str(root / "tok" / "spm.model"),
                         "--output", str(tmp_path / "out"))
    assert_one_error_line(result, str(bad), "no field 'text'", "--text-field")
    assert not (tmp_path / "out").exists()

    result = shardwright(*train_args(root, tmp_path / "run", f"data.tokenizer={root / 'main' / 'shard-00000.bin'}"))
    assert_one_error_line(result, "shard-00000.bin", "sentencepiece")
    assert not (tmp_path / "run").exists()
