"""How the trainer's log names a set of ranks (e.g. those a resumed checkpoint holds no RNG streams for)."""
from launcher.trainer import describe_ranks


def test_describe_ranks():
    assert [describe_ranks(ranks, 4) for ranks in ([0, 1, 2, 3], [3], [2, 3], [0, 3])] == [
        "every rank", "rank 3", "ranks 2-3", "ranks 0, 3"]
