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
    # rank 1 reading a stale `latest` (a network file system's attribute cache): the world resumes from what rank 0
    # reads; without agreeing, rank 1 would resume from another checkpoint (the control)
    if rank == 1:
        checkpointer._resume_candidates = lambda: ("step-2", None, [])
    views = {how: checkpointer.resume_point(False, checkpoint.check_complete_everywhere, agree)[0].name
             for how, agree in (("agreed", checkpoint.as_rank0_sees), ("each its own", lambda candidates: candidates))}
    vars(checkpointer).pop("_resume_candidates", None)
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
    resumed, record = checkpointer.resume_point(True, checkpoint.check_complete_everywhere, checkpoint.as_rank0_sees)
    return {"hashed": hashed, "shards": shards, "refusals": refusals, "resumed": resumed.name,
            "fallback": record.get("fallback"), "views": views}


def hash_with_a_late_listing(root: str, async_save: bool) -> dict:
    """Check body: a save in which rank 1 does not yet list the shard rank 0 wrote (a network file system showing
    another node's new file late); which files each rank hashed, and which meta.json records."""
    import json

    import torch
    import torch.distributed as dist

    import launcher.checkpoint as checkpoint

    rank = dist.get_rank()
    checkpointer = checkpoint.Checkpointer(Path(root), keep_last=1, rank=rank, async_save=async_save)
    real_files_in, real_sha256, hashed = checkpoint.files_in, checkpoint.file_sha256, []
    if rank == 1:
        checkpoint.files_in = lambda directory: [name for name in real_files_in(directory) if name != "__0_0.distcp"]
    checkpoint.file_sha256 = lambda path: hashed.append(path.name) or real_sha256(path)
    try:
        checkpointer.save(2, {f"rank{rank}": torch.full((1000,), float(rank))}, {})
        checkpointer.wait()
    finally:
        checkpoint.files_in, checkpoint.file_sha256 = real_files_in, real_sha256
    latest = checkpointer.latest_dir()
    return {"hashed": hashed, "recorded": sorted(json.loads((latest / checkpoint.META_FILE).read_text())
                                                   [checkpoint.FILES_SHA256]),
            "files": sorted(name for name in real_files_in(latest) if name != checkpoint.META_FILE)}


def rank0_fails_to_stage(root: str) -> str | None:
    """Check body: a save whose staging rank 0 cannot prepare (a leftover `.staging-step-*` that is a file, which
    rmtree refuses); the refusal this rank raised, within the world's collective timeout rather than after it."""
    import torch
    import torch.distributed as dist

    import launcher.checkpoint as checkpoint
    from launcher.errors import UserError

    rank = dist.get_rank()
    if rank == 0:
        (Path(root) / "checkpoints").mkdir(parents=True)
        (Path(root) / "checkpoints" / ".staging-step-1").write_text("not a directory")
    dist.barrier()
    try:
        checkpoint.Checkpointer(Path(root), keep_last=1, rank=rank).save(2, {f"rank{rank}": torch.ones(10)}, {})
    except UserError as e:
        return str(e)
    return None


def rank1_cannot_hash(root: str, async_save: bool) -> dict:
    """Check body: a save whose files rank 1 cannot read back to hash (EIO), after a good one; the refusal this rank
    raised, within the world's collective timeout rather than after it, and what `latest` names then."""
    import errno

    import torch
    import torch.distributed as dist

    import launcher.checkpoint as checkpoint
    from launcher.errors import UserError

    rank = dist.get_rank()
    checkpointer = checkpoint.Checkpointer(Path(root), keep_last=2, rank=rank, async_save=async_save)
    checkpointer.save(2, {f"rank{rank}": torch.ones(10)}, {})
    checkpointer.wait()
    real_sha256, refusal = checkpoint.file_sha256, None
    if rank == 1:
        checkpoint.file_sha256 = lambda path: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error", str(path)))
    try:
        checkpointer.save(4, {f"rank{rank}": torch.ones(10)}, {})
        checkpointer.wait()
    except UserError as e:
        refusal = str(e)
    finally:
        checkpoint.file_sha256 = real_sha256
    dist.barrier()
    return {"refusal": refusal, "latest": checkpointer.latest_dir().name,
            "left": sorted(path.name for path in (Path(root) / "checkpoints").iterdir())}


def rank1_fails_unexpectedly(root: str) -> str:
    """Check body: rank 1's verification fails with an exception that is no refusal (a bug); what each rank
    raised, within the world's collective timeout rather than after it."""
    import torch
    import torch.distributed as dist

    import launcher.checkpoint as checkpoint

    rank = dist.get_rank()
    checkpointer = checkpoint.Checkpointer(Path(root), keep_last=1, rank=rank)
    checkpointer.save(2, {f"rank{rank}": torch.ones(10)}, {})
    real_read = checkpoint.read_metadata
    if rank == 1:
        checkpoint.read_metadata = lambda path: (_ for _ in ()).throw(RuntimeError("a bug"))
    try:
        checkpoint.check_complete_everywhere(checkpointer.latest_dir())
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        checkpoint.read_metadata = real_read
    return "no error"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("verify-together")
    (result,) = run_world(2, [(f"{THIS}:verify_together", {"root": str(workdir / "run")})], workdir)
    return [result.value(rank) for rank in range(2)]


@pytest.fixture(scope="module")
def late_listing(tmp_path_factory) -> dict[str, list[dict]]:
    workdir = tmp_path_factory.mktemp("late-listing")
    results = run_world(2, [(f"{THIS}:hash_with_a_late_listing", {"root": str(workdir / kind), "async_save": kind == "async"})
                            for kind in ("sync", "async")], workdir)
    return {kind: [result.value(rank) for rank in range(2)] for kind, result in zip(("sync", "async"), results)}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_every_file_is_hashed_once_though_a_rank_lists_it_late(late_listing, kind):
    """The files hashed at save are the union of the ranks' listings, each hashed by a rank that listed it: rank 1,
    which did not list rank 0's shard, leaves it to rank 0, and meta.json records every file (a rank hashing its
    slice of its own listing hashed some files twice and left others unrecorded, so never verified)."""
    rank0, rank1 = late_listing[kind]
    assert rank0["recorded"] == rank0["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "__0_0.distcp" not in rank1["hashed"]
    assert sorted(rank0["hashed"] + rank1["hashed"]) == rank0["files"]


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


def test_every_rank_resumes_from_the_checkpoint_rank_0_reads_latest_to_name(ranks):
    """Rank 1 reads a stale `latest` (step-2): the world still resumes from rank 0's step-4; the control, each rank
    going by its own reading, shows rank 1 would otherwise have verified and resumed from step-2."""
    assert [r["views"]["agreed"] for r in ranks] == ["step-4", "step-4"]
    assert [r["views"]["each its own"] for r in ranks] == ["step-4", "step-2"]


def test_a_failure_of_rank_0s_file_operations_is_refused_on_every_rank(tmp_path):
    """Only rank 0 prepares the staging directory (and publishes and prunes); when it fails, every rank refuses
    with its line instead of waiting for rank 0 in the next collective until the timeout."""
    (result,) = run_world(2, [(f"{THIS}:rank0_fails_to_stage", {"root": str(tmp_path / "run")})], tmp_path,
                          collective_timeout_s=30)
    refusals = [result.value(rank) for rank in range(2)]
    assert refusals[0] == refusals[1] and "while saving step 2" in refusals[0] and "ENOTDIR" in refusals[0]
    assert "fix what" in refusals[0] and ".staging-step-1" in refusals[0] and "free space" not in refusals[0]


def test_an_unexpected_failure_on_one_rank_reaches_every_rank(tmp_path):
    """An exception that is no refusal, on rank 1 only, is raised there as it is and as a refusal naming it on
    rank 0, which would otherwise wait for rank 1 in the verdicts' gather until the timeout."""
    (result,) = run_world(2, [(f"{THIS}:rank1_fails_unexpectedly", {"root": str(tmp_path / "run")})], tmp_path,
                          collective_timeout_s=30)
    assert result.value(1) == "RuntimeError: a bug"
    assert result.value(0).startswith("UserError: rank 1 failed verifying") and "RuntimeError: a bug" in result.value(0)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_file_one_rank_cannot_hash_at_save_fails_the_save_on_every_rank(tmp_path, kind):
    """Rank 1 cannot read a file it hashes (EIO): every rank refuses the save with the same line, instead of rank 1
    alone while rank 0 waits for its checksums until the timeout; the partial checkpoint is removed and `latest`
    still names the last complete one."""
    (result,) = run_world(2, [(f"{THIS}:rank1_cannot_hash", {"root": str(tmp_path / kind), "async_save": kind == "async"})],
                          tmp_path, collective_timeout_s=30)
    rank0, rank1 = result.value(0), result.value(1)
    assert rank0["refusal"] == rank1["refusal"]
    assert "while saving step 4 (EIO" in rank0["refusal"] and ".staging-step-4" in rank0["refusal"]
    assert "the last complete checkpoint is step-2" in rank0["refusal"]
    assert rank0["latest"] == rank1["latest"] == "step-2"
    assert rank0["left"] == ["latest", "step-2"]
