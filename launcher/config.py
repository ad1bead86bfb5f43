"""Run configuration: YAML -> typed dataclasses, `--set section.key=value` overrides, validation.

Everything here runs before any process group exists, so a typo or an impossible layout ends
with one clear line instead of a hung or crashed world.
"""
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from launcher.errors import UserError
from models import DEFAULT_FAMILY, FAMILIES, get_model_spec
from models.spec import RunContext
from parallel.activation_checkpoint import MODES as AC_MODES
from parallel.context import KERNEL_NAMES, LAYOUT_KINDS, SequenceLayout, sequence_layout
from parallel.context import MODES as CP_MODES
from parallel.mesh import LayoutError, ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import missing_pieces
from parallel.pipeline import PipelineError, split_layers, stages_per_rank


@dataclass
class ModelSection:
    family: str = DEFAULT_FAMILY
    # The family's own fields (validated against its config class), e.g. dim, n_layers.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelSection:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other dims leave of the world
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream sharded on the sequence dim
    loss_parallel: bool = True  # with tp > 1: cross entropy without gathering the full logits
    async_tp: bool = False  # with tp > 1 on CUDA + train.compile: overlap TP collectives with matmuls
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved-1f1b | zero-bubble | zbv | dualpipev
    pp_stages_per_rank: int = 1  # virtual stages per rank (2+ for interleaved / zero-bubble; 2 for zbv, dualpipev)
    pp_layout: str = ""  # explicit stages, e.g. "E,L3|L2,H" (E embedding, L<n> layers, H head); "": balanced
    cp_mode: str = "ring"  # ring | ulysses | hybrid (ulysses inside, ring across)
    cp_layout: str = "zigzag"  # zigzag (balanced causal work) | contiguous
    cp_ulysses: int = 0  # hybrid: ranks per Ulysses group (cp / cp_ulysses ring steps); 0 otherwise
    cp_kernel: str = "auto"  # auto (cpu_flash on CPU, flash_attn on CUDA) | math | cpu_flash | flash_attn
    # torch (FSDP2 / DDP, every layout) | deepspeed (ZeRO over all ranks, data parallel only: docs/deepspeed.md)
    engine: str = "torch"
    zero_stage: int = 2  # deepspeed: 1 (optimizer states), 2 (+ gradients), 3 (+ parameters) sharded
    offload_optimizer: bool = False  # deepspeed, zero_stage >= 1: fp32 master weights and AdamW states in CPU memory
    offload_params: bool = False  # deepspeed, zero_stage 3: parameters in CPU memory between uses
    # deepspeed: more keys of DeepSpeed's own config, merged into the one generated from this config
    deepspeed: dict = field(default_factory=dict)


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank; the rest is accumulation
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    lr_schedule: str = "cosine"  # cosine | wsd | constant (all after linear warmup)
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    nonfinite: str = "stop"  # a step with a NaN/inf loss or grad norm: stop (exit) | skip (no optimizer step)
    max_nonfinite_steps: int = 3  # skip: stop once this many steps in a row were non-finite
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpoint: str = "none"  # none | full | selective
    compile: bool = False
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    sample_prompt: str = ""  # if set, greedy-decode from it at the end
    sample_tokens: int = 48


@dataclass
class DataSection:
    source: str = "pydoc"  # pydoc | stdlib: the corpus that ships with CPython
    vocab_size: int = 4096  # with `prepared` and left out: the tokenizer's
    valid_fraction: float = 0.05
    cache_dir: str = "~/.cache/shardwright"
    # Datasets written by `shardwright prepare` (used instead of `source`): a list of directories
    # or {path: DIR, weight: W} mappings, blended by relative weight.
    prepared: list = field(default_factory=list)
    tokenizer: str = ""  # with `prepared`: the .model file (default: the first dataset's copy)
    splits: list = field(default_factory=lambda: [98, 2, 0])  # with `prepared`: train, valid, test shares
    # Attention (and RoPE positions) stay inside each packed document: batches carry document_ids.
    # Off by default so existing configs and checkpoints keep their meaning (docs/config.md).
    document_mask: bool = False


@dataclass
class CheckpointSection:
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 2
    enabled: bool = True
    # A Hugging Face model directory (safetensors) whose weights a run without a checkpoint of its own starts from.
    init_from: str = ""
    # Resume from the newest verified checkpoint when the latest fails verification (else refuse, naming the file).
    fallback: bool = False
    # Write checkpoints on background threads from an in-memory copy, each published once written
    # (docs/checkpoints.md).
    async_save: bool = False


@dataclass
class RunSection:
    dir: str = "runs/default"
    log_every: int = 1
    stop_at_step: int = 0  # end this invocation (with a checkpoint) after this step; 0: run to train.steps
    tensorboard: bool = True
    timeout_s: int = 300  # collective timeout: a deadlock fails instead of hanging
    # --nproc-per-node worlds: restarts of the whole world from its last checkpoint after a rank fails (a
    # lost process); 0 because a failure that is a bug would only repeat (docs/reliability.md).
    max_restarts: int = 0
    lock: bool = True  # hold <run.dir>/.lock while running: a second run on the directory is refused
    peak_flops: float = 0.0  # per process, for MFU; 0: a known GPU's datasheet figure, else measured once and cached


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)

    def parallelize_options(self, param_dtype: torch.dtype = torch.float32) -> ParallelizeOptions:
        """What a family's parallelize applies besides the mesh, from the parallel and train sections."""
        p, t = self.parallel, self.train
        return ParallelizeOptions(sequence_parallel=p.sequence_parallel, loss_parallel=p.loss_parallel,
                                  cp_mode=p.cp_mode, cp_layout=p.cp_layout, cp_ulysses=p.cp_ulysses,
                                  cp_kernel=p.cp_kernel, activation_checkpoint=t.activation_checkpoint,
                                  compile=t.compile, async_tp=p.async_tp, param_dtype=param_dtype)

    def model_config(self):
        """The family's typed model config, with the vocabulary taken from the tokenizer settings."""
        spec = get_model_spec(self.model.family)
        args = dict(self.model.args)
        if args.get("vocab_size", 0) == 0:
            args["vocab_size"] = self.data.vocab_size
        return spec.config_cls(**args)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        model = out.pop("model")
        out = {"model": {"family": model["family"], **model["args"]}, **out}
        return out

    def dump(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 as a string; accept exponent floats without a dot (YAML 1.2 style). A key given
    twice in one mapping is refused (SafeLoader silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one mapping; "
                                                        f"keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """Return value coerced to the hinted type, or raise a UserError naming the expected type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(h for h in options if h is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = typing.get_origin(hint) or hint
    if expected is bool and not isinstance(value, bool) or expected is not bool and isinstance(value, bool) \
            or not isinstance(value, expected):
        raise UserError(f"{where} = {value!r} should be of type {getattr(expected, '__name__', expected)}")
    return value


def _fill_dataclass(cls, section: str, values: dict) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"section '{section}' should be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown key '{section}.{key}'{_suggest(key, hints)}")
        kwargs[key] = _check_type(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _model_section(values: dict) -> ModelSection:
    if not isinstance(values, dict):
        raise UserError(f"section 'model' should be a mapping, got {values!r}")
    values = dict(values)
    family = values.pop("family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise UserError(f"model.family '{family}' is not known{_suggest(family, FAMILIES)}; "
                        f"known families: {', '.join(FAMILIES)}")
    spec = get_model_spec(family)
    try:
        typed = _fill_dataclass(spec.config_cls, "model", values)  # checks keys and types, and the family its values
    except ValueError as e:
        raise UserError(f"model section: {e}") from None
    return ModelSection(family=family, args={k: getattr(typed, k) for k in values})


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set '{assignment}' should look like section.key=value, e.g. train.steps=20")
    if section not in _SECTIONS:
        raise UserError(f"--set '{assignment}': unknown section '{section}'{_suggest(section, _SECTIONS)}")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise UserError(f"section '{section}' should be a mapping")
    try:
        raw[section][name] = _parse_yaml(text) if text else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set '{assignment}': the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                        f"it or complete it, e.g. train.steps=20 or data.splits=[98,2,0]") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML (or start from defaults when path is None), apply overrides, type-check everything."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist; pass a YAML file such as one of the tiny.yaml files under configs/")
        try:
            raw = _parse_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise UserError(f"config file '{path}' is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                            f"save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file '{path}' should hold a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        _apply_override(raw, assignment)
    for section in raw:
        if section not in _SECTIONS:
            raise UserError(f"unknown config section '{section}'{_suggest(section, _SECTIONS)}; "
                            f"sections are: {', '.join(_SECTIONS)}")
    sections = {name: _fill_dataclass(_SECTIONS[name], name, raw[name])
                for name in _SECTIONS if name != "model" and name in raw}
    cfg = Config(model=_model_section(raw.get("model", {})), **sections)
    if cfg.data.prepared and "vocab_size" not in raw["data"]:
        from data.build import prepared_vocab_size  # reads the prepared data's tokenizer

        cfg.data.vocab_size = prepared_vocab_size(cfg.data, get_model_spec(cfg.model.family).data.prepared_format)
    return cfg


def check_context_parallel(p: ParallelSection, dims: ParallelDims, seq_len: int) -> None:
    for name, value, options in (("cp_mode", p.cp_mode, CP_MODES), ("cp_layout", p.cp_layout, LAYOUT_KINDS),
                                 ("cp_kernel", p.cp_kernel, KERNEL_NAMES)):
        if value not in options:
            raise UserError(f"parallel.{name}='{value}' is not one of {', '.join(options)}{_suggest(value, options)}")
    if p.cp_mode == "hybrid" and (p.cp_ulysses < 2 or dims.cp % p.cp_ulysses or p.cp_ulysses == dims.cp):
        raise UserError(f"parallel.cp_mode=hybrid needs parallel.cp_ulysses to be a divisor of cp={dims.cp} between 2 "
                        f"and cp/2 (the ring runs over the rest)")
    if p.cp_mode != "hybrid" and p.cp_ulysses:
        raise UserError("parallel.cp_ulysses is only for cp_mode=hybrid; drop it or set cp_mode=hybrid")
    try:
        cp_layout(p, dims.cp).check(seq_len)
    except ValueError as e:
        raise UserError(f"train.seq_len: {e}") from None


def cp_layout(p: ParallelSection, cp: int) -> SequenceLayout:
    """How the sequence is spread over the cp ranks for these settings."""
    return sequence_layout(p.cp_mode, p.cp_layout, cp, p.cp_ulysses)


MAX_TIMEOUT_S = 10**9  # about 31 years: beyond what a datetime.timedelta (the collective timeout) holds, it overflows


def check_run_dir(run_dir: Path) -> None:
    """run.dir is a directory (or not there yet) whose checkpoints/latest, if any, is a UTF-8 text file."""
    run_dir = run_dir.expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir={run_dir} is a file, not a directory: set run.dir to a directory (new or a run's)")
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_dir():
        raise UserError(f"{latest} is a directory; it should be a text file naming a checkpoint (step-<N>): "
                        f"remove it, then write the name of a complete checkpoints/step-<N> into it, or use a new "
                        f"run.dir to start over")
    if latest.is_file():
        try:
            latest.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{latest} is not text (not UTF-8); it should name a checkpoint (step-<N>): write the "
                            f"name of a complete checkpoints/step-<N> into it, or use a new run.dir to start "
                            f"over") from None


ENGINES = ("torch", "deepspeed")


def check_engine(cfg: Config, dims: ParallelDims) -> None:
    """parallel.engine and its settings: what DeepSpeed's engine composes with (DeepSpeed's own check of the config
    generated from them follows in the trainer's preflight: launcher/deepspeed_engine.py)."""
    p, t = cfg.parallel, cfg.train
    if p.engine not in ENGINES:
        raise UserError(f"parallel.engine='{p.engine}' is not one of {', '.join(ENGINES)}{_suggest(p.engine, ENGINES)}")
    if p.engine == "torch":
        given = [name for name in ("deepspeed", "offload_optimizer", "offload_params") if getattr(p, name)]
        if given:
            raise UserError(f"parallel.{given[0]} is only read with parallel.engine=deepspeed; drop it or set the "
                            f"engine")
        return
    if p.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage={p.zero_stage} is not a ZeRO stage; use 1, 2 or 3")
    if p.zero_stage == 0:  # DeepSpeed steps the client optimizer itself there: no grad norm, no skip of NaN steps
        raise UserError("parallel.zero_stage=0 (DeepSpeed without ZeRO) is not supported; use 1, 2 or 3, or "
                        "parallel.engine=torch for replicated data parallelism (DDP)")
    if p.offload_params and p.zero_stage != 3:
        raise UserError("parallel.offload_params needs parallel.zero_stage=3 (only stage 3 partitions parameters)")
    # ZeRO shards over every rank; it has no place for the other mesh dims, and the model stays unwrapped.
    other = [f"parallel.{name}={getattr(dims, name)}" for name in ("tp", "pp", "cp", "ep", "dp_replicate")
             if getattr(dims, name) > 1]
    other += [f"train.{name}={getattr(t, name)}" for name, off in (("activation_checkpoint", "none"), ("compile", False))
              if getattr(t, name) != off]
    hooks = get_model_spec(cfg.model.family).hooks
    if hooks.after_backward or hooks.after_optimizer_step:  # they would read gradients / write weights ZeRO partitions
        other.append(f"model family {cfg.model.family} (its training hooks)")
    if other:
        raise UserError(f"parallel.engine=deepspeed is data parallel only (ZeRO over all {dims.world_size} ranks); "
                        f"{', '.join(other)} need parallel.engine=torch")


def validate(cfg: Config, world_size: int) -> ParallelDims:
    """Check the config against itself and the world; return the resolved layout."""
    try:
        p = cfg.parallel
        dims = ParallelDims.resolve(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, cp=p.cp, tp=p.tp, pp=p.pp,
                                    ep=p.ep, world_size=world_size)
    except LayoutError as e:
        raise UserError(str(e)) from None
    t = cfg.train
    at_least = {"train.steps": 1, "train.global_batch_size": 1, "train.micro_batch_size": 1, "train.seq_len": 1,
                "train.max_nonfinite_steps": 1, "train.warmup_steps": 0, "train.seed": 0, "train.eval_every": 0,
                "train.eval_batches": 1, "train.sample_tokens": 0, "train.lr": 0, "train.weight_decay": 0,
                "train.grad_clip": 0, "data.vocab_size": 1, "checkpoint.every": 0, "checkpoint.keep_last": 0,
                "run.max_restarts": 0, "run.timeout_s": 1, "run.log_every": 1, "run.stop_at_step": 0,
                "run.peak_flops": 0}
    # A NaN passes neither test: `not value >= least` refuses it, as `value < least` would not.
    for name, least in at_least.items():
        section, key = name.split(".")
        if not getattr(getattr(cfg, section), key) >= least:
            raise UserError(f"{name}={getattr(getattr(cfg, section), key)} must be >= {least}")
    within = {"train.beta1": (0, 1, False), "train.beta2": (0, 1, False), "train.min_lr_ratio": (0, 1, True),
              "train.decay_fraction": (0, 1, True), "run.timeout_s": (1, MAX_TIMEOUT_S, True),
              "train.lr": (0, math.inf, False), "run.peak_flops": (0, math.inf, False)}
    for name, (low, high, high_included) in within.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if not (low <= value <= high if high_included else low <= value < high):
            raise UserError(f"{name}={value} must be in [{low:g}, {high:g}{']' if high_included else ')'}")
    if not str(cfg.run.dir).strip():
        raise UserError("run.dir is empty: give the directory the run writes (e.g. runs/my-run)")
    if cfg.run.stop_at_step and not cfg.checkpoint.enabled:
        raise UserError(f"run.stop_at_step={cfg.run.stop_at_step} with checkpoint.enabled=false: the invocation would "
                        f"save nothing to continue from, and the next one would start again at step 0; enable "
                        f"checkpoints or drop run.stop_at_step")
    check_run_dir(Path(cfg.run.dir))
    if t.global_batch_size % (t.micro_batch_size * dims.dp):
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size x dp "
            f"= {t.micro_batch_size} x {dims.dp}; adjust one of them")
    choices = {"lr_schedule": ("cosine", "wsd", "constant"), "mixed_precision": ("auto", "bf16", "fp32"),
               "activation_checkpoint": AC_MODES, "nonfinite": ("stop", "skip")}
    for name, options in choices.items():
        if getattr(t, name) not in options:
            raise UserError(f"train.{name}='{getattr(t, name)}' is not one of {', '.join(options)}"
                            f"{_suggest(getattr(t, name), options)}")
    if dims.cp > 1:
        check_context_parallel(cfg.parallel, dims, t.seq_len)
    if dims.tp > 1 and cfg.parallel.sequence_parallel and (t.seq_len // dims.cp) % dims.tp:
        raise UserError(f"train.seq_len={t.seq_len} / cp={dims.cp} must be divisible by parallel.tp={dims.tp} for "
                        f"sequence parallelism; change seq_len or set parallel.sequence_parallel=false")
    check_engine(cfg, dims)
    if cfg.checkpoint.async_save and cfg.parallel.engine != "torch":
        raise UserError(f"checkpoint.async_save=true needs parallel.engine=torch ({cfg.parallel.engine} writes its "
                        f"own checkpoint files synchronously); set checkpoint.async_save=false")
    if cfg.parallel.async_tp and not t.compile:
        raise UserError("parallel.async_tp needs train.compile=true (torch fuses the TP collectives while compiling)")
    from data.build import check_data_config

    # Prepared datasets (of the kind the family reads): entries, splits, manifests, tokenizer, vocab.
    check_data_config(cfg.data, get_model_spec(cfg.model.family).data.prepared_format)
    try:
        model_cfg = cfg.model_config()
    except (TypeError, ValueError) as e:
        raise UserError(f"model section: {e}") from None
    spec = get_model_spec(cfg.model.family)
    problems = missing_pieces(spec.plan, dims)
    if dims.pp > 1 and spec.split_stage is None:
        problems.append(f"parallel.pp={dims.pp}: model family {cfg.model.family} has no pipeline split; set "
                        f"parallel.pp=1")
    elif dims.pp > 1:
        p = cfg.parallel
        n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
        try:
            per_rank = stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
            split_layers(spec.n_layers(model_cfg), dims.pp * per_rank, p.pp_layout)
        except PipelineError as e:
            raise UserError(str(e)) from None
        needed = dims.pp * per_rank if p.pp_schedule == "dualpipev" else 1 if p.pp_schedule == "gpipe" else dims.pp
        if n_micro < needed:
            raise UserError(f"parallel.pp_schedule={p.pp_schedule} needs at least {needed} micro-batches per step, "
                            f"has {n_micro} (global_batch_size / (micro_batch_size x dp)); lower micro_batch_size")
    if model_cfg.vocab_size != cfg.data.vocab_size:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} differs from data.vocab_size="
                        f"{cfg.data.vocab_size} (the tokenizer's); drop model.vocab_size or make them equal")
    problems += spec.check_layout(model_cfg, dims, cfg.parallelize_options())
    if spec.check_run is not None:  # what the config alone decides; each worker checks its device (launcher/trainer.py)
        problems += spec.check_run(model_cfg, RunContext(document_mask=cfg.data.document_mask))
    if problems:
        raise UserError("; ".join(problems))
    return dims
