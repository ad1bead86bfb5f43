"""Megatron-Core GPT checkpoints in and out (launcher/megatron_import.py, `convert to-megatron`, models/llm/megatron.py),
against megatron-core's own GPTModel (local layer spec) and its own dist_checkpointing, on CPU in a gloo world of two
processes: a checkpoint Megatron saved at tp=2 (and resharded by Megatron to pp=2) imports with Megatron's own tp=2
logits; our export loads strictly into GPTModel at tp=2 and pp=2 and gives our logits. Controls: a contiguous
q|k|v split fails the same comparison. Bad checkpoints end with one line. Tiny models, fp32. Megatron's side, and
what its forward needs on CPU: tests/unit/megatron_reference.py."""
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader

import models.llm.megatron
from launcher.config import load_config
from launcher.convert import convert, one_process_world, save_megatron
from launcher.errors import UserError
from models import get_model_spec
from tests.conftest import TEST_VOCAB, TINY, tiny_overrides
from tests.unit.megatron_reference import megatron_world, tokens
from tests.unit.test_hf import SMALL, saved_model, trained  # noqa: F401  (trained: the fixture)
from tests.unit.test_init_from import loaded, train_error

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process
TOLERANCE = 1e-5  # relative to the largest logit, fp32


@pytest.fixture(scope="module")
def megatron(trained, tmp_path_factory) -> dict[str, Path]:
    """The source run, its export, Megatron's own tp2 and pp2 checkpoints, and Megatron's logits (one world)."""
    run_dir = trained(False)
    work = tmp_path_factory.mktemp("megatron")
    export = convert("to-megatron", run_dir, work / "export", log=lambda _: None)
    (work / "tp2").mkdir()
    (work / "pp2").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(megatron_world, args=(port, work, export), nprocs=2)
    return {"run": run_dir, "export": export, "tp2": work / "tp2", "pp2": work / "pp2", "work": work}


def gathered(work: Path, what: str) -> torch.Tensor:
    return torch.cat([torch.load(work / f"{what}-logits-{rank}.pt") for rank in range(2)], dim=-1)


def imported_model(path: Path, data_cache: Path, tmp_path: Path, *extra: str) -> torch.nn.Module:
    cfg = load_config(TINY, tiny_overrides(tmp_path / "run", data_cache, *SMALL, *extra))
    return loaded(path, get_model_spec("llm"), cfg.model_config())[0].eval()


def difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_megatrons_checkpoint_imports_with_megatrons_logits(megatron, data_cache, tmp_path, layout):
    with torch.no_grad():
        ours = imported_model(megatron[layout], data_cache, tmp_path)(tokens())
    assert difference(ours, gathered(megatron["work"], "megatron")) < TOLERANCE


def test_a_contiguous_qkv_split_fails_the_same_comparison(megatron, data_cache, tmp_path, monkeypatch):
    def contiguous(qkv, cfg):  # q|k|v as three blocks instead of per query group
        return qkv.split([cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim])

    monkeypatch.setattr(models.llm.megatron, "split_qkv", contiguous)
    with torch.no_grad():
        ours = imported_model(megatron["tp2"], data_cache, tmp_path)(tokens())
    assert difference(ours, gathered(megatron["work"], "megatron")) > 100 * TOLERANCE


def test_the_export_loads_into_megatron_with_our_logits(megatron):
    """GPTModel built from gpt_config.json loaded the export strictly at tp=2 and pp=2 (in the worker)."""
    with torch.no_grad():
        ours = saved_model(megatron["run"])(tokens())
    assert difference(gathered(megatron["work"], "export"), ours) < TOLERANCE


@pytest.mark.parametrize("layout", ["dist checkpoint", "Megatron-LM save directory"])
def test_the_export_imports_back_bit_for_bit(megatron, data_cache, tmp_path, layout):
    path = megatron["export"]
    if layout == "Megatron-LM save directory":  # latest_checkpointed_iteration.txt names iter_<N>/
        path = tmp_path / "megatron-lm"
        shutil.copytree(megatron["export"], path / "iter_0000003")
        (path / "latest_checkpointed_iteration.txt").write_text("3\n")
    model = imported_model(path, data_cache, tmp_path)
    expected = saved_model(megatron["run"]).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_tied_embeddings_export_without_output_layer_and_import_back(trained, data_cache, tmp_path):
    run_dir = trained(True)
    export = convert("to-megatron", run_dir, tmp_path / "export", log=lambda _: None)
    assert json.loads((export / "gpt_config.json").read_text())["share_embeddings_and_output_weights"]
    assert "output_layer.weight" not in FileSystemReader(export).read_metadata().state_dict_metadata
    model = imported_model(export, data_cache, tmp_path, "model.tie_embeddings=true")
    assert model.output.weight is model.tok_embeddings.weight
    expected = saved_model(run_dir).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_a_model_of_another_config_is_refused_by_gpt_config(megatron, data_cache, tmp_path):
    with pytest.raises(UserError, match="gpt_config.json has layernorm_epsilon=1e-05 but the run has 1e-06"):
        imported_model(megatron["export"], data_cache, tmp_path, "model.norm_eps=1e-6")


def _save(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    with one_process_world(60):
        save_megatron(directory, tensors, n_layers=2)
    return directory


def bad_checkpoints(megatron, tmp_path) -> dict[str, tuple[Path, str]]:
    """Each bad checkpoint and the line it must end with."""
    cfg = load_config(megatron["run"] / "config.yaml")
    tensors = models.llm.megatron.MegatronGPTAdapter().from_native(saved_model(megatron["run"]).state_dict(),
                                                                    cfg.model_config())
    missing = _save(tmp_path / "missing", {n: t for n, t in tensors.items() if n != "decoder.final_layernorm.weight"})
    wide = _save(tmp_path / "wide", {**tensors, "output_layer.weight": torch.zeros(TEST_VOCAB, 65)})
    zarr = shutil.copytree(megatron["export"], tmp_path / "zarr")
    (zarr / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    hostile = shutil.copytree(megatron["export"], tmp_path / "hostile")
    marker = tmp_path / "unpickled"
    (hostile / ".metadata").write_bytes(pickle.dumps(_Hostile(str(marker))))
    bad_config = shutil.copytree(megatron["export"], tmp_path / "bad-config")
    (bad_config / "gpt_config.json").write_text("{")
    truncated = shutil.copytree(megatron["export"], tmp_path / "truncated")
    shard = max(truncated.glob("*.distcp"), key=lambda path: path.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return {"missing": (missing, "missing (no tensor for): decoder.final_layernorm.weight"),
            "wrong shape": (wide, "tensor output_layer.weight has shape [1024, 65] but the run's output_layer.weight "
                                  "has [1024, 64]"),
            "zarr": (zarr, "backend 'zarr'; only 'torch_dist' is read"),
            "pickle": (hostile, "it refers to posix.system, which DCP metadata never holds"),
            "config not JSON": (bad_config, "gpt_config.json is not readable JSON"),
            # found while reading, after the checks: the same one line
            "truncated shard": (truncated, "it is damaged: copy it again from its source")}


class _Hostile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_bad_checkpoints_end_with_one_line(megatron, data_cache, tmp_path, capsys):
    for name, (path, line) in bad_checkpoints(megatron, tmp_path).items():
        assert line in train_error(capsys, tmp_path / f"run-{name}", data_cache, path), name
    assert not (tmp_path / "unpickled").exists()
