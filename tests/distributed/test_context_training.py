"""Context parallelism in training: the tiny config with its sequences split over cp ranks
(ring zigzag / contiguous, Ulysses, hybrid), alone and with FSDP, TP and PP (and selective activation
checkpointing), and checkpoints moved
between cp layouts, gives the one-process losses (fp32, relative 1e-5); the greedy sample after
training, run through the cp ranks, gives the one-process text."""
from pathlib import Path

import pytest

from tests.conftest import TEST_VOCAB
from tests.distributed.harness import run_world
from tests.distributed.runs import SAMPLE, assert_losses_differ, assert_same_losses, perturbed_lr, train_check

STOP = "run.stop_at_step=5"


def short_documents(cache: Path) -> str:
    """The override to train on the pydoc topics' paragraphs, one document per file (~80 tokens, so most
    64-token rows cross a document boundary; the pydoc topics are ~1000 tokens long and almost never do).
    Written and prepared in `cache` once, in the test process, before any world reads it."""
    from data.embedded import prepare_embedded
    from pydoc_data.topics import topics

    directory = cache / "paragraph-documents"
    if not directory.exists():
        staging = cache / "paragraph-documents.partial"
        staging.mkdir()
        paragraphs = [p for key in sorted(topics) for p in topics[key].split("\n\n") if len(p.strip()) > 40]
        for i, paragraph in enumerate(paragraphs):
            (staging / f"{i:05d}.txt").write_text(paragraph)
        staging.rename(directory)
        prepare_embedded(str(directory), TEST_VOCAB, cache, 0.05, log=lambda _: None)
    return f"data.source={directory}"


def documents(cache: Path) -> list[str]:
    """Attention and positions inside each packed document, on the short documents."""
    return ["data.document_mask=true", short_documents(cache)]


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"documents": train_check(workdir / "documents", cache, *documents(cache)),
            "documents_unmasked": train_check(workdir / "documents_unmasked", cache, short_documents(cache))}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cp-runs")


def _world(nproc: int, runs_dir: Path, cache: Path, runs: dict[str, tuple[str, list[str]]]) -> dict:
    """Run name -> its summary (losses, eval loss, sample)."""
    checks = [train_check(runs_dir / run_dir, cache, *overrides, summary=True) for run_dir, overrides in runs.values()]
    return dict(zip(runs, (r.value() for r in run_world(nproc, checks, runs_dir / f"world{nproc}"))))


@pytest.fixture(scope="module")
def two(runs_dir, data_cache):
    return _world(2, runs_dir, data_cache, {
        "ring": ("ring", ["parallel.cp=2", *SAMPLE]),
        "ring_lr_perturbed": ("ring_lr_perturbed", ["parallel.cp=2", perturbed_lr()]),
        "ring_contiguous": ("ring_contiguous", ["parallel.cp=2", "parallel.cp_layout=contiguous"]),
        "ulysses": ("ulysses", ["parallel.cp=2", "parallel.cp_mode=ulysses"]),
        # the ring merges into its first block's outputs in place, which selective checkpointing may hold
        "ring_ac_selective": ("ring_ac_selective", ["parallel.cp=2", "train.activation_checkpoint=selective"]),
        "cp2_stop": ("cp2_to_cp1", ["parallel.cp=2", STOP]),
        "cp2_stop_for_4": ("cp2_to_dp2", ["parallel.cp=2", STOP]),
        "documents_dp2": ("documents_dp2", [*documents(data_cache), "train.micro_batch_size=4"]),
        "documents_tp2": ("documents_tp2", [*documents(data_cache), "parallel.tp=2"]),
        "documents_ring": ("documents_ring", [*documents(data_cache), "parallel.cp=2"]),
        "documents_ulysses": ("documents_ulysses", [*documents(data_cache), "parallel.cp=2", "parallel.cp_mode=ulysses"]),
    })


@pytest.fixture(scope="module")
def four(runs_dir, data_cache, two):
    return _world(4, runs_dir, data_cache, {
        "cp2_dp2": ("cp2_dp2", ["parallel.cp=2", "train.micro_batch_size=4"]),
        "cp2_tp2": ("cp2_tp2", ["parallel.cp=2", "parallel.tp=2", *SAMPLE]),
        "cp2_pp2": ("cp2_pp2", ["parallel.cp=2", "parallel.pp=2", "train.micro_batch_size=2"]),
        "ring4": ("ring4", ["parallel.cp=4"]),
        "hybrid_2x2": ("hybrid_2x2", ["parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.cp_ulysses=2", *SAMPLE]),
        "hybrid_2x2_ac_selective": ("hybrid_2x2_ac_selective", ["parallel.cp=4", "parallel.cp_mode=hybrid",
                                                                "parallel.cp_ulysses=2",
                                                                "train.activation_checkpoint=selective"]),
        "ulysses2_dp2_resume": ("cp2_to_dp2", ["parallel.cp=2", "parallel.cp_mode=ulysses", "train.micro_batch_size=4"]),
        "documents_hybrid_2x2": ("documents_hybrid_2x2", [*documents(data_cache), "parallel.cp=4",
                                                          "parallel.cp_mode=hybrid", "parallel.cp_ulysses=2"]),
        "documents_pp2": ("documents_pp2", [*documents(data_cache), "parallel.pp=2", "train.micro_batch_size=2"]),
    })


@pytest.fixture(scope="module")
def one(runs_dir, data_cache, four):
    return _world(1, runs_dir, data_cache, {"cp1_resumed": ("cp2_to_cp1", [])})


@pytest.mark.parametrize("run", ["ring", "ring_contiguous", "ulysses", "ring_ac_selective"])
def test_cp2_matches_one_process(two, reference_losses, run):
    assert_same_losses(two[run]["losses"], reference_losses)


def test_perturbed_run_fails_the_comparison(two, reference_losses):
    """Negative control: ring cp=2 with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(two["ring_lr_perturbed"]["losses"], reference_losses)


@pytest.mark.parametrize("run", ["cp2_dp2", "cp2_tp2", "cp2_pp2", "ring4", "hybrid_2x2", "hybrid_2x2_ac_selective"])
def test_cp_composed_matches_one_process(four, reference_losses, run):
    assert_same_losses(four[run]["losses"], reference_losses)


def test_cp2_checkpoint_resumes_on_one_process(two, one, reference_losses):
    assert_same_losses(two["cp2_stop"]["losses"], reference_losses[:5])
    assert_same_losses(one["cp1_resumed"]["losses"], reference_losses[5:])


def test_ring_checkpoint_resumes_as_ulysses_with_fsdp(two, four, reference_losses):
    assert_same_losses(two["cp2_stop_for_4"]["losses"], reference_losses[:5])
    assert_same_losses(four["ulysses2_dp2_resume"]["losses"], reference_losses[5:])


@pytest.mark.parametrize("world, run", [("two", "ring"), ("four", "cp2_tp2"), ("four", "hybrid_2x2")])
def test_greedy_sample_through_cp_ranks_matches_one_process(request, reference, world, run):
    """End to end through the trainer. The 10-step model continues mostly with newlines, so the text
    alone would not catch misordered logits: test_context_parallel compares the logits themselves."""
    sample = request.getfixturevalue(world)[run]["sample"]
    assert sample and sample.startswith("The with statement") and sample == reference["sample"]


@pytest.fixture(scope="module")
def documents_losses(one_process) -> list[float]:
    """The tiny config on short documents with data.document_mask on, on one process (attention per
    document there is CoreAttention's per-segment SDPA; under cp the ring/Ulysses block kernels)."""
    return one_process["test_context_training:documents"].value()


def test_document_mask_changes_the_run(one_process, documents_losses):
    """Control: on the same data, masking across documents changes the losses, so the parity below is not
    vacuous."""
    assert_losses_differ(documents_losses, one_process["test_context_training:documents_unmasked"].value())


@pytest.mark.parametrize("world, run", [("two", "documents_dp2"), ("two", "documents_tp2"), ("two", "documents_ring"),
                                        ("two", "documents_ulysses"), ("four", "documents_hybrid_2x2"),
                                        ("four", "documents_pp2")])
def test_document_mask_matches_one_process(request, documents_losses, world, run):
    assert_same_losses(request.getfixturevalue(world)[run]["losses"], documents_losses)
