"""`shardwright submit`: train on a Slurm cluster with one command.

It checks the config for the world `nodes x gpus-per-node` (before anything is submitted), writes
`<run.dir>/slurm/config.yaml` (the resolved config) and `<run.dir>/slurm/job.sbatch` (from
slurm/job.sbatch.template), calls sbatch and prints the job id and the log path.

The job runs one srun task per node, each a torchrun that joins the others by c10d rendezvous on
the first node (or, with `--launcher srun`, one srun task per rank). SIGUSR1 before the time limit
or SIGTERM on preemption makes the trainer save a checkpoint and exit with PREEMPTED_EXIT; the
script then requeues the job, which resumes from `latest`.

`python -m launcher.submit torchrun ...` is the per-node command of the torchrun launcher.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from launcher.config import load_config
from launcher.errors import PREEMPTED_EXIT, USER_ERROR_EXIT, UserError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "job.sbatch.template"
DEFAULT_SIGNAL_LEAD_S = 120

_LAUNCH = {
    "torchrun": "\n".join([
        "# One task per node: torchrun starts the node's processes, which find the others by c10d rendezvous.",
        'srun --ntasks-per-node=1 --kill-on-bad-exit=0 "$PYTHON" -m launcher.submit torchrun \\',
        '    --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$PROCS_PER_NODE" --max-restarts=0 \\',
        '    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\',
        '    -m launcher train "$CONFIG"']),
    "srun": "\n".join([
        "# One task per rank: the trainer takes its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.",
        'srun --ntasks-per-node="$PROCS_PER_NODE" --kill-on-bad-exit=0 "$PYTHON" -m launcher train "$CONFIG"']),
}


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config, e.g. a tiny.yaml under configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.steps=20")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="GPUs (= training processes) per node; on CPU nodes, processes per node (gloo)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: request --gpus-per-node GPUs; cpu: request none and train with gloo; "
                             "auto (default): cuda if sinfo shows GPUs in the partition, else cpu")
    parser.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                        help="torchrun (default): one torchrun per node, c10d rendezvous; srun: one task per rank")
    parser.add_argument("--partition", help="Slurm partition (-p)")
    parser.add_argument("--account", help="Slurm account (-A)")
    parser.add_argument("--qos", help="quality of service")
    parser.add_argument("--time", help="time limit, e.g. 4:00:00; the job is warned --signal-lead seconds before")
    parser.add_argument("--constraint", help="node features, e.g. h100")
    parser.add_argument("--exclusive", action="store_true", help="do not share the nodes with other jobs")
    parser.add_argument("--cpus-per-task", type=int,
                        help="CPUs per srun task (default: one per training process)")
    parser.add_argument("--job-name", help="default: shardwright-<name of run.dir>")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="export NAME=VALUE in the job (repeatable), e.g. --env NCCL_SOCKET_IFNAME=ib0")
    parser.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S, metavar="SECONDS",
                        help=f"send SIGUSR1 this long before the time limit (default {DEFAULT_SIGNAL_LEAD_S}): "
                             f"the trainer checkpoints and the job requeues itself")
    parser.add_argument("--chain", type=int, default=1, metavar="K",
                        help="submit K jobs, each starting when the previous one ends (afterany); a job "
                             "stopped by its time limit then leaves the rest to the next one instead of requeueing")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")


def submit(args) -> int:
    from launcher.trainer import starting_point, validated_layout  # torch-heavy: only once the arguments are parsed

    for name in ("nodes", "gpus_per_node", "chain", "signal_lead", "cpus_per_task"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value} must be >= 1")
    cfg = load_config(args.config, args.overrides)
    if args.chain > 1 and not cfg.checkpoint.enabled:
        raise UserError(f"--chain {args.chain} continues the run in each next job from its checkpoint, but "
                        f"checkpoint.enabled=false: every job would train again from step 0; enable checkpoints or "
                        f"submit one job; nothing was submitted")
    world_size = args.nodes * args.gpus_per_node
    try:
        dims = validated_layout(cfg, world_size)
    except UserError as e:
        raise UserError(f"{e} (world size {world_size} = --nodes {args.nodes} x --gpus-per-node "
                        f"{args.gpus_per_node}); nothing was submitted") from None
    starting_point(cfg, dims)  # the checkpoint a job would resume from, or the weights it would start from
    sbatch = shutil.which("sbatch")
    if sbatch is None and not args.dry_run:
        raise UserError("sbatch not found on PATH: run this where Slurm's commands are installed (a login node), "
                        "start a local test cluster with slurm/local-cluster.sh up, or pass --dry-run to only "
                        "print the script")
    env = [_env_assignment(a) for a in args.env]
    device = args.device if args.device != "auto" else _detect_device(args.partition, strict=not args.dry_run)

    cfg.run.dir = os.path.abspath(os.path.expanduser(cfg.run.dir))  # the job must not depend on its cwd
    run_dir = Path(cfg.run.dir)
    if "\\" in cfg.run.dir:  # Slurm stops expanding %j in a file name that holds one
        raise UserError(f"run.dir '{cfg.run.dir}' contains a backslash, which Slurm's log file name cannot "
                        f"carry; choose a run.dir without one")
    slurm_dir = run_dir / "slurm"
    script_path, config_path = slurm_dir / "job.sbatch", slurm_dir / "config.yaml"
    procs_per_task = args.gpus_per_node if args.launcher == "torchrun" else 1
    cpus_per_task = args.cpus_per_task or procs_per_task
    script = render_script(
        options=sbatch_options(args, run_dir, device, cpus_per_task),
        summary=(f"{cfg.model.family} from {args.config}: {args.nodes} node(s) x {args.gpus_per_node} "
                 f"{'GPU(s)' if device == 'cuda' else 'CPU process(es)'} = {world_size} ranks, launcher "
                 f"{args.launcher}{', chain of ' + str(args.chain) if args.chain > 1 else ''}, "
                 f"written {datetime.now():%Y-%m-%d %H:%M:%S}"),
        values={"run_dir": str(run_dir), "config": str(config_path), "python": sys.executable,
                "procs_per_node": str(args.gpus_per_node),
                # a stopped job requeues itself to resume from its checkpoint: not with none (it would start over)
                # nor in a chain (the next job resumes)
                "requeue": "yes" if args.chain == 1 and cfg.checkpoint.enabled else "no",
                "stopped_early": str(PREEMPTED_EXIT), "omp_threads": str(max(1, cpus_per_task // procs_per_task))},
        env=env, launch=_LAUNCH[args.launcher])
    if args.dry_run:
        print(script, end="")
        return 0

    slurm_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump(config_path)
    tmp = script_path.with_name(script_path.name + ".tmp")
    tmp.write_text(script)
    tmp.replace(script_path)
    job_ids: list[str] = []
    for _ in range(args.chain):
        cmd = [sbatch, "--parsable"] + ([f"--dependency=afterany:{job_ids[-1]}"] if job_ids else []) + [str(script_path)]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess(cmd, 1, "", "sbatch did not answer within 120 s; is slurmctld up?")
        if result.returncode != 0:
            why = (result.stderr.strip().splitlines() or ["no message"])[-1]
            done = f"; submitted before it: {', '.join(job_ids)}" if job_ids else ""
            raise UserError(f"sbatch refused {script_path}: {why}{done}")
        job_ids.append(result.stdout.strip().split(";")[0])
    print(f"submitted job{'s' if len(job_ids) > 1 else ''} {', '.join(job_ids)}"
          + (" (each starts when the previous one ends)" if len(job_ids) > 1 else ""))
    print(f"  script: {script_path}")
    for job_id in job_ids:
        print(f"  log:    {slurm_dir / f'job-{job_id}.out'}")
    print(f"  run:    {run_dir} (train.log, metrics.jsonl, checkpoints/)")
    return 0


def sbatch_options(args, run_dir: Path, device: str, cpus_per_task: int) -> list[tuple[str, str | None]]:
    """(option, value) pairs for the #SBATCH lines; value None for a flag."""
    per_node_tasks = 1 if args.launcher == "torchrun" else args.gpus_per_node
    options = [("--job-name", args.job_name or f"shardwright-{run_dir.name}"),
               ("--nodes", str(args.nodes)), ("--ntasks-per-node", str(per_node_tasks)),
               ("--cpus-per-task", str(cpus_per_task))]
    if device == "cuda":
        options.append(("--gpus-per-node", str(args.gpus_per_node)))
    for name in ("partition", "account", "qos", "time", "constraint"):
        if getattr(args, name):
            options.append((f"--{name}", getattr(args, name)))
    if args.exclusive:
        options.append(("--exclusive", None))
    # Slurm expands %j in file names; a literal % in the run directory is written %%.
    options += [("--output", str(run_dir / "slurm").replace("%", "%%") + "/job-%j.out"),
                ("--open-mode", "append"),  # a requeued job adds to its log
                ("--chdir", os.getcwd()),  # relative paths in the config mean what they meant here
                ("--requeue", None),
                ("--signal", f"USR1@{args.signal_lead}")]
    return options


def render_script(options, summary: str, values: dict[str, str], env: list[tuple[str, str]], launch: str) -> str:
    lines = [f"#SBATCH {name}" if value is None else f"#SBATCH {name}={sbatch_quote(name, value)}"
             for name, value in options]
    filled = {
        "sbatch_options": "\n".join(lines),
        "summary": _one_line("the summary", summary),
        **{k: shlex.quote(v) for k, v in values.items()},
        "env_exports": "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env),
        "launch": launch,
    }
    template = TEMPLATE.read_text()

    def fill(match: re.Match) -> str:
        return filled[match.group(1)]
    return re.sub(r"\{\{(\w+)\}\}", fill, template)


_SAFE = re.compile(r"[\w@%+=:,./-]+")


def sbatch_quote(option: str, value: str) -> str:
    """Quote a value for an #SBATCH line. sbatch reads those lines itself, with shell-like quotes,
    but a backslash escapes inside single quotes too, so values with one are escaped char by char."""
    _one_line(option, value)
    if "\\" not in value:
        return shlex.quote(value)
    return "".join(c if _SAFE.fullmatch(c) else "\\" + c for c in value)


def _one_line(what: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UserError(f"{what} {value!r} contains a newline or control character, which an sbatch script "
                        f"cannot carry on one line; choose a value without one")
    return value


def _env_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UserError(f"--env '{text}' should look like NAME=VALUE with NAME a shell variable name, "
                        f"e.g. --env NCCL_SOCKET_IFNAME=ib0")
    return name, value


def _detect_device(partition: str | None, strict: bool) -> str:
    """cuda if sinfo lists GPU GRES in the partition, cpu if it lists none; cuda when sinfo is absent.
    If sinfo fails, that is an error when submitting (strict), and cuda for a dry run."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return "cuda"
    cmd = [sinfo, "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        why = (result.stderr.strip().splitlines() or ["no message"])[-1] if result.returncode else ""
    except subprocess.TimeoutExpired:
        why = "no answer within 30 s"
    if why and strict:
        raise UserError(f"sinfo failed ({why}); is slurmctld up? Pass --device cuda or cpu to skip the GPU check")
    if why:
        print(f"note: sinfo failed ({why}); the script requests GPUs (--device cpu for none)", file=sys.stderr)
        return "cuda"
    return "cuda" if "gpu" in result.stdout else "cpu"


def torchrun_node(argv: list[str]) -> int:
    """One node's share of a job: torchrun with these changes. Its agent ignores SIGUSR1 (meant for the
    workers, which inherit the disposition until their entry point installs its handler), and a worker
    that exits with PREEMPTED_EXIT makes this exit with it too (torchrun itself would exit 1), one that refused
    with USER_ERROR_EXIT likewise, its line said once (launcher/torchrun.py: refused_line)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import parse_args, run

    from launcher.torchrun import quiet_agent_warnings, refused_line

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    quiet_agent_warnings()
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if PREEMPTED_EXIT in codes:  # the others may have been stopped by torchrun meanwhile
            print(f"[shardwright] workers stopped early on a stop signal (exit code {PREEMPTED_EXIT})",
                  file=sys.stderr, flush=True)
            return PREEMPTED_EXIT
        if USER_ERROR_EXIT not in codes:
            return 1
        if (line := refused_line(e.failures)) is not None:  # no rank 0 here, or it did not refuse
            print(line, file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except SignalException:  # Slurm signalled this agent too; it passed the signal to the workers, which checkpoint
        return PREEMPTED_EXIT
    except RendezvousConnectionError as e:
        # Also what a node sees when the first node's torchrun, which holds the store, ends before it.
        print(f"[shardwright] torchrun lost the rendezvous store: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["torchrun"]:
        sys.exit("usage: python -m launcher.submit torchrun [torchrun arguments]")
    sys.exit(torchrun_node(sys.argv[2:]))
