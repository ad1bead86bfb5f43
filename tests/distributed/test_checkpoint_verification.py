"""A world verifies a checkpoint together: each rank hashes its share of the shard files (the checkpoint is read
once in all, not once per rank), and a damaged file refuses the checkpoint on every rank, fallback included,
whichever rank hashed it. So does a run that starts from another run's checkpoint (checkpoint.init_from)."""
from pathlib import Path

import pytest

from tests.distributed.harness import run_world

THIS = __name__


def verify_together(root: str) -> dict:
    """Check body: two checkpoints of a state every rank writes a shard of; the files each rank hashes while the
    world verifies the latest; the refusal each rank gets once rank 1's shard is damaged; and where a resume with
    checkpoint.fallback lands."""
    import torch
    import torch.distributed as dist

    import launcher.checkpoint as checkpoint
    from launcher.errors import UserError

    from launcher.init_from import open_starting_weights
    from models import get_model_spec
    from models.llm.model import LLMConfig
    from models.spec import architecture

    rank = dist.get_rank()
    spec, model_cfg = get_model_spec("llm"), LLMConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16)
    meta = {"family": "llm", "model": architecture(model_cfg)}  # what init_from compares with the run's model
    checkpointer = checkpoint.Checkpointer(Path(root), keep_last=2, rank=rank)
    for step in (2, 4):  # a key per rank: each rank writes its own shard file
        checkpointer.save(step, {f"rank{rank}": torch.full((1000,), float(step + rank))}, meta)
    if rank == 0:
        (Path(root) / "config.yaml").write_text("")  # a run directory, as init_from recognizes one
    dist.barrier()
    latest = checkpointer.latest_dir()
    hashed = {"resume": [], "init_from": []}
    real_sha256 = checkpoint.file_sha256
    try:
        for use, verify in (("resume", lambda: checkpoint.check_complete_everywhere(latest)),
                            ("init_from", lambda: open_starting_weights(root, spec, model_cfg,
                                                                        checkpoint.check_complete_everywhere))):
            checkpoint.file_sha256 = lambda path, use=use: hashed[use].append(path.name) or real_sha256(path)
            verify()
    finally:
        checkpoint.file_sha256 = real_sha256
    shards = sorted(path.name for path in latest.glob("*.distcp"))
    dist.barrier()
    if rank == 0:  # flip a byte of the shard rank 1 hashes: sizes and metadata stay valid, only its checksum fails
        victim = latest / shards[1]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    dist.barrier()
    refusals = {}
    for use, verify in (("resume", lambda: checkpoint.check_complete_everywhere(latest)),
                        ("init_from", lambda: open_starting_weights(root, spec, model_cfg,
                                                                    checkpoint.check_complete_everywhere))):
        try:
            verify()
            refusals[use] = None
        except UserError as e:
            refusals[use] = str(e)
    resumed, record = checkpointer.resume_point(fallback=True, check=checkpoint.check_complete_everywhere)
    return {"hashed": hashed, "shards": shards, "refusals": refusals, "resumed": resumed.name,
            "fallback": record.get("fallback")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("verify-together")
    (result,) = run_world(2, [(f"{THIS}:verify_together", {"root": str(workdir / "run")})], workdir)
    return [result.value(rank) for rank in range(2)]


@pytest.mark.parametrize("use", ["resume", "init_from"])
def test_each_rank_hashes_its_share_and_together_they_hash_every_file(ranks, use):
    shards = ranks[0]["shards"]
    assert len(shards) == 2
    assert ranks[0]["hashed"][use] == [".metadata", shards[0]]  # the DCP metadata on every rank: it is unpickled
    assert ranks[1]["hashed"][use] == [".metadata", shards[1]]


@pytest.mark.parametrize("use", ["resume", "init_from"])
def test_a_damaged_shard_is_refused_on_every_rank_also_where_it_was_not_hashed(ranks, use):
    """Rank 0 never hashed rank 1's shard (the test above), yet it refuses the checkpoint with rank 1's line."""
    shards = ranks[0]["shards"]
    assert ranks[0]["refusals"][use] == ranks[1]["refusals"][use]
    assert f"{shards[1]} does not match its checksum" in ranks[0]["refusals"][use]


def test_a_fallback_resumes_every_rank_from_the_same_earlier_checkpoint(ranks):
    assert [r["resumed"] for r in ranks] == ["step-2", "step-2"]
    assert all("step-4 failed verification" in r["fallback"] for r in ranks)
