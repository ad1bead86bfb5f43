"""launcher.distributed.all_reduce and all_reduce_number: the trainer's per-step reductions skip groups of one rank
(no gloo round, no NCCL launch) and reduce over any larger group; the multi-rank parity tests (tests/distributed)
check the sums."""
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


def test_a_number_over_one_rank_is_itself_without_a_collective(one_rank_world, collectives):
    assert distributed.all_reduce_number(3, op=dist.ReduceOp.MAX) == 3
    assert distributed.all_reduce_number(1.5) == 1.5
    assert collectives == []


def test_a_number_over_a_larger_group_is_reduced_as_a_tensor_of_its_type(one_rank_world, monkeypatch):
    """The negative control: over two ranks the number goes through dist.all_reduce, as a tensor of its own type
    (an int stays an int: a signal number), and the reduced value comes back."""
    seen = []

    def doubled(tensor, op=None, group=None):
        seen.append((tensor.dtype, op))
        tensor.mul_(2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", doubled)
    assert distributed.all_reduce_number(15, op=dist.ReduceOp.MAX) == 30
    assert distributed.all_reduce_number(0.5) == 1.0
    assert seen == [(torch.int64, dist.ReduceOp.MAX), (torch.float32, dist.ReduceOp.SUM)]
