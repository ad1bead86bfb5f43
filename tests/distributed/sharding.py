"""What the tensor-parallel module-parity checks (test_tensor_parallel, test_deltanet) share: how
the plan placed each parameter (read on the ranks, asserted in the tests), and a perturbed shard
for their negative controls."""
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard


def placements(model: nn.Module) -> dict:
    """Parameter name -> (mesh dim names, placements) of a DTensor, None for a plain tensor."""
    return {name: (param.device_mesh.mesh_dim_names, tuple(param.placements)) if isinstance(param, DTensor) else None
            for name, param in model.named_parameters()}


@torch.no_grad()
def scale_last_shard(weight: DTensor, factor: float) -> None:
    """Scale the last rank's shard of `weight` (its mesh is 1-D) by `factor`; the other shards stay."""
    mesh = weight.device_mesh
    if mesh.get_local_rank() == mesh.size() - 1:
        weight.to_local().mul_(factor)


def llm_plan(tp: int, n_kv_heads: int, sequence_parallel: bool) -> dict:
    """Module name -> the placement of its weight over the tp mesh under the LLM's plan (Megatron's
    layout), None where the weight stays a plain tensor."""
    kv = Replicate() if n_kv_heads < tp else Shard(0)  # fewer kv heads than ranks: replicated
    return {"tok_embeddings": Shard(0), "output": Shard(0),  # vocab rows
            "wq": Shard(0), "wk": kv, "wv": kv, "w1": Shard(0), "w3": Shard(0),  # output features
            "wo": Shard(1), "w2": Shard(1),  # input features
            # gains replicated over the sequence shards; on the replicated stream, not distributed
            **dict.fromkeys(("attention_norm", "ffn_norm", "norm"), Replicate() if sequence_parallel else None)}


def assert_placed(placements: dict, plan: dict) -> None:
    """Every parameter is placed over the tp mesh as `plan` says for it: the plan did shard the model (one
    that did nothing would still pass the parity checks). `plan` is keyed by a dotted suffix of the
    parameter's name (the longest that is a key, e.g. "attention.wq.key_param_tokens") or else by the
    name of its module (e.g. "wq")."""
    want = {}
    for name in placements:
        parts = name.split(".")
        key = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in plan), parts[-2])
        placement = plan[key]
        want[name] = None if placement is None else (("tp",), (placement,))
    assert placements == want


def model_parity_errors(reference: nn.Module, sharded: nn.Module, vocab_size: int, seq_len: int, rows: int = 2,
                        inputs: dict | None = None) -> dict[str, float]:
    """One forward + backward of a token-level model on one device and tensor-parallel (under loss
    parallelism) on the same random batch of `rows` rows (both models also given `inputs` as keywords): max
    error of logits, loss and every parameter's gradient, relative to the reference's largest entry (the
    sharded parameters must have the reference's shapes; a gradient stored permuted is compared in canonical
    order, parallel/init.py)."""
    from torch.distributed.tensor.parallel import loss_parallel

    from models.common.loss import cross_entropy_sum
    from parallel.init import stored_orders, to_canonical

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
    targets = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
    ref_logits = reference(tokens, **(inputs or {}))
    ref_loss = cross_entropy_sum(ref_logits, targets)
    (ref_loss / targets.numel()).backward()
    with loss_parallel():
        logits = sharded(tokens, **(inputs or {}))
        loss = cross_entropy_sum(logits, targets)
        (loss / targets.numel()).backward()

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        got = got.full_tensor() if isinstance(got, DTensor) else got
        assert got.shape == want.shape
        return ((got - want).abs().max() / want.abs().max()).item()

    errors = {"logits": rel(logits, ref_logits), "loss": rel(loss, ref_loss)}
    ref_params = dict(reference.named_parameters())
    orders = stored_orders([sharded])
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        errors[f"grad:{name}"] = rel(to_canonical(grad, orders.get(name)), ref_params[name].grad)
    return errors
