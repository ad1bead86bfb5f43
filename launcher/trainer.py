"""One training run, top to bottom.

    layout -> process group -> mesh -> data -> model on meta -> parallelize -> init weights ->
    optimizer, schedule -> resume from `latest` -> loop { train_step: micro-batches -> forward + loss ->
    backward -> clip -> step -> metrics -> eval? -> checkpoint? } -> final checkpoint -> sample

Everything about the model family comes from its ModelSpec (models/spec.py): batches are dicts
whose keys the spec describes, the loss is the family's, and its hooks run at fixed points of a
step. The loss of a step is the family's loss summed over the whole global batch divided by the
global number of its terms, so it does not depend on how the batch is split over data-parallel
ranks, context-parallel ranks or micro-batches: the same config under any layout gives the same
loss curve.
"""
import gc
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from launcher.checkpoint import (Checkpointer, RNGState, as_rank0_sees, check_complete, check_complete_everywhere,
                                 check_same_engine, check_same_model, check_same_sequence_length,
                                 check_same_tokenizer, checkpoint_meta, engine_name, training_state)
from launcher.config import Config, cp_layout, validate
from launcher.cpu_memory import keep_freed_memory
from launcher.cpu_threads import describe_openmp
from launcher.deepspeed_engine import ZeroOptimizers, check_deepspeed_config, deepspeed_config
from launcher.distributed import all_reduce, all_reduce_number, detect_world, init_distributed
from launcher.errors import PREEMPTED_EXIT, UserError
from launcher.init_from import open_starting_weights
from launcher.metrics import MetricsWriter, PeakFlops, peak_memory_gib, read_records, training_flops
from launcher.optim import Optimizers, schedule_note
from launcher.precision import choose_precision
from launcher.run_lock import lock_for_world
from launcher.stop_signals import STOP_SIGNALS, taken_over
from models import configured_spec, get_model_spec
from models.spec import BatchKey, ModelSpec, RunContext, StepContext, architecture
from parallel.context import SequenceLayout
from parallel.context.apply import gather_sequence
from parallel.data_parallel import uses_fsdp
from parallel.init import materialize
from parallel.mesh import Meshes, ParallelDims
from parallel.parallelize import parallelize
from parallel.pipeline import Pipeline, build_pipeline, stages_per_rank
from parallel.tensor_parallel import full_tensor, reduce_partial_grads


def model_inputs(keys: dict[str, BatchKey], batch: dict) -> tuple[tuple, dict]:
    """(positional inputs of the first stage, keyword inputs of every stage) of a batch."""
    args = tuple(batch[k] for k, key in keys.items() if key.consumer == "inputs" and k in batch)
    kwargs = {k: batch[k] for k, key in keys.items() if key.consumer == "every_stage" and k in batch}
    return args, kwargs


class TrainStep:
    """The work of one step on this rank's model parts (one, or one per pipeline stage).

    `forward_backward(micro_batches)` runs the family's forward and loss over the rank's micro-batches
    (optionally back-propagating) and returns the step's global loss and loss metrics;
    `train_step(micro_batches)` adds the gradient reduction, the family's hooks, clipping and the
    optimizer step, and returns the step's metrics.
    """

    def __init__(self, spec: ModelSpec, dims: ParallelDims, meshes: Meshes, layout: SequenceLayout,
                 device: torch.device, grad_clip: float, vocab_sharded_outputs: bool):
        self.spec, self.dims, self.meshes, self.layout, self.device = spec, dims, meshes, layout, device
        self.grad_clip = grad_clip
        # Vocab-sharded logits need cross entropy (forward and backward) under loss_parallel().
        self.loss_context = loss_parallel if vocab_sharded_outputs else nullcontext
        self.loss_scale = torch.ones((), device=device)  # dp x cp / the step's global count of loss terms
        self.keys = spec.data.keys
        self.batch_group = meshes.batch.get_group()  # dp x cp: the ranks that hold different tokens of a step
        self.cp_rank = meshes.cp.get_local_rank()  # which part of each sequence this rank takes
        self.pp_group = meshes.pp.get_group()
        self.loss_sums: list[list[torch.Tensor]] = []  # [loss, *metrics] of each micro-batch, filled by `loss_terms`
        self.metric_names = spec.loss.metrics  # those of the current forward_backward (evaluation adds its own)
        self.attention_pairs = 0  # (query, key) pairs the last step's global batch attends, for FLOPs
        self.whole_batch: dict[str, torch.Tensor] = {}  # under pp: the step's micro-batches stacked, for pipeline_loss
        self.parts: list[torch.nn.Module] = []
        self.params: list[torch.nn.Parameter] = []  # the parts', in module order, listed once: ~50 us a step to walk
        self.pipeline: Pipeline | None = None
        self.optimizers: Optimizers | None = None
        self.precision = nullcontext()

    def bind(self, parts: list[torch.nn.Module], pipeline: Pipeline | None, optimizers: Optimizers, precision) -> None:
        """The model parts this rank trains (built after the TrainStep: a pipeline's loss_fn is `pipeline_loss`),
        their optimizers, and the autocast context of forwards (nullcontext when FSDP casts)."""
        self.parts, self.pipeline, self.optimizers, self.precision = parts, pipeline, optimizers, precision
        self.params = [p for part in parts for p in part.parameters()]

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a micro-batch on the device: sequence keys cut by context parallelism."""
        out = {}
        for name, value in batch.items():
            key = self.keys.get(name)
            if key is None:
                raise KeyError(f"the loader served batch key {name!r}, which the family's DataSpec.keys does not "
                               f"declare ({', '.join(self.keys)})")
            if self.dims.cp > 1 and key.sequence_dim is not None:
                value = self.layout.shard(value, self.cp_rank, dim=key.sequence_dim)
            out[name] = value.to(self.device)
        return out

    def loss_terms(self, outputs, batch: dict) -> torch.Tensor:
        """The family's loss of one micro-batch, scaled for backward; its sums are added to the step's."""
        terms = self.spec.loss.compute(outputs, batch)
        self.loss_sums.append([terms.loss_sum.detach(), *(terms.metrics[name].detach() for name in self.metric_names)])
        return terms.loss_sum * self.loss_scale

    def forward_backward(self, micro_batches: list[dict], backward: bool = True) -> dict[str, float]:
        """Forward (+ backward) of this rank's micro-batches of a step; the step's global loss and loss
        metrics, each divided by the global count of loss terms."""
        # Whole rows, before the cp split: every cp rank of a dp rank counts the same micro-batches.
        pairs = sum(self.spec.data.attention_pairs(batch) for batch in micro_batches) \
            if self.spec.data.attention_pairs is not None else 0
        batches = [self.prepare(batch) for batch in micro_batches]
        # Summed as counted (int64 for token counts: exact beyond fp32's 2^24 of a large global batch).
        n_terms = torch.stack([torch.as_tensor(self.spec.loss.count(batch)) for batch in batches]).sum()
        if dist.get_world_size(self.batch_group) > 1:  # one rank's counts are global already: no packing (~30 us)
            # One collective for both, in fp64: exact for integer counts below 2^53 whatever the count's dtype.
            counts = torch.stack([n_terms.to(torch.float64), torch.tensor(float(pairs), device=n_terms.device,
                                                                          dtype=torch.float64)])
            dist.all_reduce(counts, group=self.batch_group)
            n_terms, pairs = counts[0].to(n_terms.dtype), int(counts[1])
        self.attention_pairs = pairs // self.dims.cp
        # Gradient reductions average over the dp x cp ranks; the loss is already global, so undo that.
        self.loss_scale.copy_(self.dims.dp * self.dims.cp / n_terms)
        self.loss_sums = []
        self.metric_names = self.spec.loss.metrics + (() if backward else self.spec.loss.eval_metrics)
        with self.loss_context(), self.precision:
            if self.pipeline is not None:
                whole = {k: torch.cat([batch[k] for batch in batches]) for k in batches[0]}
                args, kwargs = model_inputs(self.keys, whole)
                # The loss function sees its micro-batch's row numbers as the target and reads every key it
                # needs from those rows (a schedule passes one tensor to it).
                self.whole_batch = whole
                rows = torch.arange(next(iter(whole.values())).shape[0], device=self.device)
                self.pipeline.run(args, kwargs, rows, backward)
            else:
                for batch in batches:
                    args, kwargs = model_inputs(self.keys, batch)
                    loss = self.loss_terms(self.parts[0](*args, **kwargs), batch)
                    if backward:
                        self.optimizers.backward(loss)
        # A schedule's first step also calls its loss function once on dummy activations, to infer the
        # backward's shapes: the micro-batches' own calls are the last ones. Stacked once a step rather than per
        # micro-batch: an op between a forward and its backward meets cold caches (~25 us on CPU).
        own = [full_tensor(value).float() for values in self.loss_sums[-len(batches):] for value in values]
        sums = torch.stack(own).view(len(batches), -1).sum(0) if own else \
            torch.zeros(1 + len(self.metric_names), device=self.device)
        if self.pipeline is not None:
            all_reduce(sums, group=self.pp_group)  # only the last stage computed the loss
        all_reduce(sums, group=self.batch_group)
        values = (sums / n_terms).tolist()
        return {"loss": values[0], **dict(zip(self.metric_names, values[1:]))}

    def pipeline_loss(self, outputs, rows: torch.Tensor) -> torch.Tensor:
        """loss_fn of the pipeline schedule: the loss of the micro-batch made of `rows` of the step."""
        return self.loss_terms(outputs, {k: v.index_select(0, rows) for k, v in self.whole_batch.items()})

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        record = self.forward_backward(micro_batches, backward=True)
        if self.dims.tp > 1:  # only tensor parallelism leaves gradients Partial
            reduce_partial_grads(self.params)
        record.update(self.run_hook(self.spec.hooks.after_backward))
        record["grad_norm"] = self.optimizers.clip_grad_norm(self.params, self.grad_clip, self.pp_group)
        record["lr"] = self.optimizers.lr
        if not all_finite(record["loss"], record["grad_norm"]):
            self.optimizers.skip()  # the weights stay those of the last finite step
            return {**record, "skipped_nonfinite": True}
        self.optimizers.step()
        record.update(self.run_hook(self.spec.hooks.after_optimizer_step))
        return record

    def run_hook(self, hook) -> dict[str, float]:
        """A family hook on every part of this rank; its metrics summed over all pipeline stages."""
        if hook is None:
            return {}
        records = [hook(part) for part in self.parts]
        if dist.get_world_size(self.pp_group) > 1:
            gathered = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(gathered, records, group=self.pp_group)
            records = [record for stage_records in gathered for record in stage_records]
        merged: dict[str, float] = {}
        for record in records:
            for key, value in record.items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    @torch.no_grad()
    def evaluate(self, loader, n_batches: int) -> dict[str, float]:
        """Mean over n_batches validation steps of the loss and loss metrics, named eval_<name>."""
        for part in self.parts:  # eval mode: e.g. no routing statistics of eval batches
            part.eval()
        totals: dict[str, float] = {}
        for i in range(n_batches):
            for name, value in self.forward_backward(loader.micro_batches(i), backward=False).items():
                totals[name] = totals.get(name, 0.0) + value / n_batches
        for part in self.parts:
            part.train()
        return {f"eval_{name}": value for name, value in totals.items()}

    @torch.no_grad()
    def next_token(self, ids: list[int], length: int, pad_id: int) -> int:
        """The greedy next token after `ids`, run on every rank. Inputs are right-padded to `length`
        (the training length, which splits over every layout); causal models keep the padding from
        affecting the real positions."""
        tokens = torch.tensor([ids + [pad_id] * (length - len(ids))])
        return int(self.greedy_tokens(self.spec.data.prompt_batch(tokens))[0, len(ids) - 1])

    @torch.no_grad()
    def greedy_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The argmax token ids [rows, T] of the logits for a batch of whole rows (model inputs only), run on
        every rank (sharded weights, sequence parts and pipeline stages need all of them); on every rank."""
        batch = self.prepare(batch)
        args, kwargs = model_inputs(self.keys, batch)
        with self.precision:
            outputs = self.pipeline.forward(args, kwargs) if self.pipeline is not None else self.parts[0](*args, **kwargs)
        rows, local_length = args[0].shape[:2]  # the first stage's first input: the tokens, cut by cp
        choice = torch.full((rows, local_length * self.dims.cp), -1, dtype=torch.int64, device=self.device)
        if outputs is not None:  # the last pipeline stage (every rank without pp)
            logits = full_tensor(outputs)
            if self.dims.cp > 1:
                logits = gather_sequence(logits, self.layout, self.meshes.cp.get_group())
            choice.copy_(logits.argmax(-1))
        dist.all_reduce(choice, op=dist.ReduceOp.MAX)  # from the last stage to every rank
        return choice.cpu()


def train(cfg: Config) -> dict:
    """Run (or resume) the training described by `cfg` in the current world; return a summary."""
    world = detect_world()
    dims = validated_layout(cfg, world.world_size)
    device = init_distributed(world, cfg.run.timeout_s)
    model_cfg = cfg.model_config()
    spec = configured_spec(cfg.model.family, model_cfg)
    t, p = cfg.train, cfg.parallel
    bf16, precision_note = choose_precision(t.mixed_precision, device)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    check_run_everywhere(spec, model_cfg, RunContext(cfg.data.document_mask, device, compute_dtype))
    lock_for_world(cfg.run.dir, cfg.run.lock)  # refused while another run writes run.dir
    # A checkpoint (the run's own, or init_from's) is verified by all ranks together, each hashing its share of its
    # files: read once in all, not once per rank.
    resume_from, saved, starting_weights = starting_point(cfg, dims, check_complete_everywhere, as_rank0_sees)
    cpu_notes = [keep_freed_memory(), describe_openmp(torch.get_num_threads())] if device.type == "cpu" else []
    rank = dist.get_rank()
    meshes = dims.build_mesh(device.type)
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, rank, cfg.checkpoint.async_save)
    start_step = saved["meta"]["step"] if saved else 0
    say = print if rank == 0 else (lambda _: None)  # until the run directory may be written to

    # Data: the global batch of a step depends only on (seed, step), so every layout sees the same samples.
    data, train_loader, valid_loader = spec.data.build_loaders(
        cfg.data, t.seq_len, t.global_batch_size, t.micro_batch_size, meshes.dp.get_local_rank(), dims.dp, t.seed,
        log=lambda message: say(f"[shardwright] {message}"))
    n_eval, eval_note = eval_batches(valid_loader, t.eval_batches, t.global_batch_size, t.seq_len)

    # Model: built without memory on the meta device, sharded, then materialized and initialized.
    if p.async_tp and device.type != "cuda":
        raise UserError("parallel.async_tp needs CUDA (symmetric memory); set parallel.async_tp=false")
    options = cfg.parallelize_options(compute_dtype)
    with torch.device("meta"):
        model = spec.model_cls(model_cfg)
    n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
    steps = TrainStep(spec, dims, meshes, cp_layout(p, dims.cp), device, t.grad_clip,
                      vocab_sharded_outputs=dims.tp > 1 and options.loss_parallel)
    pipeline = None
    if dims.pp > 1:  # this rank holds one or more stages, each parallelized like a whole model
        pipeline = build_pipeline(model, spec.split_stage, lambda part: parallelize(part, spec.plan, dims, meshes, options),
                                  spec.n_layers(model_cfg), meshes.pp, p.pp_schedule,
                                  stages_per_rank(p.pp_schedule, p.pp_stages_per_rank), p.pp_layout, n_micro,
                                  steps.pipeline_loss, device, spec.hooks.discard_records)
        parts = pipeline.parts
    elif p.engine == "deepspeed":
        parts = [model]  # the ZeRO engine wraps it once initialized (below)
    else:
        parts = [parallelize(model, spec.plan, dims, meshes, options)]
    for part in parts:
        materialize(part, device, t.seed)
    if starting_weights is not None:
        if starting_weights.tokenizer is not None:
            check_same_tokenizer({"tokenizer": starting_weights.tokenizer}, {"tokenizer": data.tokenizer.fingerprint},
                                 Path(cfg.checkpoint.init_from))
        starting_weights.load(parts)
    for part in parts:
        if spec.hooks.setup is not None:
            spec.hooks.setup(part, StepContext(gradient_average=dims.dp * dims.cp, micro_batches=n_micro))
    n_params = all_reduce_number(float(sum(w.numel() for part in parts for w in part.parameters())),
                                 group=meshes.pp.get_group())  # each stage counts its own
    # FSDP casts parameters itself; without it, bf16 runs under autocast.
    precision = torch.autocast(device.type, torch.bfloat16) if bf16 and not uses_fsdp(dims) else nullcontext()
    zero = None  # parallel.engine=deepspeed: the ZeRO engine wraps the plain model and owns gradients and AdamW
    if p.engine == "deepspeed":
        zero = ZeroOptimizers(parts[0], t, deepspeed_config(cfg, dims, bf16))
        parts, precision = [zero.engine], nullcontext()  # DeepSpeed casts parameters itself
    optimizers = zero or Optimizers(parts, t)
    steps.bind(parts, pipeline, optimizers, precision)

    # CUDA generators are saved when there are any, and restored when the checkpoint has them.
    cuda_rng = torch.cuda.is_available() and (saved is None or f"rng.rank{rank}.cuda" in saved["keys"])
    rng = RNGState(rank, with_cuda=cuda_rng)
    state = {**(zero.training_state(train_loader) if zero else training_state(parts, optimizers, train_loader)),
             "rng": rng}
    meta = checkpoint_meta(cfg, data.tokenizer.fingerprint, dims)
    if saved is not None:
        check_same_tokenizer(saved["meta"], meta, resume_from)
        # RNG streams are per rank: a checkpoint from a smaller world has none for the new ranks, a converted
        # one (launcher/convert.py) none at all, one saved before RNG states were tensors a pickle (not read).
        # Known alike on every rank (the checkpoint's keys), so that rank 0 can say which ranks keep their seed RNG.
        without_rng = [r for r in range(dims.world_size) if f"rng.{RNGState(r, False).key}.torch" not in saved["keys"]]
        has_rng = rank not in without_rng
        checkpointer.load(resume_from, state if has_rng else {k: v for k, v in state.items() if k != "rng"},
                          zero and zero.load)
        rng.with_cuda = torch.cuda.is_available()  # from here on every save holds them
    # Everything is checked: from here on the run directory is written to.
    metrics = MetricsWriter(run_dir, rank, t.steps, start_step, tensorboard=cfg.run.tensorboard)
    if saved is not None:
        if "fallback" in saved:
            metrics.info(f"{saved['fallback']}; checkpoint.fallback=true: resuming from {resume_from}, the newest "
                         f"verified checkpoint")
        metrics.info(f"resumed from {resume_from} at step {start_step}"
                     + ("" if saved["verified"] else " unverified (it has no checksums: saved by an older version)")
                     + ("" if not without_rng else
                        f" (it holds no RNG state as tensors for {describe_ranks(without_rng, dims.world_size)}, e.g. "
                        f"a converted or older checkpoint, or one from a smaller world: their seed RNG kept)"))
    if saved is not None and cfg.checkpoint.init_from:
        metrics.info(f"checkpoint.init_from={cfg.checkpoint.init_from} ignored: the run resumes from its own "
                     f"checkpoint")
    elif starting_weights is not None:
        metrics.info(f"initialized from {starting_weights.description}; optimizer, schedule and data start fresh at "
                     f"step 0")
    if eval_note:
        metrics.info(eval_note)
    # The schedule always spans train.steps; run.stop_at_step only ends this invocation early.
    last_step = min(t.steps, cfg.run.stop_at_step or t.steps)
    if rank == 0 and start_step < last_step:  # an invocation with nothing to train leaves the run's record alone
        cfg.dump(run_dir / "config.yaml")

    flops_per_token = spec.flops_per_token(model_cfg, t.seq_len)
    peak = PeakFlops(device, compute_dtype, cfg.run.peak_flops, log=metrics.info)
    engine = "" if p.engine == "torch" else f" under {engine_name(cfg)}"
    metrics.info(f"{cfg.model.family}: {n_params / 1e6:.2f}M parameters, layout {dims.describe()}{engine} "
                 f"on {dims.world_size} {device.type} process(es), "
                 f"{'bf16' if bf16 else 'fp32'}, {t.global_batch_size} x {t.seq_len} tokens per step")
    metrics.info(f"MFU baseline: {peak.value / 1e9:.1f} GFLOP/s per process ({peak.how})")
    for note in filter(None, cpu_notes):
        metrics.info(note)
    for note in filter(None, (precision_note, schedule_note(t))):
        metrics.info(note)

    def published(path: Path | None) -> None:
        if path is not None:
            metrics.info(f"saved checkpoint {path}")

    def save(step: int) -> None:
        published(checkpointer.wait())  # an async save still pending is published first
        published(checkpointer.save(step, state, meta, zero and zero.save))

    tokens_per_step = t.global_batch_size * t.seq_len
    whole_row_pairs = t.global_batch_size * t.seq_len * (t.seq_len + 1) // 2  # causal attention over whole rows
    pair_flops = spec.flops_per_attention_pair(model_cfg) if spec.flops_per_attention_pair is not None else None
    losses, throughput, step_flops_per_token = [], [], []
    nonfinite_in_a_row = 0
    eval_record: dict[str, float] = {}
    if start_step >= last_step:
        metrics.info(f"nothing to train: {run_dir} is already at step {start_step}; raise train.steps "
                     f"(or run.stop_at_step) to continue, or use a new run.dir")
    every = cfg.checkpoint.every if cfg.checkpoint.enabled else 0  # a checkpoint after every `every` steps
    stop_signals, usual_handlers = catch_stop_signals()  # from here SIGUSR1/SIGTERM stop the run after a step
    with set_up_objects_frozen():
        for step in range(start_step + 1, last_step + 1):
            started = time.perf_counter()
            record = steps.train_step(train_loader.micro_batches(train_loader.step))
            train_loader.step += 1
            elapsed = time.perf_counter() - started
            tokens_per_s = tokens_per_step / elapsed
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if record.get("skipped_nonfinite") else 0
            if not nonfinite_in_a_row:
                losses.append(record["loss"])
            throughput.append(tokens_per_s)
            step_flops_per_token.append(training_flops(
                flops_per_token, pair_flops, t.seq_len, t.global_batch_size,
                steps.attention_pairs if spec.data.attention_pairs is not None else whole_row_pairs) / tokens_per_step)
            tflops = step_flops_per_token[-1] * tokens_per_s / dims.world_size / 1e12
            record = {"step": step, **record, "tokens_per_s": tokens_per_s, "tflops": tflops,
                      "mfu": peak.mfu(tflops * 1e12), "mem_peak_gib": peak_memory_gib(device)}
            metrics.log(record, show=step % cfg.run.log_every == 0 or step == last_step)
            published(checkpointer.poll())  # an async save whose write is done, on every rank
            if nonfinite_in_a_row:
                what = f"step {step}: loss {record['loss']} / grad norm {record['grad_norm']} not finite"
                if t.nonfinite == "stop" or nonfinite_in_a_row >= t.max_nonfinite_steps:
                    published(checkpointer.wait())
                    metrics.close()
                    raise UserError(f"{what} ({nonfinite_in_a_row} step(s) in a row, train.nonfinite={t.nonfinite}, "
                                    f"max_nonfinite_steps={t.max_nonfinite_steps}); no update of it was applied or "
                                    f"saved: the last checkpoint is {checkpointer.last_complete()}; lower train.lr or "
                                    f"raise train.warmup_steps and rerun, or set train.nonfinite=skip")
                metrics.info(f"{what}: optimizer step skipped ({nonfinite_in_a_row} of at most "
                             f"{t.max_nonfinite_steps - 1} in a row, train.nonfinite=skip)")
            if t.eval_every and step % t.eval_every == 0 and step != last_step:
                eval_record = steps.evaluate(valid_loader, n_eval)
                metrics.log({"step": step, **eval_record}, show=True)
            if every and step % every == 0 and step != last_step:
                save(step)
            stop = stop_signal(stop_signals)  # every rank, every step: all stop after the same step
            if stop and step != last_step:
                if not cfg.checkpoint.enabled:  # nothing to resume from: exit 75 would requeue from step 0 forever
                    metrics.close()
                    raise UserError(f"{signal.Signals(stop).name} received: stopped after step {step} without a "
                                    f"checkpoint (checkpoint.enabled=false), so running again starts from step 0; set "
                                    f"checkpoint.enabled=true for a run that resumes after a stop signal")
                if not (every and step % every == 0):
                    save(step)
                published(checkpointer.wait())
                metrics.info(f"{signal.Signals(stop).name} received: stopped after step {step}; exit code "
                             f"{PREEMPTED_EXIT} (requeue to resume from the checkpoint)")
                metrics.close()
                dist.barrier()
                sys.exit(PREEMPTED_EXIT)
        # After the loop a signal ends the process as usual: a stop request during the final eval, save or sample was
        # recorded and ignored, and the process ran on to the end.
        release_stop_signals(usual_handlers)
        # Recorded at the run's end, or where the loop left the eval to this one; at an early end (run.stop_at_step)
        # only said: the run that goes on from here has no eval record at this step.
        recorded = last_step == t.steps or bool(t.eval_every and last_step % t.eval_every == 0)
        if start_step < last_step:
            eval_record = steps.evaluate(valid_loader, n_eval)
            metrics.log({"step": last_step, **eval_record}, show=True, record_it=recorded)
            if cfg.checkpoint.enabled:
                save(last_step)
        published(checkpointer.wait())
    sample = None
    if t.sample_prompt and spec.data.prompt_batch is None:
        metrics.info(f"no sample: model family {cfg.model.family} does not sample text")
    elif t.sample_prompt:
        for part in parts:
            part.eval()
        sample = greedy_sample(steps.next_token, data.tokenizer, t.sample_prompt, t.sample_tokens, t.seq_len)
    if spec.data.final_evaluation is not None and start_step < last_step:
        for part in parts:
            part.eval()
        final_record = spec.data.final_evaluation(data, steps.greedy_tokens)
        if final_record:
            metrics.log({"step": last_step, **final_record}, show=True, record_it=recorded)
        eval_record = {**eval_record, **final_record}
    mean_flops_per_token = sum(step_flops_per_token) / len(step_flops_per_token) if step_flops_per_token \
        else flops_per_token
    summary = summarize(losses, throughput, eval_record, mean_flops_per_token, peak.value, dims.world_size, sample)
    for line in summary["lines"]:
        metrics.info(line)
    metrics.close()
    dist.barrier()
    return summary


@contextmanager
def set_up_objects_frozen():
    """Keep the Python objects made before the training loop out of the garbage collections that run during it.
    They live as long as the run (torch's, the model's, the data's: a few hundred thousand), and a full collection
    walks them all: 0.24 s of one step, once every few checkpoint saves (whose objects trigger it), in a run with
    async saves (docs/checkpoints.md). Collected first, so that no reference cycle set-up left behind (a tensor
    among them) is held for the whole run; unfrozen after, so that what the run leaves in cycles can be collected
    (launcher/cli.py does, before it ends the process group). A caller that froze objects itself keeps them so."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def eval_batches(valid_loader, wanted: int, global_batch_size: int, seq_len: int) -> tuple[int, str | None]:
    """(the global batches of the valid split each eval reads, a note for the log when that is fewer than the
    `wanted` train.eval_batches): its first batches, as many whole ones as come before a sample repeats, so that an
    eval loss is a mean over distinct samples and every data-parallel rank reads its equal share. The same batches
    at every eval (the valid loader has no position to save). UserError when not even one fits."""
    distinct = valid_loader.distinct_samples(wanted * global_batch_size)
    n = distinct // global_batch_size
    held = f"the valid split serves {distinct} samples of train.seq_len={seq_len} tokens before it repeats one"
    if n == 0:
        raise UserError(f"{held}, fewer than one global batch (train.global_batch_size={global_batch_size}), so an "
                        f"eval would read samples twice: give the valid split more data (data.valid_fraction; "
                        f"data.splits of prepared data) or lower train.global_batch_size or train.seq_len")
    if n < wanted:
        return n, (f"eval reads {n} global batch(es) of {global_batch_size} samples, not train.eval_batches={wanted}: "
                   f"{held}, and no sample is evaluated twice")
    return n, None


def preflight(cfg: Config, world_size: int):
    """Everything that can be checked before a process group exists, in one process (the launcher of a local world;
    `shardwright submit` runs the two parts itself, so that a layout refusal names its --nodes): the config and
    layout (validated_layout), and the starting point (starting_point), its checkpoint hashed whole here."""
    dims = validated_layout(cfg, world_size)
    return (dims, *starting_point(cfg, dims))


def check_run_everywhere(spec: ModelSpec, model_cfg, run: RunContext) -> None:
    """The family's check of the config against what this worker computes with (spec.check_run, the device known): a
    preflight on another machine (a Slurm login node) shares neither the nodes' packages nor their devices. Every rank
    checks its own; the first problem in rank order is raised on all of them, so that they stop together."""
    if spec.check_run is None:  # alike on every rank
        return
    problems = "; ".join(spec.check_run(model_cfg, run))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    rank, first = next(((r, p) for r, p in enumerate(everyone) if p), (0, ""))
    if first:
        raise UserError(first if all(p == first for p in everyone) else f"{first} (rank {rank})")


def validated_layout(cfg: Config, world_size: int) -> ParallelDims:
    """The config's layout on world_size ranks, and for parallel.engine=deepspeed its DeepSpeed settings."""
    dims = validate(cfg, world_size)
    if cfg.parallel.engine == "deepspeed":
        check_deepspeed_config(cfg, dims)  # installed, and every pass-through key one DeepSpeed reads
    return dims


def starting_point(cfg: Config, dims: ParallelDims, check: Callable[[Path], dict] = check_complete,
                   agree: Callable[[tuple], tuple] = lambda candidates: candidates):
    """(checkpoint, its record, None): the checkpoint a run would resume from (complete, and made for this model),
    or (None, None, the weights it would start from: checkpoint.init_from's StartingWeights, else None). A
    checkpoint, the run's own or one init_from names, is verified against its checksums by `check` (check_complete:
    in this process; check_complete_everywhere: by the world together, which resumes from what rank 0 reads
    `latest` to name: `agree` as_rank0_sees); with checkpoint.fallback, a damaged latest one of the run's own gives
    way to the newest verified one."""
    resume_from, saved = Checkpointer(Path(cfg.run.dir), cfg.checkpoint.keep_last, rank=0).resume_point(
        cfg.checkpoint.fallback, check, agree)
    starting_weights = None
    if resume_from is not None:
        check_same_model(saved["meta"], cfg.model.family, architecture(cfg.model_config()), resume_from)
        check_same_engine(saved["meta"], cfg, dims, resume_from)
        check_same_sequence_length(saved["meta"], cfg, resume_from)
        if (Path(cfg.run.dir) / "metrics.jsonl").exists():  # damage (other than a torn last line) stops every rank
            read_records(Path(cfg.run.dir) / "metrics.jsonl")
    elif cfg.checkpoint.init_from:  # a resume never re-imports: the run's own checkpoint holds its weights
        starting_weights = open_starting_weights(cfg.checkpoint.init_from, get_model_spec(cfg.model.family),
                                                 cfg.model_config(), check)
    return resume_from, saved, starting_weights


def describe_ranks(ranks: list[int], world_size: int) -> str:
    """e.g. "every rank", "rank 3", "ranks 2-3" (consecutive) or "ranks 0, 5"."""
    if len(ranks) == world_size:
        return "every rank"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def greedy_sample(next_token, tokenizer, prompt: str, n_tokens: int, max_length: int) -> str:
    """Greedy continuation of `prompt` by up to n_tokens tokens, with `next_token(ids, length, pad_id)`
    (every rank runs it: sharded weights, sequence parts and pipeline stages need all ranks); it
    stops at EOS or at `max_length` tokens."""
    ids = tokenizer.encode(prompt)[:max_length]
    for _ in range(n_tokens):
        if len(ids) >= max_length:
            break
        next_id = next_token(ids, max_length, tokenizer.eos_id)
        if next_id == tokenizer.eos_id:
            break
        ids.append(next_id)
    return tokenizer.decode(ids)


def summarize(losses, throughput, eval_record, flops_per_token, peak_flops, world_size, sample) -> dict:
    steady = throughput[1:] or throughput  # the first step pays for warm-up
    tokens_per_s = sum(steady) / len(steady) if steady else 0.0
    mfu = flops_per_token * tokens_per_s / world_size / peak_flops
    eval_loss = eval_record.get("eval_loss")
    lines = []
    if losses:
        extra = "".join(f", {name.replace('_', ' ')} {value:.4f}" for name, value in eval_record.items()
                        if name != "eval_loss")
        lines.append(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps, "
                     f"eval loss {eval_loss:.4f}{extra}, {tokens_per_s:.0f} tokens/s, MFU {100 * mfu:.2f}%")
    if sample is not None:
        lines.append(f"sample: {sample!r}")
    return {"losses": losses, "eval_loss": eval_loss, "eval": eval_record, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "sample": sample, "lines": lines}


def catch_stop_signals() -> tuple[list[int], dict]:
    """SIGUSR1 (Slurm's warning before a time limit) and SIGTERM (preemption) are only recorded here;
    the training loop checks the record after each step (stop_signal). Until the loop starts the CLI's
    StartUp (launcher/stop_signals.py) ends the command at once on them, in one line, so a job cancelled
    while starting ends at once. The record, and the handlers to put back when the loop ends (the ones
    before the StartUp's: release_stop_signals)."""
    received: list[int] = []
    usual = {}
    stops = []
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for sig in STOP_SIGNALS:
            usual[sig], stop = taken_over(sig, signal.signal(sig, lambda signum, _frame: received.append(signum)))
            stops.append(stop)
    stop = next((stop for stop in stops if stop is not None), None)
    if stop is not None:  # one came before the loop, and its exception was lost on the way
        raise stop
    return received, usual


def release_stop_signals(usual: dict) -> None:
    for sig, handler in usual.items():
        signal.signal(sig, handler)


def all_finite(*values: float) -> bool:
    """Whether every rank has only finite values: one tiny all-reduce, so that all ranks skip a step alike."""
    return not all_reduce_number(float(not all(math.isfinite(v) for v in values)), op=dist.ReduceOp.MAX)


def stop_signal(received: list[int]) -> int:
    """The stop signal any rank has received, 0 if none: one tiny all-reduce, so that every rank
    stops after the same step and none is left waiting in a collective."""
    return int(all_reduce_number(max(received, default=0), op=dist.ReduceOp.MAX))
