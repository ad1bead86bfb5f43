"""checkpoint.init_from (launcher/init_from.py): a run starts from a Hugging Face directory exported by
`convert to-hf` with the source model's weights bit for bit and its loss on the first batch; its resume reads its own
checkpoint, not the import; bad directories end with one line before any process group, and a pickle is never
unpickled. Tiny models, fp32, one process (train() runs in the test process)."""
import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import launcher.convert
import launcher.trainer
from launcher.checkpoint import Checkpointer
from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.init_from import open_starting_weights
from launcher.trainer import model_inputs, train
from models import get_model_spec
from parallel.init import materialize
from tests.conftest import TINY, tiny_overrides
from tests.unit.test_hf import SMALL, saved_model, to_hf, trained  # noqa: F401  (trained: the fixture)

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, Path]:
    """(the source run directory, its fp32 export)."""
    run_dir = trained(False)
    return run_dir, to_hf(run_dir, tmp_path_factory.mktemp("export") / "hf")


def loaded(path: Path, spec, model_cfg):
    """(a model initialized with another seed and then filled from `path` by checkpoint.init_from's reader, the
    StartingWeights that filled it)."""
    weights = open_starting_weights(path, spec, model_cfg)
    with torch.device("meta"):
        model = spec.model_cls(model_cfg)
    materialize(model, torch.device("cpu"), seed=1234)
    weights.load([model])
    return model, weights


def first_batch_loss(cfg, model: torch.nn.Module) -> float:
    """`model`'s loss on the first micro-batch a one-process run of `cfg` trains on."""
    spec = get_model_spec(cfg.model.family)
    _, loader, _ = spec.data.build_loaders(cfg.data, cfg.train.seq_len, cfg.train.global_batch_size,
                                           cfg.train.micro_batch_size, 0, 1, cfg.train.seed, log=lambda _: None)
    (batch,) = loader.micro_batches(0)
    with torch.no_grad():
        args, kwargs = model_inputs(spec.data.keys, batch)
        terms = spec.loss.compute(model(*args, **kwargs), batch)
    return (terms.loss_sum / spec.loss.count(batch)).item()


def overrides(run_dir: Path, data_cache: Path, init_from: Path, *extra: str) -> list[str]:
    return tiny_overrides(run_dir, data_cache, *SMALL, f"checkpoint.init_from={init_from}", *extra)


@pytest.mark.parametrize("source", ["run directory", "step directory"])
def test_a_native_checkpoints_weights_load_bit_for_bit(trained, data_cache, tmp_path, source):
    """init_from another run (its checkpoints/latest, or a checkpoints/step-<N>): its model tensors only."""
    run_dir = trained(False)
    path = run_dir if source == "run directory" else Checkpointer(run_dir, 1, 0).latest_dir()
    cfg = load_config(TINY, overrides(tmp_path / "run", data_cache, path))
    spec, model_cfg = get_model_spec("llm"), cfg.model_config()
    model, weights = loaded(path, spec, model_cfg)
    expected = saved_model(run_dir).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    assert weights.tokenizer == json.loads((Checkpointer(run_dir, 1, 0).latest_dir() / "meta.json").read_text())[
        "tokenizer"]


def test_a_native_checkpoint_of_another_shape_or_tokenizer_is_refused(trained, data_cache, tmp_path, capsys):
    run_dir = trained(False)
    err = train_error(capsys, tmp_path / "run", data_cache, run_dir, "model.dim=128")
    assert "different shape" in err and "dim: checkpoint 64 vs config 128" in err
    other = shutil.copytree(run_dir, tmp_path / "other-tokenizer")
    meta_file = Checkpointer(other, 1, 0).latest_dir() / "meta.json"
    meta = {**json.loads(meta_file.read_text()), "tokenizer": "0123456789abcdef"}
    meta.pop("meta_sha256")  # an edited meta.json fails its checksum; without one it is read as written
    meta_file.write_text(json.dumps(meta))
    err = train_error(capsys, tmp_path / "run2", data_cache, other)
    assert "trained with tokenizer 0123456789abcdef" in err


def test_a_directory_of_no_known_format_lists_the_formats(data_cache, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = train_error(capsys, tmp_path / "run", data_cache, tmp_path / "empty")
    assert "none of the formats" in err and "Hugging Face model directory" in err and "checkpoints/step-<N>" in err


@pytest.mark.parametrize("sharded", [False, True])
def test_imported_weights_are_the_source_checkpoints_bit_for_bit(exported, data_cache, tmp_path, sharded):
    source, hf = exported
    if sharded:  # shards with model.safetensors.index.json, as huggingface_hub writes a large model
        from huggingface_hub import save_torch_state_dict

        hf = shutil.copytree(hf, tmp_path / "hf", ignore=shutil.ignore_patterns("model.safetensors"))
        save_torch_state_dict(load_file(exported[1] / "model.safetensors"), hf, max_shard_size="100KB")
        assert len(list(hf.glob("*.safetensors"))) > 1
    cfg = load_config(TINY, overrides(tmp_path / "run", data_cache, hf))
    spec, model_cfg = get_model_spec("llm"), cfg.model_config()
    model, _ = loaded(hf, spec, model_cfg)
    expected = saved_model(source).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_a_run_starts_from_the_import_and_resumes_from_its_own_checkpoint(exported, data_cache, tmp_path, capsys):
    source, hf = exported
    hf_copy = tmp_path / "hf"
    shutil.copytree(hf, hf_copy)
    cfg = load_config(TINY, overrides(tmp_path / "run", data_cache, hf_copy, "train.steps=2", "run.stop_at_step=1"))
    first = train(cfg)["losses"]
    assert "initialized from the Hugging Face weights" in capsys.readouterr().out

    # The source model's loss on the run's first batch (the same data settings: the same batch).
    assert first == [pytest.approx(first_batch_loss(cfg, saved_model(source)), rel=1e-6, abs=0)]

    shutil.rmtree(hf_copy)  # a resume that re-imported would fail preflight on the missing directory
    resumed = train(load_config(TINY, overrides(tmp_path / "run", data_cache, hf_copy, "train.steps=2")))["losses"]
    out = capsys.readouterr().out
    assert "resumed from" in out and "init_from" in out and "ignored" in out
    assert "initialized from the Hugging Face" not in out and len(resumed) == 1


def train_error(capsys, run_dir: Path, data_cache: Path, init_from: Path, *extra: str) -> str:
    argv = ["train", str(TINY)]
    for override in overrides(run_dir, data_cache, init_from, *extra):
        argv += ["--set", override]
    assert main(argv) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (run_dir / "checkpoints").exists()
    return err


class _CreatesMarker:
    """Unpickling this creates the file `path` (what a malicious pytorch_model.bin could do instead)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_pickled_weights_are_refused_and_never_unpickled(exported, data_cache, tmp_path, capsys):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_CreatesMarker(control))).close()
    assert control.exists()  # the pickle works: unpickling it would leave a marker

    marker = tmp_path / "marker"
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(exported[1] / "config.json", hf)
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    err = train_error(capsys, tmp_path / "run", data_cache, hf)
    assert "pytorch_model.bin" in err and "never loaded" in err
    assert not marker.exists()


def _damage(directory: Path, name: str, how: str) -> None:
    path = directory / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-1000])
    else:
        path.write_bytes(how.encode() if how.startswith(("{", "[")) else os.urandom(5000))


@pytest.mark.parametrize("name, how, line", [
    ("config.json", "{not json", "config.json is not readable JSON"),
    ("config.json", "[1, 2]", "config.json holds a JSON list, not an object"),
    ("model.safetensors", "truncated", "model.safetensors is not a readable safetensors file"),
    ("model.safetensors", "random", "model.safetensors is not a readable safetensors file"),
    ("model.safetensors.index.json", "{", "model.safetensors.index.json is not readable JSON"),
    ("model.safetensors.index.json", '{"metadata": {}}', "model.safetensors.index.json has no weight_map"),
])
def test_a_damaged_hugging_face_file_is_one_line(exported, data_cache, tmp_path, capsys, name, how, line):
    hf = shutil.copytree(exported[1], tmp_path / "hf")
    _damage(hf, name, how)
    assert line in train_error(capsys, tmp_path / "run", data_cache, hf)


def test_a_config_mismatch_names_the_key(exported, data_cache, tmp_path, capsys):
    err = train_error(capsys, tmp_path / "run", data_cache, exported[1], "model.dim=128")
    assert "hidden_size=64" in err and "model.dim" in err


def test_a_vocabulary_mismatch_is_named(exported, data_cache, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(exported[1], hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] * 2}))
    err = train_error(capsys, tmp_path / "run", data_cache, hf)
    assert f"vocab_size={config['vocab_size'] * 2}" in err and "tokenizer" in err


def test_a_missing_tensor_is_named(exported, data_cache, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(exported[1], hf)
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    assert "missing (no tensor for): norm.weight" in train_error(capsys, tmp_path / "run", data_cache, hf)


def test_an_unexpected_tensor_and_a_wrong_shape_are_named(exported, data_cache, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(exported[1], hf)
    tensors = load_file(hf / "model.safetensors")
    save_file({**tensors, "model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)},
              hf / "model.safetensors", metadata={"format": "pt"})
    assert "unexpected tensors: layers.7.feed_forward.w3.weight (from model.layers.7)" in train_error(
        capsys, tmp_path / "run", data_cache, hf)
    save_file({**tensors, "model.norm.weight": torch.ones(65)}, hf / "model.safetensors", metadata={"format": "pt"})
    assert "tensor norm.weight (from model.norm.weight) has shape [65]" in train_error(capsys, tmp_path / "run",
                                                                                       data_cache, hf)


def test_a_family_without_a_hf_mapping_is_refused(exported, data_cache, tmp_path, capsys, monkeypatch):
    spec = get_model_spec("llm")
    monkeypatch.setattr(launcher.trainer, "get_model_spec",
                        lambda family: dataclasses.replace(spec, state_dict_adapters={}))
    assert "has no Hugging Face mapping" in train_error(capsys, tmp_path / "run", data_cache, exported[1])


def test_a_consolidated_file_round_trips_bit_for_bit(trained, data_cache, tmp_path, capsys):
    """`convert to-file`: one safetensors file of the checkpoint's tensors (canonical names, the run's record in its
    metadata); checkpoint.init_from that file gives them back bit for bit. A file of another shape is refused, and
    a safetensors file without the record (e.g. a Hugging Face one) is named as such."""
    run_dir = trained(True)  # tied embeddings: both names in the file, one parameter
    file = launcher.convert.convert("to-file", run_dir, tmp_path / "weights.safetensors", log=lambda _: None)
    tensors = load_file(file)
    expected = saved_model(run_dir).state_dict()
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[n], expected[n]) for n in expected)

    cfg = load_config(TINY, overrides(tmp_path / "run", data_cache, file, "model.tie_embeddings=true"))
    spec, model_cfg = get_model_spec("llm"), cfg.model_config()
    model, _ = loaded(file, spec, model_cfg)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    assert model.output.weight is model.tok_embeddings.weight

    err = train_error(capsys, tmp_path / "run2", data_cache, file, "model.tie_embeddings=true", "model.dim=128")
    assert "different shape" in err
    save_file(tensors, tmp_path / "plain.safetensors")
    err = train_error(capsys, tmp_path / "run3", data_cache, tmp_path / "plain.safetensors")
    assert "without shardwright's metadata" in err
    _damage(tmp_path, "weights.safetensors", "truncated")
    err = train_error(capsys, tmp_path / "run4", data_cache, file, "model.tie_embeddings=true")
    assert "weights.safetensors is not a readable safetensors file" in err


def test_to_file_refuses_an_existing_output_and_another_suffix(trained, tmp_path, capsys):
    (tmp_path / "exists.safetensors").write_text("keep")
    for out, message in ((tmp_path / "exists.safetensors", "exists"), (tmp_path / "weights.pt", ".safetensors")):
        assert main(["convert", "to-file", str(trained(False)), str(out)]) == USER_ERROR_EXIT
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err
    assert (tmp_path / "exists.safetensors").read_text() == "keep" and not (tmp_path / "weights.pt").exists()
