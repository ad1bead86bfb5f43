"""Starting a run from a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3): one of the formats of
`checkpoint.init_from` (launcher/init_from.py). PATH is the directory DeepSpeed saved into (a `latest` file naming
its global_step<N>/) or one global_step<N>/ itself.

    preflight (no process group): DeepSpeed's own consolidation (deepspeed.utils.zero_to_fp32, lazy mode) reads
    the parameter names and shapes and the fp32 master weights' partitions of every data-parallel rank; the names
    are the module the engine wrapped: this project's model (canonical names) or a Hugging Face model (mapped by
    the family's "hf" StateDictAdapter); names and shapes are checked against the run's model on the meta device
    train, after every part is materialized and initialized: each rank copies the parameters it holds, one full
    fp32 tensor at a time, keeping its shard of a DTensor

DeepSpeed's files are torch.save pickles, and zero_to_fp32 unpickles them with weights_only=False. Here every
torch.load it makes is forced to torch's weights-only unpickler, which builds tensors and plain containers and,
of classes, only those of weights_only_globals(): a pickle that would call anything else is refused
before it runs. Memory: ZeRO-1/2 consolidation concatenates the fp32 partitions into a full fp32 copy of the
model in each process (held from preflight until the copy); ZeRO-3's lazy tensors are assembled one at a time
from the memory-mapped partition files.
"""
import contextlib
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from launcher.errors import UserError
from launcher.weights import (LayerwiseMapping, StartingWeights, WeightFormat, check_tensors, copy_streamed,
                             expected_shapes)
from models.spec import ModelSpec
from parallel.init import canonical_name

MODEL_STATES = "*_model_states.pt"


def _tag_dir(path: Path) -> Path | None:
    """The global_step<N>/ directory of `path` (itself, or the one its `latest` names); None: no such thing."""
    if any(path.glob(MODEL_STATES)):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = path / latest.read_text().strip()
        return tag if tag.is_dir() else None
    return None


def _recognizes(path: Path) -> bool:
    return any(path.glob(MODEL_STATES)) or ((path / "latest").is_file() and any(path.glob(f"*/{MODEL_STATES}")))


def _zero_to_fp32(where: str):
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError:
        raise UserError(f"{where} is a DeepSpeed checkpoint, read with DeepSpeed's own code: "
                        f"pip install 'shardwright[deepspeed]'") from None
    return zero_to_fp32


def weights_only_globals() -> list[type]:
    """The only classes DeepSpeed's ZeRO checkpoints pickle beyond tensors and plain containers (which torch's
    weights-only unpickler builds by itself): each is rebuilt from plain numbers, and zero_to_fp32 calls no method
    of them. Found by listing the globals of stage 1-3 checkpoints of DeepSpeed 0.19 (fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # LossScaler: the optimizer state's static loss scale (fp32, bf16); DynamicLossScaler: fp16's.
    # ZeroStageEnum: the stage; fragment_address: (numel, start) of a parameter's slice of a ZeRO-1/2 partition.
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Every torch.load within: weights_only=True, whatever the caller passes, with weights_only_globals()."""
    load = torch.load

    def weights_only_load(*args, **kwargs):
        return load(*args, **{**kwargs, "weights_only": True})

    torch.load = weights_only_load
    try:
        with torch.serialization.safe_globals(weights_only_globals()):
            yield
    finally:
        torch.load = load


def consolidate(tag_dir: Path, where: str) -> dict:
    """DeepSpeed's consolidated fp32 state dict of `tag_dir` (lazy: ZeRO-3 tensors have .contiguous()), read with
    the weights-only unpickler; UserError (one line) for anything it refuses or cannot read."""
    zero_to_fp32 = _zero_to_fp32(where)
    chatter = io.StringIO()  # its prints and progress bars, once per rank: the log says what was loaded
    try:
        with weights_only_torch_load(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                                         lazy_mode=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise UserError(f"{where}: {tag_dir} pickles {refused.group(1) if refused else 'an object'}, which is not "
                        f"among the plain types a DeepSpeed checkpoint is read with; it was not unpickled "
                        f"(unpickling runs arbitrary code)") from None
    # zero_to_fp32's own checks of the files: exceptions, and asserts on the partitions' sizes
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AssertionError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: DeepSpeed could not consolidate {tag_dir}: {first_line}") from None


def _open(path: Path, spec: ModelSpec, model_cfg, where: str) -> StartingWeights:
    """The weights of the DeepSpeed checkpoint at `path` checked against the run's model."""
    tag_dir = _tag_dir(path)
    if tag_dir is None:
        raise UserError(f"{where}: its `latest` names {(path / 'latest').read_text().strip()!r}, which is not a "
                        f"directory there")
    state = consolidate(tag_dir, where)
    expected = expected_shapes(spec, model_cfg)
    adapter = _hf_adapter(state, spec, expected)
    if adapter is None:  # this project's model: canonical names (a wrapper's `module.` prefix dropped)
        tensors = {canonical_name(name): tensor for name, tensor in state.items()}
        check_tensors(where, {name: (name, tuple(t.shape)) for name, t in tensors.items()}, expected)

        def read(wanted: set[str]):
            # .contiguous(): a lazy ZeRO-3 tensor is assembled here, one parameter at a time
            yield from ((name, t.contiguous()) for name, t in tensors.items() if name in wanted)
    else:
        # zero_to_fp32 lists a tied parameter under each of its names; the adapter adds the alias itself (as
        # transformers does for tie_word_embeddings), so each tensor is mapped once.
        tensors = {}
        for name, tensor in state.items():
            if all(tensor is not kept for kept in tensors.values()):
                tensors[name] = tensor
        mapping = LayerwiseMapping({name: tuple(t.shape) for name, t in tensors.items()},
                                   lambda group: adapter.to_native(group, model_cfg), where)
        check_tensors(where, mapping.found, expected)

        def read(wanted: set[str]):
            return mapping.read(wanted, lambda names: {name: tensors[name].contiguous() for name in names})

    return StartingWeights(f"the DeepSpeed ZeRO weights in {tag_dir} ({len(tensors)} tensors)",
                           lambda parts: copy_streamed(parts, read))


DEEPSPEED_FORMAT = WeightFormat("a DeepSpeed ZeRO checkpoint (latest, global_step<N>/*_model_states.pt)",
                                _recognizes, _open)


def _hf_adapter(state: dict, spec: ModelSpec, expected: dict):
    """None when the engine wrapped this project's model (a name is canonical, after a wrapper's `module.` prefix),
    else the family's "hf" adapter: the engine wrapped a Hugging Face model."""
    adapter = spec.state_dict_adapters.get("hf")
    if adapter is None or {canonical_name(name) for name in state} & set(expected):
        return None
    return adapter
