"""`shardwright` command line. Bad input ends with one line `error: ...` and exit code 2."""
import argparse
import gc
import os
import signal
import sys
import tempfile
from pathlib import Path

from data.errors import DataError
from launcher.config import load_config
from launcher.convert import add_arguments as add_convert_arguments, convert_command
from launcher.data_commands import add_prepare_arguments, add_tokenizer_arguments, prepare_command, tokenizer_command
from launcher.distributed import detect_world, launch_local_world
from launcher.errors import PREEMPTED_EXIT, USER_ERROR_EXIT, UserError
from launcher.processes import AGENT_PID_ENV, die_with_parent
from launcher.run_lock import hold_run_lock
from launcher.stop_signals import StartUp, StoppedBeforeFirstStep, stopped_before_first_step
from launcher.submit import add_arguments as add_submit_arguments, submit
from planner.cli import add_arguments as add_plan_arguments, plan_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwright", description="Distributed pretraining from one YAML config.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) the run a config describes")
    train.add_argument("config", help="YAML config, e.g. configs/<family>/tiny.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set train.steps=20")
    train.add_argument("--nproc-per-node", type=int, default=1,
                       help="outside a torchrun/srun world: start a local torchrun world of this many processes")
    submit = commands.add_parser("submit", help="train on a Slurm cluster: write an sbatch script and submit it")
    add_submit_arguments(submit)
    add_prepare_arguments(commands.add_parser(
        "prepare", help="tokenize raw corpus files (jsonl/json/parquet/arrow/txt) into a megatron .bin/.idx dataset; "
                        "with --image-column, image-text corpora into caption tokens and image patches (for image-text families)"))
    add_tokenizer_arguments(commands.add_parser("tokenizer", help="tokenizer tools: `tokenizer train`"))
    add_convert_arguments(commands.add_parser(
        "convert", help="a new run from a checkpoint, by a command of its model family"))
    add_plan_arguments(commands.add_parser(
        "plan", help="rank parallel layouts of a config on a cluster by predicted memory and step time"))
    return parser


def _train(args, start_up: StartUp) -> int:
    import torch.distributed as dist  # torch-heavy: only once the arguments are known good

    from launcher.trainer import train

    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {args.nproc_per_node}: give a number of processes >= 1")
    cfg = load_config(args.config, args.overrides)
    world = detect_world()
    if world.launcher == "single" and args.nproc_per_node > 1:
        return _launch(args, cfg, start_up)
    if world.launcher != "single" and args.nproc_per_node > 1:
        raise UserError(f"--nproc-per-node is for starting a local world, but this process is already rank "
                        f"{world.rank} of a {world.launcher} world of {world.world_size}; drop the flag")
    makes_group = not dist.is_initialized()  # train joins a caller's process group, else makes one

    def destroy_made_group() -> None:
        # A process that exits with gloo's worker threads alive can abort at interpreter exit ("terminate called
        # without an active exception", pytorch/pytorch#190489), as a run refused for a locked run.dir once did in CI,
        # and rank 1 of a finished two-process run once more. The run's device meshes (and a tensor) are left in
        # reference cycles when train returns (measured); collected here, while the interpreter is whole, rather than
        # at its teardown after the groups are gone.
        if makes_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

    try:
        try:
            start_up.arm(says_stops=world.rank == 0)  # a stop signal from here to the first step: one line
            train(cfg)
        except Exception:
            if (stop := start_up.stop()) is not None:  # the stop's echo: a collective with a rank it ended first
                raise stop from None
            raise
    except StoppedBeforeFirstStep as stop:
        destroy_made_group()
        return _stopped_before_first_step(f"{stop.signal_name} received", cfg, world.rank)
    except (UserError, DataError, SystemExit):  # refused, or stopped after a checkpoint: ends as cleanly as success
        destroy_made_group()
        raise
    destroy_made_group()
    return 0


def _launch(args, cfg, start_up: StartUp) -> int:
    """`train --nproc-per-node N` outside a world: check, then run the same command in a local torchrun world."""
    from launcher.trainer import preflight

    try:
        start_up.arm(says_stops=False)  # the preflight may hash a large checkpoint
        preflight(cfg, args.nproc_per_node)  # fail here, once, rather than in every worker
        lock_fd = hold_run_lock(cfg.run.dir) if cfg.run.lock else None  # for the world's life, restarts included
        start_up.release()  # from here the world's launcher forwards them to the world
    except StoppedBeforeFirstStep as stop:
        return _stopped_before_first_step(f"{stop.signal_name} received", cfg, 0)
    worker_args = ["train", args.config, *(a for o in args.overrides for a in ("--set", o))]
    fd, stop_note = tempfile.mkstemp(prefix="shardwright-stop-note-")
    os.close(fd)
    try:
        code = launch_local_world(args.nproc_per_node, worker_args, cfg.run.max_restarts, cfg.run.timeout_s, lock_fd,
                                  stop_note=stop_note)
        said = Path(stop_note).stat().st_size > 0
    finally:
        Path(stop_note).unlink(missing_ok=True)
    if code == PREEMPTED_EXIT and not said:
        # A signal that ended the workers while they started Python, before any could handle it: none said anything.
        return _stopped_before_first_step("a stop signal arrived", cfg, 0)
    # torchrun exits 75 after any stop signal it forwarded; without checkpoints the workers saved nothing (and
    # said so) and a requeue would start again from step 0.
    return USER_ERROR_EXIT if code == PREEMPTED_EXIT and not cfg.checkpoint.enabled else code


def _stopped_before_first_step(what: str, cfg, rank: int) -> int:
    """Say that a stop signal ended the run before its first step (rank 0; a refusal as say_refusal says it); the
    exit code: 75 with checkpoints (the same command starts again where the run was), else 2."""
    from launcher.checkpoint import Checkpointer

    last = Checkpointer(Path(cfg.run.dir), cfg.checkpoint.keep_last, rank=0).last_complete() if rank == 0 else ""
    code, line = stopped_before_first_step(what, cfg.checkpoint.enabled, last)
    if code == USER_ERROR_EXIT:
        say_refusal(UserError(line), rank)
    elif rank == 0:
        print(line, file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None, start_up: StartUp | None = None) -> int:
    """`start_up`: the stop signals' handler the entry point installed before this module's imports (None: one is
    installed when `train` has read its config)."""
    start_up = start_up or StartUp()
    try:
        if AGENT_PID_ENV in os.environ:  # a worker of a local world: it must not outlive its torchrun
            die_with_parent(signal.SIGKILL, int(os.environ[AGENT_PID_ENV]))
        args = _parser().parse_args(argv)
        if args.command != "train":
            start_up.release(redeliver=True)  # a stop signal has its usual effect
        if args.command in ("prepare", "tokenizer"):
            return prepare_command(args) if args.command == "prepare" else tokenizer_command(args)
        if args.command == "convert":
            return convert_command(args)
        if args.command == "plan":
            return plan_command(args)
        return submit(args) if args.command == "submit" else _train(args, start_up)
    except (UserError, DataError) as e:
        say_refusal(e, detect_world().rank)
        return USER_ERROR_EXIT
    finally:
        start_up.release()


def say_refusal(error: Exception, rank: int) -> None:
    """Rank 0 prints `error: ...`. Most refusals are raised alike on every rank (a config, a verified checkpoint, a
    stop), but one may be raised on another rank alone (a file only it cannot read): under torchrun such a rank
    records it in its torchelastic error file, whose line torchrun's side prints when rank 0 did not refuse
    (launcher/torchrun.py, launcher/submit.py), so a world says a refusal once; without an error file (a world
    started otherwise) it prints it itself, naming its rank."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    elif os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)
    else:
        print(f"[rank {rank}] error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
