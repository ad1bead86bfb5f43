"""Layout-independent parameter initialization.

Each parameter's full tensor is drawn from a generator seeded by (seed, parameter name), then
this rank keeps its shard. So a model initializes to the same numbers under any layout — one
process, FSDP, TP, PP — which is what run-level parity tests rely on. (DTensor's own random ops
only agree across layouts on CUDA.) Cost: one full parameter at a time per rank.

The module that owns a parameter decides how it starts: it defines
`init_parameter(name, full, generator)`, filling the full tensor of its parameter `name`. A
parameter whose module has no such method is an error, never a silent default.

Stored orders: a parallel style may store a weight's rows (or columns) permuted so that a plain
contiguous Shard gives each rank the units it should own (e.g. nested FFN units dealt round-robin
over the tp ranks). It records that on the module owning the parameter
(`record_order`): a module attribute survives FSDP2, activation checkpointing and compile wrappers,
where a parameter's would not (FSDP2 replaces the parameters). Everything outside the model sees the
canonical order, the one-device model's: initialization here, the weights a run starts from
(launcher/weights.py) and checkpoints (launcher/checkpoint.py) go through `to_stored` / `to_canonical`,
so any layout loads what any other saved.
"""
import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers that insert themselves into parameter names; the init must not depend on them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")
_STORED_ORDERS = "stored_orders"  # module attribute: parameter name -> Order

Order = tuple[int, torch.Tensor]  # (dim, index): stored position i along dim holds canonical index index[i]


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def record_order(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Say that `module`'s parameter `name` is stored permuted along `dim`: position i holds canonical index[i]."""
    module.__dict__.setdefault(_STORED_ORDERS, {})[name] = (dim, index)


def stored_orders(parts: list[nn.Module]) -> dict[str, Order]:
    """Canonical parameter name -> its stored order, for every permuted parameter of `parts`."""
    return {canonical_name(f"{module_name}.{name}" if module_name else name): order
            for part in parts for module_name, module in part.named_modules()
            for name, order in getattr(module, _STORED_ORDERS, {}).items()}


def to_stored(full: torch.Tensor, order: Order | None) -> torch.Tensor:
    """A canonical full tensor in stored order (itself for None: a parameter not permuted)."""
    return full if order is None else full.index_select(order[0], order[1].to(full.device))


def to_canonical(full: torch.Tensor, order: Order | None) -> torch.Tensor:
    """A stored full tensor back in canonical order."""
    return full if order is None else full.index_select(order[0], torch.argsort(order[1]).to(full.device))


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> None:
    """Allocate a model (part) built on the meta device on `device` and initialize it: how every run's
    weights start, and how a checkpoint conversion builds the same parameters. Tied parameters stay
    tied: nn.Module.to_empty alone gives every module that shares a parameter a copy of its own (a
    tied embedding and head would silently train as two)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in owners.values():
        for module, name in others:
            setattr(module, name, getattr(first, first_name))
    init_parameters(model, seed)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Fill every parameter of `model` through its owning module's `init_parameter`."""
    seen: set[int] = set()  # a tied parameter is initialized once, by the first module that owns it
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = canonical_name(f"{module_name}.{local_name}" if module_name else local_name)
            init = getattr(module, "init_parameter", None)
            if init is None:
                raise TypeError(f"parameter {name} belongs to a {type(module).__name__}, which has no "
                                f"init_parameter(name, full, generator): give it one (see parallel/init.py)")
            generator = torch.Generator(device=param.device).manual_seed(_seed_for(seed, name))
            full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            init(local_name, full, generator)
            copy_full(param, to_stored(full, getattr(module, _STORED_ORDERS, {}).get(local_name)))


@torch.no_grad()
def copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set `param` to the full tensor `full`, which every rank holds: a DTensor keeps its own shard
    (src_data_rank=None: no communication)."""
    if isinstance(param, DTensor):
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
