"""One training run, top to bottom.

    layout -> process group -> mesh -> data -> model on meta -> parallelize -> init weights ->
    optimizer, schedule -> resume from `latest` -> loop { micro-batches -> forward + loss ->
    backward -> clip -> step -> metrics -> eval? -> checkpoint? } -> final checkpoint -> sample

The loss of a step is the sum of token losses over the whole global batch divided by the global
number of target tokens, so it does not depend on how the batch is split over data-parallel
ranks or micro-batches: the same config under any layout gives the same loss curve.
"""
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from data.build import build_loaders
from launcher.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState, check_complete
from launcher.config import Config, cp_layout, validate
from launcher.cpu_memory import keep_freed_memory
from launcher.distributed import detect_world, init_distributed
from launcher.errors import UserError
from launcher.metrics import MetricsWriter, measure_peak_flops, peak_memory_gib
from launcher.optim import Optimizers
from models import get_model_spec
from models.common.loss import IGNORE_INDEX, cross_entropy_sum
from parallel.context.apply import forward_whole_sequence
from parallel.data_parallel import uses_fsdp
from parallel.init import init_parameters
from parallel.pipeline import build_pipeline, stages_per_rank
from parallel.tensor_parallel import full_tensor, reduce_partial_grads

# Exit code after SIGUSR1/SIGTERM (Slurm's time-limit warning, preemption): the last finished step
# is checkpointed, and the job script requeues itself to resume from it (EX_TEMPFAIL).
PREEMPTED_EXIT = 75


def train(cfg: Config) -> dict:
    """Run (or resume) the training described by `cfg` in the current world; return a summary."""
    world = detect_world()
    dims, resume_from, saved = preflight(cfg, world.world_size)
    device = init_distributed(world, cfg.run.timeout_s)
    allocator_note = keep_freed_memory() if device.type == "cpu" else None
    rank = dist.get_rank()
    meshes = dims.build_mesh(device.type)
    batch_group = meshes.batch.get_group()  # dp x cp: the ranks that hold different tokens of a step
    t = cfg.train
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, rank)
    start_step = saved["meta"]["step"] if saved else 0
    say = print if rank == 0 else (lambda _: None)  # until the run directory may be written to

    # Data: the embedded corpus (built once, cached) or a blend of prepared datasets; the global batch
    # of a step depends only on (seed, step), so every layout sees the same samples.
    data, train_loader, valid_loader = build_loaders(
        cfg.data, t.seq_len, t.global_batch_size, t.micro_batch_size, meshes.dp.get_local_rank(), dims.dp, t.seed,
        log=lambda message: say(f"[shardwright] {message}"))

    # Model: built without memory on the meta device, sharded, then materialized and initialized.
    spec = get_model_spec(cfg.model.family)
    model_cfg = cfg.model_config()
    bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and device.type == "cuda")
    if cfg.parallel.async_tp and device.type != "cuda":
        raise UserError("parallel.async_tp needs CUDA (symmetric memory); set parallel.async_tp=false")
    p = cfg.parallel
    options = cfg.parallelize_options(torch.bfloat16 if bf16 else torch.float32)
    # Context parallelism: each cp rank takes its part of every sequence (the model's attention
    # layers know the matching global positions; see parallel/context/apply.py).
    sequence_layout, cp_rank = cp_layout(p, dims.cp), meshes.cp.get_local_rank()
    with torch.device("meta"):
        model = spec.model_cls(model_cfg)
    n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
    loss_scale = torch.ones((), device=device)  # dp x cp / global target count, set each step

    def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, targets)[0] * loss_scale

    pipeline = None
    if dims.pp > 1:  # this rank holds one or more stages, each parallelized like a whole model
        pipeline = build_pipeline(model, spec.split_stage, lambda part: spec.parallelize(part, dims, meshes, options),
                                  model_cfg.n_layers, meshes.pp, p.pp_schedule,
                                  stages_per_rank(p.pp_schedule, p.pp_stages_per_rank), p.pp_layout, n_micro,
                                  pipeline_loss, device)
        parts = pipeline.parts
    else:
        parts = [spec.parallelize(model, dims, meshes, options)]
    for part in parts:
        part.to_empty(device=device)
        init_parameters(part, t.seed)
    # FSDP casts parameters itself; without it, bf16 runs under autocast.
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 and not uses_fsdp(dims) else nullcontext()
    # Vocab-sharded logits need cross entropy (forward and backward) under loss_parallel().
    loss_context = loss_parallel if dims.tp > 1 and options.loss_parallel else nullcontext
    optimizers = Optimizers(parts, t)
    for part in parts:
        if hasattr(part, "set_aux_loss_scale"):
            # MoE aux + z losses ride on each layer's output (models/moe): a layer's value is this rank's
            # share of the loss of the forward's batch over dp x cp; x dp*cp undoes the gradient averaging
            # over those ranks, / n_micro makes the step's aux loss the mean over micro-batches.
            part.set_aux_loss_scale(dims.dp * dims.cp / n_micro)

    state = {"model": ModelState(parts), "optimizer": OptimizerState(parts, optimizers.optimizers),
             "scheduler": optimizers.schedule_state, "data": train_loader}
    checkpoint_meta = {"family": cfg.model.family, "model": asdict(model_cfg), "tokenizer": data.tokenizer.fingerprint,
                       "data": asdict(cfg.data), "layout": asdict(dims)}
    state["rng"] = RNGState(rank)
    if saved is not None:
        check_same_tokenizer(saved["meta"], checkpoint_meta, resume_from)
        # RNG streams are per rank: a checkpoint from a smaller world has none for the new ranks.
        has_rng = f"rng.{state['rng'].key}" in saved["keys"]
        checkpointer.load(resume_from, state if has_rng else {k: v for k, v in state.items() if k != "rng"})
    # Everything is checked: from here on the run directory is written to.
    metrics = MetricsWriter(run_dir, rank, t.steps, start_step, tensorboard=cfg.run.tensorboard)
    if saved is not None:
        metrics.info(f"resumed from {resume_from} at step {start_step}"
                     + ("" if has_rng else f" (the checkpoint came from a world of "
                                            f"{saved['meta']['layout']['world_size']}: new ranks keep their seed RNG)"))
    if rank == 0:
        cfg.dump(run_dir / "config.yaml")

    flops_per_token = spec.flops_per_token(model_cfg, t.seq_len)
    peak_flops, peak_how = measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    n_params = torch.tensor(float(sum(w.numel() for part in parts for w in part.parameters())))
    dist.all_reduce(n_params, group=meshes.pp.get_group())  # each stage counts its own
    n_params = n_params.item()
    metrics.info(f"{cfg.model.family}: {n_params / 1e6:.2f}M parameters, layout {dims.describe()} "
                 f"on {dims.world_size} {device.type} process(es), "
                 f"{'bf16' if bf16 else 'fp32'}, {t.global_batch_size} x {t.seq_len} tokens per step")
    metrics.info(f"MFU baseline: {peak_flops / 1e9:.1f} GFLOP/s per process ({peak_how})")
    if allocator_note:
        metrics.info(allocator_note)

    def step_loss(loader_, step: int, backward: bool) -> torch.Tensor:
        """Global-token-normalized loss of the global batch at `step`, optionally back-propagated."""
        micro_batches = [tuple(sequence_layout.shard(x, cp_rank) for x in batch) if dims.cp > 1 else batch
                         for batch in loader_.micro_batches(step)]
        n_targets = torch.tensor(sum(int((tg != IGNORE_INDEX).sum()) for _, tg in micro_batches), device=device)
        dist.all_reduce(n_targets, group=batch_group)
        # Gradient reductions average over the dp x cp ranks; the loss is already global, so undo that.
        loss_scale.copy_(dims.dp * dims.cp / n_targets)
        with loss_context(), autocast:
            if pipeline is not None:
                inputs, targets = (torch.cat(parts_).to(device) for parts_ in zip(*micro_batches))
                loss_sum = pipeline.run(inputs, targets, backward) / loss_scale
            else:
                loss_sum = torch.zeros((), device=device)
                for inputs, targets in micro_batches:
                    micro_loss = pipeline_loss(parts[0](inputs.to(device)), targets.to(device))
                    if backward:
                        micro_loss.backward()
                    loss_sum += full_tensor(micro_loss.detach()) / loss_scale
        dist.all_reduce(loss_sum, group=batch_group)
        return loss_sum / n_targets

    def evaluate() -> float:
        for part in parts:  # eval mode: e.g. MoE layers keep no routing statistics of eval batches
            part.eval()
        with torch.no_grad():
            loss = sum(step_loss(valid_loader, i, backward=False).item() for i in range(t.eval_batches)) / t.eval_batches
        for part in parts:
            part.train()
        return loss

    def save(step: int) -> None:
        path = checkpointer.save(step, state, checkpoint_meta)
        metrics.info(f"saved checkpoint {path}")

    tokens_per_step = t.global_batch_size * t.seq_len
    losses, throughput = [], []
    eval_loss = None
    # The schedule always spans train.steps; run.stop_at_step only ends this invocation early.
    last_step = min(t.steps, cfg.run.stop_at_step or t.steps)
    if start_step >= last_step:
        metrics.info(f"nothing to train: {run_dir} is already at step {start_step}; raise train.steps "
                     f"(or run.stop_at_step) to continue, or use a new run.dir")
    stop_signals = catch_stop_signals()  # from here SIGUSR1/SIGTERM stop the run after a step, with a checkpoint
    for step in range(start_step + 1, last_step + 1):
        started = time.perf_counter()
        loss = step_loss(train_loader, train_loader.step, backward=True)
        train_loader.step += 1
        reduce_partial_grads(p for part in parts for p in part.parameters())
        grad_norm = clip_grad_norm(parts, t.grad_clip, meshes.pp.get_group())
        lr = optimizers.lr
        optimizers.step()
        model_metrics = end_step(parts, meshes.pp.get_group())
        loss_value = loss.item()  # waits for the step to finish
        elapsed = time.perf_counter() - started
        tokens_per_s = tokens_per_step / elapsed
        losses.append(loss_value)
        throughput.append(tokens_per_s)
        tflops = flops_per_token * tokens_per_s / dims.world_size / 1e12
        record = {"step": step, "loss": loss_value, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens_per_s,
                  "tflops": tflops, "mfu": tflops * 1e12 / peak_flops, "mem_peak_gib": peak_memory_gib(device)}
        record.update(model_metrics)
        metrics.log(record, show=step % cfg.run.log_every == 0 or step == last_step)
        if t.eval_every and step % t.eval_every == 0 and step != last_step:
            eval_loss = evaluate()
            metrics.log({"step": step, "eval_loss": eval_loss}, show=True)
        if cfg.checkpoint.enabled and cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != last_step:
            save(step)
        stop = stop_signal(stop_signals)  # every rank, every step: all stop after the same step
        if stop and step != last_step:
            if cfg.checkpoint.enabled and not (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                save(step)
            metrics.info(f"{signal.Signals(stop).name} received: stopped after step {step}; exit code "
                         f"{PREEMPTED_EXIT} (requeue to resume from the checkpoint)")
            metrics.close()
            dist.barrier()
            sys.exit(PREEMPTED_EXIT)
    if start_step < last_step:
        eval_loss = evaluate()
        metrics.log({"step": last_step, "eval_loss": eval_loss}, show=True)
        if cfg.checkpoint.enabled:
            save(last_step)
    sample = None
    if t.sample_prompt and pipeline is not None:
        metrics.info("no sample: greedy sampling does not run through a pipeline yet")
    elif t.sample_prompt:
        def full_logits(tokens: torch.Tensor) -> torch.Tensor:
            if dims.cp == 1:
                return full_tensor(parts[0](tokens))
            return forward_whole_sequence(parts[0], tokens, sequence_layout, cp_rank, meshes.cp.get_group())
        # The padded length must split over the cp layout's chunks, then each part over tp (sequence parallel).
        multiple = dims.tp * (sequence_layout.length_multiple if dims.cp > 1 else 1)
        sample = greedy_sample(full_logits, data.tokenizer, t.sample_prompt, t.sample_tokens, device, autocast,
                               length_multiple=multiple)
    summary = summarize(losses, throughput, eval_loss, flops_per_token, peak_flops, dims.world_size, sample)
    for line in summary["lines"]:
        metrics.info(line)
    metrics.close()
    dist.barrier()
    return summary


def preflight(cfg: Config, world_size: int):
    """Everything that can be checked before a process group exists: the config, the layout, and
    the checkpoint a run would resume from (complete, and made for this model)."""
    dims = validate(cfg, world_size)
    resume_from = Checkpointer(Path(cfg.run.dir), cfg.checkpoint.keep_last, rank=0).latest_dir()
    saved = None
    if resume_from is not None:
        saved = check_complete(resume_from)
        check_same_model(saved["meta"], cfg.model.family, asdict(cfg.model_config()), resume_from)
    return dims, resume_from, saved


def check_same_model(saved: dict, family: str, model: dict, path: Path) -> None:
    if saved.get("family") != family or saved.get("model") != model:
        diff = {k: (saved.get("model", {}).get(k), v) for k, v in model.items() if saved.get("model", {}).get(k) != v}
        raise UserError(f"{path} holds a {saved.get('family')} model with a different shape "
                        f"({', '.join(f'{k}: checkpoint {a} vs config {b}' for k, (a, b) in diff.items())}); "
                        f"use a new run.dir or the checkpoint's model config")


def check_same_tokenizer(saved: dict, current: dict, path: Path) -> None:
    if saved.get("tokenizer") != current["tokenizer"]:
        raise UserError(f"{path} was trained with tokenizer {saved.get('tokenizer')} but the current data settings "
                        f"give tokenizer {current['tokenizer']}; restore the data section it was trained with "
                        f"(checkpoint: {saved.get('data')}) or use a new run.dir")


def clip_grad_norm(parts: list[torch.nn.Module], max_norm: float, pp_group) -> float:
    """Global L2 norm of all gradients over every shard, mesh dim and pipeline stage, clipped to
    max_norm when > 0.

    Gradients live on different meshes (FSDP x TP, TP only, or plain tensors), so the norm is
    taken per mesh and made whole there; the squares are summed, then over the pipeline stages.
    """
    by_mesh: dict = {}
    for p in (p for part in parts for p in part.parameters()):
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    squares = sum(full_tensor(torch.nn.utils.get_total_norm(grads)) ** 2 for grads in by_mesh.values())
    squares = torch.as_tensor(squares, dtype=torch.float32)
    dist.all_reduce(squares, group=pp_group)
    norm = squares.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for grads in by_mesh.values():  # a Python scalar multiplies DTensors and plain tensors alike
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def end_step(parts: list[torch.nn.Module], pp_group) -> dict[str, float]:
    """The model's own end of a step (MoE: aux-loss-free bias updates) and its statistics of the step,
    from every pipeline stage: entries of one layer come from its stage alone, totals add up."""
    if not hasattr(parts[0], "end_step"):  # the same family on every rank: all return here, or none
        return {}
    records = [part.end_step() for part in parts]
    if dist.get_world_size(pp_group) > 1:
        gathered = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(gathered, records, group=pp_group)
        records = [record for stage_records in gathered for record in stage_records]
    merged: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


@torch.no_grad()
def greedy_sample(full_logits, tokenizer, prompt: str, n_tokens: int, device, autocast, length_multiple: int) -> str:
    """Greedy continuation of `prompt` with `full_logits(tokens [1, T]) -> [1, T, vocab]` (every rank
    runs it: sharded weights and sequence parts need all ranks).

    Inputs are right-padded to a multiple of `length_multiple` (sequence-sharded layouts need
    it); causal attention keeps the padding from affecting the real positions.
    """
    ids = tokenizer.encode(prompt)
    for _ in range(n_tokens):
        padded = ids + [tokenizer.eos_id] * (-len(ids) % length_multiple)
        with autocast:
            logits = full_logits(torch.tensor([padded], device=device))
        next_id = int(logits[0, len(ids) - 1].argmax())
        if next_id == tokenizer.eos_id:
            break
        ids.append(next_id)
    return tokenizer.decode(ids)


def summarize(losses, throughput, eval_loss, flops_per_token, peak_flops, world_size, sample) -> dict:
    steady = throughput[1:] or throughput  # the first step pays for warm-up
    tokens_per_s = sum(steady) / len(steady) if steady else 0.0
    mfu = flops_per_token * tokens_per_s / world_size / peak_flops
    lines = []
    if losses:
        lines.append(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps, "
                     f"eval loss {eval_loss:.4f}, {tokens_per_s:.0f} tokens/s, MFU {100 * mfu:.2f}%")
    if sample is not None:
        lines.append(f"sample: {sample!r}")
    return {"losses": losses, "eval_loss": eval_loss, "tokens_per_s": tokens_per_s, "mfu": mfu, "sample": sample,
            "lines": lines}


def catch_stop_signals() -> list[int]:
    """SIGUSR1 (Slurm's warning before a time limit) and SIGTERM (preemption) are only recorded here;
    the training loop checks the record after each step (stop_signal). Until the loop starts they
    keep their usual effect (SIGTERM ends the process), so a job cancelled while starting ends at once."""
    received: list[int] = []
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: received.append(signum))
    return received


def stop_signal(received: list[int]) -> int:
    """The stop signal any rank has received, 0 if none: one tiny all-reduce, so that every rank
    stops after the same step and none is left waiting in a collective."""
    flag = torch.tensor(max(received, default=0))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)
