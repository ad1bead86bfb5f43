"""`shardwright prepare` and `shardwright tokenizer train`: raw corpus files -> a tokenizer and
prepared (tokenized, megatron .bin/.idx) datasets that `data.prepared` points training at; with
--image-column, image-text corpora -> prepared image-text datasets (for image-text model families)."""
import argparse

from data.errors import DataError
from data.images import MAX_SIDE
from data.prepare import DEFAULT_SHARD_TOKENS
from data.prepare_images import DEFAULT_SHARD_PATCHES
from data.sources import TEXT_UNITS

_FORMATS = ("json", "parquet", "arrow", "text")


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, quoted globs ('data/**/*.jsonl') or directories: .jsonl/.json, .parquet, .arrow, "
                             ".txt (.gz/.bz2/.xz/.zst for json and text)")
    parser.add_argument("--text-field", default="text", help="the field holding the text (json, parquet, arrow)")
    parser.add_argument("--text-unit", choices=TEXT_UNITS, default="document",
                        help="plain text files: one document per file, per blank-line separated paragraph, or per "
                             "line (default: document)")
    parser.add_argument("--format", dest="fmt", choices=_FORMATS, default=None,
                        help="read every input as this format, whatever its extension")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file (see `tokenizer train`)")
    parser.add_argument("--output", required=True, help="dataset directory to write (data.prepared points at it)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--bos", action="store_true", help="start every document with BOS (EOS always ends it)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"start a new .bin/.idx shard after this many tokens (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on a terminal)")
    images = parser.add_argument_group("image-text corpora: parquet/arrow with an image column, imagefolder "
                                       "directories with a metadata.jsonl")
    images.add_argument("--image-column", nargs="?", const="", default=None, metavar="NAME",
                        help="prepare images and their captions (--text-field) instead of text; NAME is the column of "
                             "encoded images, default the one column with an HF Image feature")
    images.add_argument("--max-image-side", type=int, default=None,
                        help=f"resize the long side to at most this, a multiple of 32 (default {MAX_SIDE})")
    images.add_argument("--skip-broken-images", action="store_true",
                        help="leave out (and count) images that cannot be decoded instead of stopping")
    images.add_argument("--shard-patches", type=int, default=None,
                        help=f"start a new shard after this many patches (default {DEFAULT_SHARD_PATCHES})")


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = actions.add_parser("train", help="train a sentencepiece tokenizer on a sample of a corpus")
    _add_input_arguments(train)
    train.add_argument("--output", required=True, help="where to write the model (.model is appended if missing)")
    train.add_argument("--vocab-size", type=int, required=True, help="pieces to train (before padding)")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                       help="user-defined tokens that always encode as one piece, e.g. '<image>'")
    train.add_argument("--pad-to-multiple-of", type=int, default=128,
                       help="pad the vocab with unused pieces to a multiple of this (TP splits the embedding "
                            "evenly; default 128)")
    train.add_argument("--sample-documents", type=int, default=100_000,
                       help="train on a uniform sample of this many documents (default 100000)")
    train.add_argument("--seed", type=int, default=0, help="seed of the document sample")


def prepare_command(args) -> int:
    if args.image_column is not None:
        return _prepare_images(args)
    image_only = [flag for flag, value in (("--max-image-side", args.max_image_side), ("--shard-patches",
                  args.shard_patches), ("--skip-broken-images", args.skip_broken_images or None)) if value is not None]
    if image_only:
        raise DataError(f"{', '.join(image_only)}: only for image-text corpora; add --image-column")
    from data.prepare import prepare

    prepare(args.inputs, args.output, args.tokenizer, text_field=args.text_field, text_unit=args.text_unit,
            fmt=args.fmt, num_proc=args.num_proc, bos=args.bos, shard_tokens=args.shard_tokens, force=args.force,
            progress=False if args.no_progress else None, log=lambda line: print(line, flush=True))
    return 0


def _prepare_images(args) -> int:
    text_only = [flag for flag, given in (("--bos", args.bos), ("--text-unit", args.text_unit != "document"),
                                          ("--shard-tokens", args.shard_tokens != DEFAULT_SHARD_TOKENS)) if given]
    if text_only:
        raise DataError(f"{', '.join(text_only)}: only for text corpora, not with --image-column; drop it")
    from data.prepare_images import prepare_image_text

    prepare_image_text(args.inputs, args.output, args.tokenizer, image_column=args.image_column or None,
                       text_field=args.text_field, fmt=args.fmt,
                       max_side=MAX_SIDE if args.max_image_side is None else args.max_image_side,
                       skip_broken_images=args.skip_broken_images, num_proc=args.num_proc,
                       shard_patches=DEFAULT_SHARD_PATCHES if args.shard_patches is None else args.shard_patches,
                       force=args.force, progress=False if args.no_progress else None,
                       log=lambda line: print(line, flush=True))
    return 0


def tokenizer_command(args) -> int:
    from data.tokenizer_train import train_from_files

    train_from_files(args.inputs, args.output, args.vocab_size, model_type=args.model_type,
                     special_tokens=args.special_tokens, pad_to_multiple_of=args.pad_to_multiple_of,
                     text_field=args.text_field, text_unit=args.text_unit, fmt=args.fmt,
                     sample_documents=args.sample_documents, seed=args.seed, force=args.force,
                     log=lambda line: print(line, flush=True))
    return 0
