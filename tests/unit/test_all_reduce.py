"""launcher.distributed.all_reduce: the trainer's per-step reductions skip groups of one rank (no gloo round, no
NCCL launch) and reduce over any larger group; the multi-rank parity tests (tests/distributed) check the sums."""
import pytest
import torch
import torch.distributed as dist

from launcher import distributed


@pytest.fixture
def one_rank_world(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def collectives(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: calls.append((op, group)))
    return calls


def test_a_group_of_one_rank_makes_no_collective(one_rank_world, collectives):
    tensor = torch.tensor([1.0, 2.0])
    distributed.all_reduce(tensor, op=dist.ReduceOp.MAX)
    assert collectives == []
    assert tensor.tolist() == [1.0, 2.0]


def test_a_larger_group_is_reduced_with_the_op_asked_for(one_rank_world, collectives, monkeypatch):
    """The negative control: the same call over a group the size of two ranks reaches dist.all_reduce."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    distributed.all_reduce(torch.ones(1), op=dist.ReduceOp.MAX)
    assert collectives == [(dist.ReduceOp.MAX, None)]
