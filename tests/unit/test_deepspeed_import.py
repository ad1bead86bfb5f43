"""checkpoint.init_from a DeepSpeed ZeRO checkpoint (launcher/deepspeed_import.py): checkpoints saved by a real
DeepSpeed engine on CPU (DS_ACCELERATOR=cpu, gloo, 2 data-parallel processes, ZeRO stages 1-3) wrapping this
project's tiny llm model (also tied and `module.`-prefixed) or transformers' LlamaForCausalLM load with the
engine's module weights bit for bit and compute its logits; a pickle that would run code is refused unread, and
bad input ends with one line. Tiny models, fp32; the imports run in the test process."""
import importlib
import os
import pickle
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from launcher.config import load_config
from launcher.convert import build_model
from launcher.deepspeed_import import weights_only_torch_load
from launcher.init_from import open_starting_weights
from launcher.trainer import train
from models import get_model_spec
from tests.conftest import TEST_VOCAB, TINY, tiny_overrides
from tests.unit.test_hf import SMALL
from tests.unit.test_init_from import _CreatesMarker, first_batch_loss, train_error

pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process

WORLD = 2
# (name, ZeRO stage, the wrapped model: this project's; ours with tied embeddings inside a wrapper that prefixes
# its names with `module.`; transformers' Llama built from our export config)
CASES = (("zero1", 1, "ours"), ("zero2", 2, "ours"), ("zero2-tied", 2, "ours-tied"), ("zero3", 3, "ours"),
         ("zero3-hf", 3, "hf"))


def config(kind: str = "ours"):
    tied = kind == "ours-tied"
    return load_config(TINY, [f"data.vocab_size={TEST_VOCAB}", *SMALL, f"model.tie_embeddings={tied}"])


def model_config(kind: str = "ours"):
    return config(kind).model_config()


class _Wrapper(torch.nn.Module):
    """Prefixes its module's parameter names with `module.`, as DDP does."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def tokens() -> torch.Tensor:
    return torch.randint(0, TEST_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


def _wrapped_model(kind: str) -> torch.nn.Module:
    if kind == "ours":
        return build_model(get_model_spec("llm"), config())
    if kind == "ours-tied":
        return _Wrapper(build_model(get_model_spec("llm"), config(kind)))
    import transformers

    torch.manual_seed(0)  # the same initial weights on both ranks
    hf_config = get_model_spec("llm").state_dict_adapters["hf"].export_config(model_config(), 64)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))


def _logits(model: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits if kind == "hf" else model(x)


def _train_and_save(rank: int, port: int, out: Path) -> None:
    """One of WORLD DeepSpeed processes: for each case, 2 AdamW steps under ZeRO, save_checkpoint into out/<case>,
    and (rank 0) the engine module's full weights and logits on tokens() into out/<case>.safetensors."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    # Its shared-memory allreduce is a C++ op compiled on first use (measured ~3 min here); gloo does without it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    generator = torch.Generator().manual_seed(rank)  # each rank its own batches: the ranks' gradients differ
    for name, stage, kind in CASES:
        model = _wrapped_model(kind)
        # A torch optimizer: DeepSpeed's own CPU Adam is another compiled op.
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
            config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                    "steps_per_print": 10**6})
        for _ in range(2):
            batch = torch.randint(0, TEST_VOCAB, (2, 17), generator=generator)
            logits = _logits(engine, kind, batch[:, :-1])
            engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
            engine.step()
        engine.save_checkpoint(str(out / name))
        engine.eval()
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            logits = _logits(engine, kind, tokens())  # collective under ZeRO-3: every rank runs it
            weights = {f"weight.{n}": p.detach().clone() for n, p in engine.module.named_parameters()}
        if rank == 0:
            save_file({"logits": logits.contiguous(), **weights}, out / f"{name}.safetensors")
    torch.distributed.destroy_process_group()  # else the process lingers on exit (~20 s measured)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The DeepSpeed save directories (one per case) and each engine's weights and logits."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_and_save, args=(port, out), nprocs=WORLD)
    return out


def imported(path: Path, kind: str = "ours") -> torch.nn.Module:
    """The run's model started from `path` as train starts it: built, initialized, then loaded."""
    spec = get_model_spec("llm")
    model = build_model(spec, config(kind))
    open_starting_weights(path, spec, model_config(kind)).load([model])
    return model.eval()


@pytest.mark.parametrize("name,stage,kind", CASES)
def test_imported_weights_are_the_engines_and_compute_its_logits(saved, name, stage, kind):
    engine = load_file(saved / f"{name}.safetensors")
    model = imported(saved / name, kind)
    ours = {n: p.detach() for n, p in model.named_parameters()}  # tied: output.weight is tok_embeddings.weight
    if kind != "hf":
        theirs = {n.removeprefix("weight.").removeprefix("module."): t for n, t in engine.items() if n != "logits"}
    else:  # the same tensors in our layout (the RoPE rows permuted)
        theirs = get_model_spec("llm").state_dict_adapters["hf"].to_native(
            {n.removeprefix("weight."): t for n, t in engine.items() if n != "logits"}, model_config())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    with torch.no_grad():
        logits = model(tokens())
    # Our attention and RoPE are not transformers' kernels: equal to fp32 rounding, not bit for bit.
    torch.testing.assert_close(logits, engine["logits"], rtol=0, atol=1e-5 if kind == "hf" else 0)

    # Negative controls: one perturbed parameter fails the comparison; the initialized model's logits differ.
    perturbed = dict(theirs, **{"norm.weight": theirs["norm.weight"] + 1e-6})
    assert not all(torch.equal(ours[n], perturbed[n]) for n in ours)
    with torch.no_grad():
        fresh = build_model(get_model_spec("llm"), config(kind))
        assert not torch.allclose(fresh.eval()(tokens()), engine["logits"], atol=1e-3)


def test_a_run_starts_from_a_step_directory(saved, data_cache, tmp_path, capsys):
    """train() through preflight; PATH a global_step<N>/ itself. Its first loss is the imported model's."""
    step_dir = saved / "zero2" / (saved / "zero2" / "latest").read_text().strip()
    cfg = load_config(TINY, tiny_overrides(tmp_path / "run", data_cache, *SMALL, f"checkpoint.init_from={step_dir}",
                                           "train.steps=1"))
    first = train(cfg)["losses"]
    assert "initialized from the DeepSpeed ZeRO weights" in capsys.readouterr().out
    assert first == [pytest.approx(first_batch_loss(cfg, imported(step_dir)), rel=1e-6, abs=0)]


@pytest.mark.parametrize("file", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_pickle_that_runs_code_is_refused_unread(saved, data_cache, tmp_path, capsys, file):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_CreatesMarker(control))).close()
    assert control.exists()  # the pickle works: unpickling it would leave a marker

    marker = tmp_path / "marker"
    checkpoint = shutil.copytree(saved / "zero2", tmp_path / "zero2")
    step_dir = checkpoint / (checkpoint / "latest").read_text().strip()
    torch.save({"module": _CreatesMarker(marker)}, step_dir / file)  # a torch.save zip, as DeepSpeed writes
    err = train_error(capsys, tmp_path / "run", data_cache, checkpoint)
    assert "io.open" in err and "not unpickled" in err  # open pickles as io.open
    assert not marker.exists()


def test_an_fp16_loss_scaler_is_read_weights_only(tmp_path):
    """fp16 ZeRO checkpoints pickle a DynamicLossScaler, allow-listed; DeepSpeed's fp16 does not run on this CPU
    ("Type fp16 is not supported on your device"), so it is saved here as ZeRO's state_dict saves it."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler}, tmp_path / "optim_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="DynamicLossScaler"):  # admitted by the allow-list only
        torch.load(tmp_path / "optim_states.pt", weights_only=True)
    with weights_only_torch_load():
        loaded = torch.load(tmp_path / "optim_states.pt", weights_only=False)["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)


def test_a_checkpoint_missing_a_ranks_partition_is_one_line(saved, data_cache, tmp_path, capsys):
    checkpoint = shutil.copytree(saved / "zero3", tmp_path / "zero3")
    step_dir = checkpoint / (checkpoint / "latest").read_text().strip()
    (step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    err = train_error(capsys, tmp_path / "run", data_cache, checkpoint)
    assert "DeepSpeed could not consolidate" in err and "Expected 2 of '*_optim_states.pt'" in err


def test_another_models_checkpoint_is_refused(saved, data_cache, tmp_path, capsys):
    err = train_error(capsys, tmp_path / "run", data_cache, saved / "zero1", "model.dim=128")
    assert "tok_embeddings.weight has shape [1024, 64]" in err


def test_latest_naming_no_directory_is_one_line(data_cache, tmp_path, capsys):
    checkpoint = tmp_path / "ds"
    (checkpoint / "global_step1").mkdir(parents=True)
    (checkpoint / "global_step1" / "mp_rank_00_model_states.pt").touch()
    (checkpoint / "latest").write_text("global_step2")
    assert "'global_step2', which is not a directory" in train_error(capsys, tmp_path / "run", data_cache,
                                                                      checkpoint)


def test_without_deepspeed_installed_the_refusal_says_what_to_install(data_cache, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "ds"
    (checkpoint / "global_step1").mkdir(parents=True)
    (checkpoint / "global_step1" / "mp_rank_00_model_states.pt").touch()
    (checkpoint / "latest").write_text("global_step1")
    for module in ("deepspeed", "deepspeed.utils"):  # importing them raises ImportError, imported before or not
        monkeypatch.setitem(sys.modules, module, None)
    assert "pip install 'shardwright[deepspeed]'" in train_error(capsys, tmp_path / "run", data_cache, checkpoint)
