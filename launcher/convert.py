"""`shardwright convert`: a new run from a checkpoint.

Every registered family's `checkpoint_commands` (models/spec.py: CheckpointCommand) is a sub-command
`convert <name> SOURCE OUT`; what surrounds the family's conversion is the same for all of them:

    SOURCE (a run directory: its checkpoints/latest; or one of its checkpoints/step-<N>) + the run's config.yaml
    -> one process (a gloo world of 1, for DCP and the Checkpointer), the whole model in its memory
    -> the source run's training state (model, optimizer, schedule, loader: the trainer's Statefuls) loaded
    -> the family's changes to the model config (or a whole config of another family, CheckpointCommand's
       target_family: a family's submodel as a run of another family); the new run built and initialized as
       train would build it; the family's `convert` fills it from the source
    -> self-check: both models' outputs on the first validation micro-batch (the old model given the command's
       source_inputs, e.g. which of its submodels the new model is)
    -> OUT/checkpoints/step-<N> (the same step, meta.json of the new model) + OUT/config.yaml, written in a
       staging directory that is renamed to OUT when complete

`shardwright train OUT/config.yaml` then resumes at step N on any layout (DCP reshards). RNG state is
not carried over: the resumed ranks keep their seed RNG.

`convert to-hf SOURCE OUT` is the same for every family whose spec has an "hf" StateDictAdapter: the
source's model tensors read from DCP a layer at a time (any layout), mapped by the adapter, written as a
Hugging Face directory a shard at a time (launcher/hf_files.py) in a staging directory renamed to OUT when
complete.

`convert to-megatron SOURCE OUT` likewise, through the family's "megatron" StateDictAdapter: a Megatron-Core dist
checkpoint written by megatron.core.dist_checkpointing.save (global tensors, the layers stacked on a leading axis as
GPTModel.sharded_state_dict keys them), which Megatron loads at any tp/pp, plus gpt_config.json: the GPTModel
arguments of the same model.
"""
import argparse
import copy
import glob
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from launcher.checkpoint import (Checkpointer, check_complete, check_same_model, check_same_tokenizer,
                                 checkpoint_meta, files_in, find_checkpoint, fsync_path, training_state)
from launcher.config import Config, load_config
from launcher.deepspeed_engine import SUBDIR
from launcher.distributed import World, init_distributed
from launcher.errors import UserError
from launcher.hf_files import MAX_SHARD_SIZE, check_max_shard_size, write_hf_files
from launcher.init_from import CONSOLIDATED_KEY
from launcher.megatron_import import GPT_CONFIG, stacked_name
from launcher.optim import Optimizers
from launcher.precision import DTYPES
from launcher.trainer import model_inputs
from launcher.weights import checkpoint_reader
from models import FAMILIES, configured_spec, get_model_spec
from models.spec import CheckpointCommand, CheckpointContents, ModelSpec, architecture
from parallel.init import materialize

from parallel.mesh import ParallelDims

# A conversion that keeps the function must reproduce the old outputs to fp32 rounding; more is a bug.
PRESERVED_RTOL = 1e-5
TO_HF = "to-hf"  # the sub-command every family with an "hf" state-dict adapter has
TO_MEGATRON = "to-megatron"  # ... and with a "megatron" one
TO_FILE = "to-file"


def checkpoint_commands() -> dict[str, tuple[str, CheckpointCommand]]:
    """Every registered family's checkpoint commands by name, each with the family that owns it."""
    commands: dict[str, tuple[str, CheckpointCommand]] = {}
    for family in FAMILIES:
        for name, command in get_model_spec(family).checkpoint_commands.items():
            if name in commands or name in EXPORTS:
                raise ValueError(f"model family {family} registers `convert {name}`, which "
                                 f"{commands[name][0] if name in commands else 'the launcher'} has already")
            commands[name] = (family, command)
    return commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    conversions = parser.add_subparsers(dest="conversion", required=True)
    for name, (help_text, add_export_arguments, _) in EXPORTS.items():
        add_export_arguments(conversions.add_parser(name, help=help_text))
    for name, (family, command) in checkpoint_commands().items():
        _add_command_arguments(conversions.add_parser(name, help=f"{command.help} ({family} checkpoints)"), command)


def _add_source_and_out(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The two positional arguments of every `convert` sub-command."""
    parser.add_argument("source", help="a run directory (its checkpoints/latest) or one of its checkpoints/step-<N>")
    parser.add_argument("out", help=out_help)


def _add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the weights' dtype (default fp32)")


def _add_command_arguments(parser: argparse.ArgumentParser, command: CheckpointCommand) -> None:
    parser.description = (f"{command.help}. Runs in one process and holds the whole model (twice) in its memory; "
                          f"writes a new run directory that `shardwright train OUT/config.yaml` resumes on any layout.")
    _add_source_and_out(parser, "the new run directory to write (must not exist)")
    command.add_arguments(parser)


TO_HF_HELP = "a Hugging Face model directory (safetensors, config.json, tokenizer) from a checkpoint's weights"


def _add_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (f"{TO_HF_HELP}, for model families with a Hugging Face mapping. Runs in one process, reads "
                          f"checkpoints of any layout and holds one shard of the output in memory at a time.")
    _add_source_and_out(parser, "the directory to write (must not exist)")
    _add_dtype(parser)
    parser.add_argument("--max-shard-size", default=MAX_SHARD_SIZE,
                        help=f"the largest safetensors file, also what the export holds in memory at once (default "
                             f"{MAX_SHARD_SIZE}; e.g. 500MB, 5GB)")


def convert_command(args: argparse.Namespace) -> int:
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.conversion in EXPORTS:
        EXPORTS[args.conversion][2](args, log)
    else:
        convert_run(args.conversion, args, log)
    return 0


def convert(name: str, source: Path | str, out: Path | str, *options: str,
            log: Callable[[str], None] = print) -> Path:
    """`shardwright convert NAME SOURCE OUT OPTIONS...` in this process (e.g. from a test); returns OUT.
    Bad input raises UserError."""
    parser = argparse.ArgumentParser(prog=f"convert {name}")
    if name in EXPORTS:
        _, add_export_arguments, export = EXPORTS[name]
        add_export_arguments(parser)
        return export(parser.parse_args([str(source), str(out), *options]), log)
    _add_command_arguments(parser, checkpoint_commands()[name][1])
    return convert_run(name, parser.parse_args([str(source), str(out), *options]), log)


def export_hf(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """`convert to-hf`: OUT, a Hugging Face model directory of SOURCE's weights."""
    check_max_shard_size(args.max_shard_size)
    out, checkpoint, run_dir, saved, spec, cfg, hf_config = open_export(args, log, "hf", TO_HF,
                                                                        "Hugging Face's format")
    adapter, model_cfg = spec.state_dict_adapters["hf"], cfg.model_config()
    log(f"convert {TO_HF}: {checkpoint} (step {saved['meta']['step']}) -> {out} ({hf_config['architectures'][0]}, "
        f"{args.dtype})")

    data, _, _ = source_loaders(spec, cfg, saved, checkpoint, log)
    layout, read = checkpoint_reader(checkpoint, saved, lambda native: adapter.from_native(native, model_cfg),
                                     DTYPES[args.dtype])
    with staged(out) as staging:
        write_hf_files(staging, layout, read, hf_config, data.tokenizer.model_path, DTYPES[args.dtype],
                       args.max_shard_size)
    log(f"wrote {out}: {len(layout)} tensors, {sum(t.numel() for t in layout.values()):,} parameters; load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return out


def open_export(args: argparse.Namespace, log: Callable[[str], None], adapter_key: str, command: str, target: str):
    """(OUT, SOURCE's checkpoint, its run directory, check_complete of it, its family's spec, its run's config, the
    target format's model config) for an export through the family's `adapter_key` state-dict adapter."""
    out, checkpoint, run_dir, saved = open_source(args, log)
    family = saved["meta"].get("family")
    spec = get_model_spec(family)
    if adapter_key not in spec.state_dict_adapters:
        able = [f for f in FAMILIES if _exports(get_model_spec(f), adapter_key)]
        raise UserError(f"{checkpoint} holds a {family} model, which has no mapping to {target}; `convert {command}` "
                        f"converts {', '.join(able)} checkpoints")
    cfg = source_config(run_dir, saved, checkpoint)
    try:
        exported_config = spec.state_dict_adapters[adapter_key].export_config(cfg.model_config(), cfg.train.seq_len)
    except ValueError as e:
        raise UserError(f"convert {command}: {checkpoint} cannot be expressed as {target}: {e}") from None
    return out, checkpoint, run_dir, saved, spec, cfg, exported_config


def _exports(spec: ModelSpec, adapter_key: str) -> bool:
    """Whether the family writes the format: it has an adapter for it that is not import-only."""
    adapter = spec.state_dict_adapters.get(adapter_key)
    return adapter is not None and getattr(adapter, "exports", True)


TO_FILE_HELP = "one safetensors file of a checkpoint's weights (canonical names), which checkpoint.init_from reads"


def _add_to_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (f"{TO_FILE_HELP}. The file's metadata records the family, architecture, tokenizer and step, "
                          f"checked when a run starts from it. Runs in one process and holds the model once in memory; "
                          f"reads checkpoints of any layout.")
    _add_source_and_out(parser, "the .safetensors file to write (must not exist)")
    _add_dtype(parser)


def export_file(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """`convert to-file`: OUT, one safetensors file of SOURCE's model tensors under their canonical names."""
    out, checkpoint, run_dir, saved = open_source(args, log)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: `convert {TO_FILE}` writes a .safetensors file; name it <something>.safetensors")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a directory: create it, or write the file elsewhere")
    cfg = source_config(run_dir, saved, checkpoint)
    log(f"convert {TO_FILE}: {checkpoint} (step {saved['meta']['step']}) -> {out} ({args.dtype})")
    layout, read = checkpoint_reader(checkpoint, saved, lambda native: native, DTYPES[args.dtype])
    tensors = read(list(layout))
    record = {key: saved["meta"][key] for key in ("family", "model", "tokenizer", "step")}
    with staged(out, directory=False) as staging:
        save_file(tensors, staging, metadata={"format": "pt", CONSOLIDATED_KEY: json.dumps(record)})
    log(f"wrote {out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values; start a run from "
        f"it with checkpoint.init_from={out}")
    return out


TO_MEGATRON_HELP = "a Megatron-Core dist checkpoint (torch_dist, loadable by GPTModel at any tp/pp) of a checkpoint's weights"


def _add_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (f"{TO_MEGATRON_HELP}, for model families with a Megatron-Core mapping. Runs in one process and "
                          f"holds the model once in its memory; reads checkpoints of any layout.")
    _add_source_and_out(parser, "the directory to write (must not exist)")
    _add_dtype(parser)


def export_megatron(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """`convert to-megatron`: OUT, a Megatron-Core dist checkpoint of SOURCE's weights and its gpt_config.json."""
    out, checkpoint, run_dir, saved, spec, cfg, gpt_config = open_export(args, log, "megatron", TO_MEGATRON,
                                                                         "Megatron-Core's GPTModel")
    adapter, model_cfg = spec.state_dict_adapters["megatron"], cfg.model_config()
    log(f"convert {TO_MEGATRON}: {checkpoint} (step {saved['meta']['step']}) -> {out} ({args.dtype})")

    source_loaders(spec, cfg, saved, checkpoint, log)  # checks the checkpoint's tokenizer is the config's
    layout, read = checkpoint_reader(checkpoint, saved, lambda native: adapter.from_native(native, model_cfg),
                                     DTYPES[args.dtype])
    tensors = read(list(layout))  # dist_checkpointing.save takes the whole state dict
    with one_process_world(cfg.run.timeout_s):
        with staged(out) as staging:
            save_megatron(staging, tensors, model_cfg.n_layers)
            (staging / GPT_CONFIG).write_text(json.dumps(gpt_config, indent=2) + "\n")
    log(f"wrote {out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} parameters; load it with "
        f"megatron.core.dist_checkpointing.load(gpt_model.sharded_state_dict(), '{out}') (GPTModel arguments: "
        f"{GPT_CONFIG})")
    return out


# The linear layers whose (empty) _extra_state GPTModel's sharded_state_dict lists: a strict load wants them.
_EXTRA_STATES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def save_megatron(directory: Path, tensors: dict[str, torch.Tensor], n_layers: int) -> None:
    """Megatron's per-layer tensors saved by Megatron's own dist_checkpointing as GPTModel keys them: a layer's
    tensor is its row of the stacked key (from_rank_offsets on a prepended layer axis), the rest whole. Collective
    over the (one-process) default group."""
    # Imported here: megatron-core takes seconds to import and only this command saves with it.
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    sharded = {}
    for name, tensor in tensors.items():
        key, layer = stacked_name(name)
        sharded[name] = ShardedTensor.from_rank_offsets(key, tensor, (0, layer, n_layers), prepend_axis_num=1) \
            if layer is not None else ShardedTensor.from_rank_offsets(key, tensor)
    for i in range(n_layers):
        for module in _EXTRA_STATES:
            key = f"decoder.layers.{module}._extra_state"
            sharded[f"decoder.layers.{i}.{module}._extra_state"] = ShardedObject(key, None, (n_layers,), (i,), 0)
    # megatron-core 0.16's saving assumes a GPU even when every tensor is on the CPU: it waits for one after staging
    # the tensors (torch.cuda.synchronize in FileSystemWriterAsync.preload_tensors) and broadcasts its success flag
    # from torch.cuda.current_device(). Without CUDA there is nothing to wait for, and the CPU serves the flag.
    no_cuda = mock.patch.multiple(torch.cuda, synchronize=lambda *_: None, current_device=lambda: "cpu") \
        if not torch.cuda.is_available() else nullcontext()
    with no_cuda:
        dist_checkpointing.save(sharded, str(directory))


# `convert` sub-commands the launcher owns: name -> (help, add_arguments(parser), run(args, log) -> OUT).
EXPORTS = {TO_HF: (TO_HF_HELP, _add_to_hf_arguments, export_hf),
           TO_MEGATRON: (TO_MEGATRON_HELP, _add_to_megatron_arguments, export_megatron),
           TO_FILE: (TO_FILE_HELP, _add_to_file_arguments, export_file)}


def convert_run(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    family, command = checkpoint_commands()[name]
    out, checkpoint, run_dir, saved = open_source(args, log)
    if saved["meta"].get("family") != family:
        raise UserError(f"{checkpoint} holds a {saved['meta'].get('family')} model; `convert {name}` converts "
                        f"{family} checkpoints")
    cfg = source_config(run_dir, saved, checkpoint)
    try:
        changes = command.model_changes(args, cfg.model_config())
    except ValueError as e:
        raise UserError(f"convert {name}: {e}") from None
    new_cfg = copy.deepcopy(cfg)
    if command.target_family is None:
        new_cfg.model.args = {**cfg.model.args, **changes}
    else:  # another family's config: the changes are all of it
        new_cfg.model.family, new_cfg.model.args = command.target_family, changes
    new_cfg.run.dir = str(out)
    new_cfg.run.stop_at_step = 0  # it ended an invocation of the source run
    step = saved["meta"]["step"]
    log(f"convert {name}: {checkpoint} (step {step}) -> {out}")

    # The loaders are the new run's: they read the source's data position, as its resume will.
    spec = configured_spec(new_cfg.model.family, new_cfg.model_config())
    with one_process_world(cfg.run.timeout_s):
        data, train_loader, valid_loader = source_loaders(spec, cfg, saved, checkpoint, log)
        source_model, source_optimizers = build_run(get_model_spec(family), cfg)
        source_state = training_state([source_model], source_optimizers, train_loader)
        Checkpointer(run_dir, cfg.checkpoint.keep_last, rank=0).load(checkpoint, source_state)
        target_model, target_optimizers = build_run(spec, new_cfg)
        # The loader is shared, the schedule carried over (same train section); model and optimizer are the family's.
        target_state = training_state([target_model], target_optimizers, train_loader)
        target_state["scheduler"].load_state_dict(source_state["scheduler"].state_dict())
        target = CheckpointContents(new_cfg.model_config(), target_state["model"].state_dict(),
                                    target_state["optimizer"].state_dict())
        command.convert(args, CheckpointContents(cfg.model_config(), source_state["model"].state_dict(),
                                                 source_state["optimizer"].state_dict()), target, log)
        target_state["model"].load_state_dict(target.model)
        target_state["optimizer"].load_state_dict(target.optimizer)
        log(f"parameters: {parameter_count(source_model):,} -> {parameter_count(target_model):,}")

        batch = valid_loader.micro_batches(0)[0]
        rows = next(iter(batch.values())).shape[0]  # every batch entry has the rows on dim 0
        source_inputs = command.source_inputs(args, cfg.model_config(), rows) if command.source_inputs else {}
        difference = output_difference(spec, source_model, target_model, batch, source_inputs)
        preserving = command.preserves_function(args)
        log(f"self-check on the first validation micro-batch: the outputs differ by {difference:.2e} relative to "
            f"the largest old output" + (" (the function is kept)" if preserving else
                                         " (this conversion changes the function)"))
        if preserving and difference > PRESERVED_RTOL:
            raise RuntimeError(f"convert {name} should keep the model's outputs but changed them by {difference:.2e} "
                               f"(> {PRESERVED_RTOL}): a bug; nothing was written")
        one_process = ParallelDims.resolve(dp_shard=1, world_size=1)
        publish(out, new_cfg, step, target_state, checkpoint_meta(new_cfg, data.tokenizer.fingerprint, one_process))
    more = f" --set train.steps=<more than {step}>" if step >= new_cfg.train.steps else ""
    log(f"wrote {out}/checkpoints/step-{step} and {out}/config.yaml; continue training with:\n"
        f"  shardwright train {out}/config.yaml{more}")
    return out


def open_source(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[Path, Path, Path, dict]:
    """(OUT, SOURCE's checkpoint, its run directory, check_complete of the checkpoint); OUT must not exist."""
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists; convert writes a new directory and never overwrites one: "
                        f"pass a path that does not exist")
    checkpoint, run_dir = find_checkpoint(Path(args.source))
    saved = check_complete(checkpoint)
    if saved["meta"].get("engine", "torch") != "torch":  # its model and optimizer are in DeepSpeed's files, not DCP
        raise UserError(f"{checkpoint} was saved by engine {saved['meta']['engine']}; convert reads the torch engine's "
                        f"checkpoints: start a run from its weights with checkpoint.init_from={checkpoint / SUBDIR} "
                        f"(any layout) and convert that run's checkpoint")
    if not saved["verified"]:
        log(f"{checkpoint} has no checksums (saved by an older version): read unverified")
    return out, checkpoint, run_dir, saved


def source_config(run_dir: Path, saved: dict, checkpoint: Path) -> Config:
    """The source run's config (its config.yaml), checked to describe the model its checkpoint holds."""
    cfg = load_config(run_dir / "config.yaml")
    check_same_model(saved["meta"], cfg.model.family, architecture(cfg.model_config()), checkpoint)
    return cfg


def source_loaders(spec: ModelSpec, cfg: Config, saved: dict, checkpoint: Path, log: Callable[[str], None]) -> tuple:
    """(data, train loader, valid loader) of the source run on one process, its tokenizer checked to be the
    checkpoint's."""
    t = cfg.train
    loaders = spec.data.build_loaders(cfg.data, t.seq_len, t.global_batch_size, t.micro_batch_size, 0, 1, t.seed,
                                      log=log)
    check_same_tokenizer(saved["meta"], {"tokenizer": loaders[0].tokenizer.fingerprint}, checkpoint)
    return loaders


@contextmanager
def one_process_world(timeout_s: int):
    """A gloo world of this process alone, for DCP and the Checkpointer (an existing world is used if it
    has one process)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            raise UserError(f"convert runs in one process, but this is rank {dist.get_rank()} of a world of "
                            f"{dist.get_world_size()}; run it without torchrun/srun")
        yield
        return
    init_distributed(World(rank=0, world_size=1, local_rank=0, launcher="single"), timeout_s)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_model(spec: ModelSpec, cfg: Config) -> nn.Module:
    """A run's model, whole in this process, built and initialized as train builds it."""
    with torch.device("meta"):
        model = spec.model_cls(cfg.model_config())
    materialize(model, torch.device("cpu"), cfg.train.seed)
    return model


def build_run(spec: ModelSpec, cfg: Config) -> tuple[nn.Module, Optimizers]:
    """A run's model (build_model) and its optimizer."""
    model = build_model(spec, cfg)
    return model, Optimizers([model], cfg.train)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def output_difference(spec: ModelSpec, old: nn.Module, new: nn.Module, batch: dict,
                      old_inputs: dict[str, torch.Tensor]) -> float:
    """The largest difference of the two models' outputs on `batch` (the old model also given `old_inputs`),
    relative to the largest old output."""
    args, kwargs = model_inputs(spec.data.keys, batch)
    old_outputs, new_outputs = old.eval()(*args, **kwargs, **old_inputs), new.eval()(*args, **kwargs)
    return ((new_outputs - old_outputs).abs().max() / old_outputs.abs().max()).item()


def publish(out: Path, cfg: Config, step: int, state: dict, meta: dict) -> None:
    """OUT with its checkpoint and config.yaml, renamed into place once complete."""
    with staged(out) as staging:
        Checkpointer(staging, cfg.checkpoint.keep_last, rank=0).save(step, state, meta)
        cfg.dump(staging / "config.yaml")


STAGING = ".{name}.converting-{pid}"


@contextmanager
def staged(out: Path, directory: bool = True):
    """A staging directory (or file path) of this process next to OUT to write into, published as OUT once the block
    completes: every file synced to disk and given the umask's mode (safetensors writes 0600), then renamed to OUT
    only if nothing else made OUT meanwhile. So OUT exists whole or not at all, and two conversions to the same OUT
    never mix their files. An error leaves only the staging entry, which a later conversion to OUT clears once its
    process is gone."""
    for leftover in out.parent.glob(STAGING.format(name=glob.escape(out.name), pid="*")):
        pid = leftover.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):  # a crashed conversion's; never read
            _remove(leftover)
    staging = out.with_name(STAGING.format(name=out.name, pid=os.getpid()))
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging.mkdir()
    yield staging
    files = [staging / name for name in files_in(staging)] if directory else [staging]
    mode = 0o666 & ~_umask()
    for path in files:
        path.chmod(mode)
        fsync_path(path)
    try:
        if directory:
            fsync_path(staging)
            os.mkdir(out)  # claims OUT: fails if another process made it meanwhile
            os.rename(staging, out)  # onto the empty directory just made
        else:
            os.link(staging, out)  # fails if OUT exists, where a rename would replace it
            staging.unlink()
    except FileExistsError:
        _remove(staging)
        raise UserError(f"{out} was created by another process while this conversion ran, and was left as it is; "
                        f"convert again to a path that does not exist") from None
    fsync_path(out.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
