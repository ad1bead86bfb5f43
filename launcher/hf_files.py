"""The files of a Hugging Face model directory, written by transformers', huggingface_hub's and safetensors' own
code: safetensors weights (one file, or shards with model.safetensors.index.json, split as huggingface_hub
splits them), config.json, generation_config.json, and the tokenizer (tokenizer.json, tokenizer_config.json).
The one exception: the config.json of a model type whose class is not in transformers (write_config_json).

The weights are written a shard at a time: the caller gives their names and shapes (meta tensors) and a reader
of named tensors, so a process holds one shard, not the model.

The tokenizer is this project's sentencepiece model converted by transformers' SpmConverter, which follows
the model's own normalizer settings (no dummy prefix, spaces escaped, byte fallback), so
AutoTokenizer.from_pretrained encodes text to the same ids. It adds no BOS/EOS (our data appends an EOS
after each document itself), and it encodes "<s>" written in text as text, as sentencepiece does.
"""
import json
from collections.abc import Callable
from pathlib import Path

import torch

from launcher.errors import UserError

# What one shard holds, so also what an export holds in memory at once; loaders take any size (transformers itself
# writes 5GB shards by default).
MAX_SHARD_SIZE = "2GB"


def check_max_shard_size(max_shard_size: int | str) -> None:
    """Refuse a shard size huggingface_hub's splitter cannot read (e.g. "abc"), before anything is read or written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    try:
        split_torch_state_dict_into_shards({"probe": torch.empty(1, device="meta")}, max_shard_size=max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size {max_shard_size}: {e}") from None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("writing a Hugging Face directory needs transformers: pip install 'shardwright[hf]'") from None
    return transformers


def write_config_json(directory: Path, fields: dict, dtype: torch.dtype, transformers_version: str) -> None:
    """config.json of a model type that transformers itself does not know (its class lives in another package,
    e.g. flash-linear-attention's "delta_net"): `fields` as they are, laid out as save_pretrained lays them out.
    Written whether or not that package is importable, so that the file does not depend on it (the package's
    config class would add its defaults, and those change between its versions)."""
    fields = {**fields, "dtype": str(dtype).removeprefix("torch."), "transformers_version": transformers_version}
    (directory / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def write_hf_directory(directory: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer_model: Path,
                       dtype: torch.dtype, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """Write the model `tensors` (HF names) in `dtype` with its `config` (config.json fields, model_type
    included) and the sentencepiece `tokenizer_model` into the existing `directory`."""
    write_hf_files(directory, tensors, lambda names: {name: tensors[name] for name in names}, config, tokenizer_model,
                   dtype, max_shard_size)


def write_hf_files(directory: Path, layout: dict[str, torch.Tensor], read: Callable[[list[str]], dict[str, torch.Tensor]],
                   config: dict, tokenizer_model: Path, dtype: torch.dtype,
                   max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """write_hf_directory of the tensors named and shaped by `layout` (meta tensors will do), read a shard at a
    time: `read(names)` returns those tensors (best already in `dtype`: a shard is held once in each dtype)."""
    transformers = _transformers()
    from huggingface_hub import constants, split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    sp = SentencePieceProcessor(model_file=str(tokenizer_model))
    special = {f"{role}_token": sp.id_to_piece(token_id) for role, token_id in
               (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))
               if token_id >= 0}
    token_ids = {f"{role}_token_id": token_id for role, token_id in
                 (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())) if token_id >= 0}

    if config["model_type"] in CONFIG_MAPPING_NAMES:
        model_config = transformers.AutoConfig.for_model(**config, **token_ids, dtype=dtype)
        model_config.save_pretrained(directory)
        transformers.GenerationConfig.from_model_config(model_config).save_pretrained(directory)
    else:
        write_config_json(directory, {**config, **token_ids}, dtype, transformers.__version__)
        transformers.GenerationConfig(**token_ids).save_pretrained(directory)
    split = split_torch_state_dict_into_shards({name: torch.empty(t.shape, dtype=dtype, device="meta")
                                                for name, t in layout.items()}, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():  # one shard alive at a time
        save_file({name: tensor.to(dtype).contiguous() for name, tensor in read(names).items()}, directory / file,
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2))

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    bpe = proto.trainer_spec.model_type == model_pb2.TrainerSpec.BPE
    # BPE takes the vocabulary by id (merges follow from the scores), unigram the pieces with their scores.
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)} if bpe else [(p.piece, p.score) for p in proto.pieces]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, split_special_tokens=True,
                                         **special).save_pretrained(directory)
