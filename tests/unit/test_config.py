"""launcher.config: YAML + `--set` overrides -> typed Config, clear UserErrors, validation, round trip."""
import dataclasses
import typing

import pytest
import yaml

from launcher.config import (CheckpointSection, Config, DataSection, ParallelSection, RunSection, TrainSection,
                             load_config, validate)
from launcher.errors import UserError
from models import get_model_spec
from tests.conftest import REPO, TINY

RAW = yaml.safe_load(TINY.read_text())
SECTION_CLASSES = {"parallel": ParallelSection, "train": TrainSection, "data": DataSection,
                   "checkpoint": CheckpointSection, "run": RunSection}


def _error(path=TINY, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def _invalid(world_size: int, *overrides: str) -> str:
    cfg = load_config(TINY, list(overrides))
    with pytest.raises(UserError) as info:
        validate(cfg, world_size)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- loading


def test_tiny_loads_with_the_file_values_and_defaults_elsewhere():
    cfg = load_config(TINY)
    assert isinstance(cfg, Config)
    assert cfg.model.family == RAW["model"]["family"]
    assert cfg.model.args == {k: v for k, v in RAW["model"].items() if k != "family"}
    for section, cls in SECTION_CLASSES.items():
        got = getattr(cfg, section)
        assert isinstance(got, cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(got, f.name)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # lists: a factory
            expected = RAW.get(section, {}).get(f.name, default)
            assert value == expected, f"{section}.{f.name}"
            assert type(value) is hints[f.name], f"{section}.{f.name} is {type(value).__name__}"


def test_tiny_model_config_is_typed_and_takes_vocab_from_data():
    cfg = load_config(TINY)
    model_cfg = cfg.model_config()
    assert isinstance(model_cfg, get_model_spec("llm").config_cls)
    for key, value in RAW["model"].items():
        if key != "family":
            assert getattr(model_cfg, key) == value
    assert "vocab_size" not in RAW["model"]
    assert model_cfg.vocab_size == RAW["data"]["vocab_size"] == cfg.data.vocab_size


def test_no_path_gives_defaults():
    assert load_config(None) == Config()


@pytest.mark.parametrize("assignment, section, key, expected", [
    ("train.steps=7", "train", "steps", 7),
    ("train.lr=1.0e-4", "train", "lr", 1e-4),
    ("train.lr=2", "train", "lr", 2.0),  # an int where a float is expected is widened
    ("train.min_lr_ratio=0.25", "train", "min_lr_ratio", 0.25),
    ("train.compile=true", "train", "compile", True),
    ("run.tensorboard=false", "run", "tensorboard", False),
    ("train.lr_schedule=wsd", "train", "lr_schedule", "wsd"),
    ("run.dir=/tmp/some where", "run", "dir", "/tmp/some where"),
    ("train.sample_prompt=", "train", "sample_prompt", ""),
    ("parallel.dp_shard=-1", "parallel", "dp_shard", -1),
])
def test_set_overrides_use_yaml_typing(assignment, section, key, expected):
    cfg = load_config(TINY, [assignment])
    value = getattr(getattr(cfg, section), key)
    assert value == expected and type(value) is type(expected)
    # Everything else is untouched.
    base = load_config(TINY)
    setattr(getattr(base, section), key, expected)
    assert cfg == base


@pytest.mark.parametrize("text", ["1e-4", "3E-3", "2e5"])
def test_float_in_plain_exponent_notation(text, tmp_path):
    assert load_config(None, [f"train.lr={text}"]).train.lr == float(text)
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    assert load_config(path).train.lr == float(text)


def test_set_overrides_model_args_including_null_for_optional():
    cfg = load_config(TINY, ["model.ffn_dim_multiplier=1.5", "model.n_layers=2"])
    assert cfg.model.args["ffn_dim_multiplier"] == 1.5 and cfg.model.args["n_layers"] == 2
    assert cfg.model_config().ffn_dim_multiplier == 1.5
    cfg = load_config(TINY, ["model.ffn_dim_multiplier=1.5", "model.ffn_dim_multiplier=null"])
    assert cfg.model.args["ffn_dim_multiplier"] is None
    assert cfg.model_config().ffn_dim_multiplier is None


def test_later_override_wins_and_overrides_apply_without_a_file():
    cfg = load_config(None, ["train.steps=3", "train.steps=5", "checkpoint.enabled=false"])
    assert cfg.train.steps == 5 and cfg.checkpoint.enabled is False
    assert cfg.train.lr == TrainSection().lr


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("assignment, fragment", [
    ("train.global_batch_sz=4", "did you mean 'global_batch_size'"),
    ("train.micro_batch=4", "did you mean 'micro_batch_size'"),
    ("run.log_evry=3", "did you mean 'log_every'"),
    ("model.n_layer=3", "did you mean 'n_layers'"),
    ("model.n_kv_head=1", "did you mean 'n_kv_heads'"),
])
def test_unknown_key_suggests_the_closest(assignment, fragment):
    message = _error(overrides=[assignment])
    assert fragment in message
    assert assignment.split("=")[0] in message  # names the offending key with its section


def test_unknown_key_with_nothing_close_still_names_it():
    message = _error(overrides=["train.zzzzqqq=1"])
    assert "train.zzzzqqq" in message and "did you mean" not in message


def test_unknown_section_in_override_and_in_file(tmp_path):
    message = _error(overrides=["trian.steps=3"])
    assert "trian" in message and "did you mean 'train'" in message
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**RAW, "chekpoint": {"every": 1}}))
    message = _error(bad)
    assert "chekpoint" in message and "did you mean 'checkpoint'" in message


def test_unknown_model_family_names_the_known_ones():
    message = _error(overrides=["model.family=llama"])
    assert "llama" in message and "llm" in message


@pytest.mark.parametrize("assignment, key, type_name", [
    ("train.steps=ten", "train.steps", "int"),
    ("train.steps=1.5", "train.steps", "int"),
    ("train.steps=true", "train.steps", "int"),  # bool is not an int here
    ("train.steps=null", "train.steps", "int"),  # not Optional
    ("train.compile=1", "train.compile", "bool"),
    ("train.lr=fast", "train.lr", "float"),
    ("train.lr=true", "train.lr", "float"),
    ("run.dir=[a, b]", "run.dir", "str"),
    ("model.dim=big", "model.dim", "int"),
    ("model.ffn_dim_multiplier=lots", "model.ffn_dim_multiplier", "float"),
])
def test_wrong_type_names_key_and_expected_type(assignment, key, type_name):
    message = _error(overrides=[assignment])
    assert key in message and type_name in message


def test_wrong_type_in_file_is_caught(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**RAW, "train": {**RAW["train"], "seq_len": "long"}}))
    message = _error(bad)
    assert "train.seq_len" in message and "int" in message


@pytest.mark.parametrize("assignment", ["train.steps", "steps=3", "train.=3", "=3", ""])
def test_malformed_set(assignment):
    assert "section.key=value" in _error(overrides=[assignment])


def test_empty_section_name_is_rejected():
    assert "'.steps=3'" in _error(overrides=[".steps=3"])


def test_section_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 5\n")
    assert "train" in _error(bad)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _error(missing)
    assert str(missing) in message and "does not exist" in message


@pytest.mark.parametrize("text", ["train: [1, 2\nmodel: {", "train:\n  steps: 1\n bad indent: 2\n"])
def test_invalid_yaml_names_the_file(tmp_path, text):
    bad = tmp_path / "broken.yaml"
    bad.write_text(text)
    message = _error(bad)
    assert str(bad) in message and "YAML" in message


def test_top_level_not_a_mapping_names_the_file(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    assert str(bad) in _error(bad)


# ------------------------------------------------------------------------------------------ validate


def test_tiny_validates_on_one_process():
    dims = validate(load_config(TINY), 1)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.pp, dims.ep) == (1, 1, 1, 1, 1, 1)
    assert dims.world_size == 1 and dims.dp == 1


@pytest.mark.parametrize("world, dp_replicate", [(4, 2), (4, 1), (6, 3), (2, 2)])
def test_dp_shard_minus_one_takes_the_rest(world, dp_replicate):
    cfg = load_config(TINY, [f"parallel.dp_replicate={dp_replicate}", "parallel.dp_shard=-1",
                             f"train.global_batch_size={world * 4}", "train.micro_batch_size=4"])
    dims = validate(cfg, world)
    assert dims.dp_shard == world // dp_replicate
    assert dims.dp_replicate * dims.dp_shard == dims.dp == world


def test_product_not_world_size_mentions_both_numbers():
    message = _invalid(8, "parallel.dp_replicate=1", "parallel.dp_shard=3")
    assert "3" in message and "8" in message
    message = _invalid(4, "parallel.dp_replicate=2", "parallel.dp_shard=3")
    assert "6" in message and "4" in message


def test_world_not_divisible_by_fixed_dims():
    message = _invalid(3, "parallel.dp_replicate=2")
    assert "3" in message and "2" in message


def test_expert_parallelism_needs_experts():
    message = _invalid(2, "parallel.ep=2", "train.micro_batch_size=4")
    assert "parallel.ep=2 splits experts, but this model has none" in message


def test_tp_must_divide_heads_and_lists_the_values_that_work():
    message = _invalid(3, "parallel.tp=3", "parallel.dp_shard=1", "parallel.sequence_parallel=false")
    assert "parallel.tp=3 does not divide model n_heads 4" in message and "n_kv_heads 2" in message
    assert message.endswith("tp values that work for this model: [2, 4]")  # kv heads 2 are replicated at tp=4


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    message = _invalid(2, "parallel.tp=2", "train.seq_len=127")
    assert "train.seq_len=127" in message and "sequence_parallel=false" in message
    assert validate(load_config(TINY, ["parallel.tp=2", "train.seq_len=127", "parallel.sequence_parallel=false"]),
                    2).tp == 2


@pytest.mark.parametrize("overrides, fragment", [
    (["train.seq_len=100", "parallel.cp=4"], "not divisible by 2 x cp = 8"),
    (["parallel.cp=2", "parallel.cp_mode=ulyses"], "did you mean 'ulysses'"),
    (["parallel.cp=2", "parallel.cp_layout=spiral"], "zigzag, contiguous"),
    (["parallel.cp=4", "parallel.cp_mode=hybrid"], "cp_ulysses to be a divisor of cp=4"),
    (["parallel.cp=2", "parallel.cp_ulysses=2"], "only for cp_mode=hybrid"),
    (["parallel.cp=8", "parallel.cp_mode=ulysses"], "4 attention heads of a tp rank over 8"),
])
def test_context_parallel_layouts_are_checked(overrides, fragment):
    world = 8 if "parallel.cp=8" in overrides else 4 if "parallel.cp=4" in overrides else 2
    assert fragment in _invalid(world, *overrides, "parallel.dp_shard=1")


def test_deltanet_refuses_the_zigzag_layout_before_any_process_group():
    """State passing needs the sequence in rank order; the model's check sees the parallel options."""
    config = REPO / "configs" / "deltanet" / "hybrid-tiny.yaml"
    with pytest.raises(UserError, match="needs parallel.cp_layout=contiguous"):
        validate(load_config(config, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_layout=zigzag"]), 2)
    assert validate(load_config(config, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_layout=contiguous"]),
                    2).cp == 2


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.pp=3", "train.global_batch_size=24", "train.micro_batch_size=2"], "4 layers do not split evenly into 3"),
    (["parallel.pp=4", "parallel.pp_schedule=interleaved-1f1b", "parallel.pp_stages_per_rank=2"],
     "8 pipeline stages but only 4 layers"),
    (["parallel.pp=2", "train.micro_batch_size=16"], "needs at least 2 micro-batches per step, has 1"),
    (["parallel.pp=2", "train.micro_batch_size=8", "parallel.pp_schedule=dualpipev", "parallel.pp_stages_per_rank=2"],
     "needs at least 4 micro-batches per step, has 2"),
    (["parallel.pp=2", "parallel.pp_schedule=1f1b-zero"], "does not exist; choose one of gpipe, 1f1b"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv"], "pp_stages_per_rank=2"),
    (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], "runs one stage per rank"),
    (["parallel.pp=2", "parallel.pp_layout=E,L2|L1,H"], "places 3 layers but the model has 4"),
    (["parallel.pp=2", "parallel.pp_layout=E,L2|E,L2,H"], "'E' in stage 1 is not E (first stage)"),
    (["parallel.pp=2", "model.tie_embeddings=true"], "untie them"),
])
def test_pipeline_layouts_are_checked(overrides, fragment):
    world = int(overrides[0].split("=")[1])
    assert fragment in _invalid(world, *overrides, "parallel.dp_shard=1")


def test_async_tp_needs_compile():
    assert "train.compile=true" in _invalid(2, "parallel.tp=2", "parallel.async_tp=true")


@pytest.mark.parametrize("assignment", ["parallel.dp_replicate=0", "parallel.dp_shard=0", "parallel.dp_shard=-2"])
def test_nonpositive_dims(assignment):
    assert assignment.split("=")[0] in _invalid(1, assignment)


def test_heads_not_divisible_by_kv_heads():
    message = _invalid(1, "model.n_heads=4", "model.n_kv_heads=3")
    assert "n_heads=4" in message and "n_kv_heads=3" in message


def test_dim_not_divisible_by_heads():
    message = _invalid(1, "model.dim=100", "model.n_heads=3", "model.n_kv_heads=1")
    assert "dim=100" in message and "n_heads=3" in message


def test_odd_head_dim_rejected_for_rope():
    message = _invalid(1, "model.dim=36", "model.n_heads=4", "model.n_kv_heads=2")  # head dim 9
    assert "9" in message and "even" in message


@pytest.mark.parametrize("world, gbs, mbs", [(1, 12, 8), (2, 8, 8), (4, 24, 4)])
def test_global_batch_not_a_multiple_of_micro_times_dp(world, gbs, mbs):
    message = _invalid(world, f"train.global_batch_size={gbs}", f"train.micro_batch_size={mbs}")
    assert f"global_batch_size={gbs}" in message and str(mbs) in message and str(world) in message


def test_global_batch_that_is_a_multiple_is_accepted():
    validate(load_config(TINY, ["train.global_batch_size=24", "train.micro_batch_size=4"]), 2)


@pytest.mark.parametrize("key", ["steps", "global_batch_size", "micro_batch_size", "seq_len"])
def test_train_sizes_must_be_positive(key):
    assert f"train.{key}=0" in _invalid(1, f"train.{key}=0")


@pytest.mark.parametrize("overrides, message", [
    (("train.eval_batches=0",), "train.eval_batches=0 must be >= 1"),  # the run's final eval would have nothing
    (("train.eval_every=-2",), "train.eval_every=-2 must be >= 0"),
    (("train.warmup_steps=-1",), "train.warmup_steps=-1 must be >= 0"),  # would shift the cosine
    (("train.seed=-1",), "train.seed=-1 must be >= 0"),  # numpy's generators take no negative seed
    # torch's AdamW raised these mid-start (a traceback), or the run went on silently (negative lr: ascent)
    (("train.lr=-1",), "train.lr=-1.0 must be >= 0"),
    (("train.lr=.nan",), "train.lr=nan must be >= 0"),
    (("train.beta1=1.5",), "train.beta1=1.5 must be in [0, 1)"),
    (("train.weight_decay=-1",), "train.weight_decay=-1.0 must be >= 0"),
    (("train.grad_clip=-1",), "train.grad_clip=-1.0 must be >= 0"),
    (("train.min_lr_ratio=-1",), "train.min_lr_ratio=-1.0 must be in [0, 1]"),
    (("train.decay_fraction=2",), "train.decay_fraction=2.0 must be in [0, 1]"),
    (("train.sample_tokens=-1",), "train.sample_tokens=-1 must be >= 0"),
    (("run.timeout_s=99999999999999",), "run.timeout_s=99999999999999 must be in [1, 1e+09]"),  # overflowed timedelta
    (("run.peak_flops=.inf",), "run.peak_flops=inf must be in [0, inf)"),
    (("run.dir=",), "run.dir is empty"),  # wrote into the current directory
    (("run.stop_at_step=2", "checkpoint.enabled=false"), "run.stop_at_step=2 with checkpoint.enabled=false"),
])
def test_eval_warmup_and_seed_ranges(overrides, message):
    """eval_batches 0 crashed the run's last line; a negative warmup shifted the schedule; a negative seed crashed
    the loader on every rank."""
    error = _invalid(1, *overrides)
    assert message in error and "\n" not in error, error


@pytest.mark.parametrize("overrides", [("train.warmup_steps=0",), ("train.steps=5", "train.warmup_steps=20"),
                                       ("train.eval_batches=1", "train.eval_every=0")])
def test_eval_and_warmup_limits_pass(overrides):
    validate(load_config(TINY, list(overrides)), 1)


def test_a_warmup_covering_the_whole_run_is_said():
    """A short run of a config made for longer ones (warmup 20, 5 steps) trains, and its log says the learning
    rate never reaches its peak; a warmup shorter than the run says nothing."""
    from launcher.optim import schedule_note

    note = schedule_note(load_config(TINY, ["train.steps=5", "train.warmup_steps=20"]).train)
    assert note == ("train.warmup_steps=20 >= train.steps=5: the learning rate rises for the whole run, its last "
                    "update at 0.25 x train.lr=0.003, and never decays")
    assert schedule_note(load_config(TINY, ["train.steps=21", "train.warmup_steps=20"]).train) is None


@pytest.mark.parametrize("key, bad, options", [
    ("lr_schedule", "linear", ("cosine", "wsd", "constant")),
    ("mixed_precision", "fp16", ("auto", "bf16", "fp32")),
    ("activation_checkpoint", "partial", ("none", "full", "selective")),
])
def test_bad_choice_lists_valid_options(key, bad, options):
    message = _invalid(1, f"train.{key}={bad}")
    assert f"train.{key}" in message and bad in message
    for option in options:
        assert option in message


@pytest.mark.parametrize("key, value", [("lr_schedule", "wsd"), ("lr_schedule", "constant"),
                                        ("mixed_precision", "bf16"), ("activation_checkpoint", "selective")])
def test_good_choices_pass(key, value):
    validate(load_config(TINY, [f"train.{key}={value}"]), 1)


def test_model_vocab_must_match_data_vocab():
    message = _invalid(1, "model.vocab_size=100")
    assert "100" in message and str(RAW["data"]["vocab_size"]) in message
    validate(load_config(TINY, [f"model.vocab_size={RAW['data']['vocab_size']}"]), 1)


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("overrides", [
    [],
    ["model.ffn_dim_multiplier=null", "model.norm_eps=1.0e-6", "train.lr=1.5e-4", "train.sample_prompt='yes'",
     "train.compile=true", "run.dir='0123'", "train.lr_schedule=wsd", "data.source=stdlib", "parallel.dp_replicate=2"],
])
def test_dump_then_load_round_trips(tmp_path, overrides):
    cfg = load_config(TINY, overrides)
    path = tmp_path / "config.yaml"
    cfg.dump(path)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    again = load_config(path)
    assert again == cfg
    assert type(again.train.lr) is float and again.model.args == cfg.model.args


def test_dump_of_defaults_round_trips(tmp_path):
    path = tmp_path / "config.yaml"
    Config().dump(path)
    assert load_config(path) == Config()


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_passes_its_own_checks(config):
    """Each config under configs/ loads and its layout fits its model, on the smallest world it implies
    (its fixed dims x dp_shard 2, or ep: experts borrow dp_shard ranks), as `train` would check it
    before starting any process."""
    cfg = load_config(REPO / config)
    p = cfg.parallel
    world = p.dp_replicate * p.tp * p.pp * p.cp * (max(2, p.ep) if p.dp_shard == -1 else p.dp_shard)
    assert validate(cfg, world).world_size == world
