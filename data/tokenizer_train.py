"""`shardwright tokenizer train`: a sentencepiece model from a sample of a raw corpus."""

import os
import random
import shutil
import tempfile
from pathlib import Path

from data.errors import DataError
from data.sources import iter_text_batches, resolve_inputs
from data.tokenizer import MAX_TRAINING_SENTENCES, Tokenizer, pad_vocab, train_tokenizer

MODEL_TYPES = ("bpe", "unigram")


def train_from_files(inputs: list[str], output: str | Path, vocab_size: int, *, model_type: str = "bpe",
                     special_tokens: list[str] = (), pad_to_multiple_of: int = 128, text_field: str = "text",
                     text_unit: str = "document", fmt: str | None = None, sample_documents: int = 100_000,
                     max_sentences: int = MAX_TRAINING_SENTENCES, seed: int = 0, force: bool = False,
                     log=print) -> Tokenizer:
    """Train on a uniform sample of `sample_documents` documents of the corpus (reservoir
    sampling: the whole corpus is read once, the sample depends only on it and `seed`), pad the
    vocab to a multiple of `pad_to_multiple_of` with never-used pieces, write OUTPUT(.model)."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type {model_type} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 1 or pad_to_multiple_of < 1 or sample_documents < 1:
        raise DataError("--vocab-size, --pad-to-multiple-of and --sample-documents must be >= 1")
    output = Path(output).expanduser()
    if output.suffix != ".model":
        output = output.with_name(output.name + ".model")
    if output.exists() and not force:
        raise DataError(f"{output} already exists: pass --force to replace it, or choose another --output")
    special_tokens = list(dict.fromkeys(special_tokens))  # order kept, duplicates dropped
    files = resolve_inputs(list(inputs), fmt)

    rng = random.Random(seed)
    sample, seen = [], 0
    for _path, texts in iter_text_batches(files, text_field, text_unit, fmt):
        for text in texts:
            if not text or text.isspace():
                continue
            if len(sample) < sample_documents:
                sample.append(text)
            else:
                j = rng.randrange(seen + 1)
                if j < sample_documents:
                    sample[j] = text
            seen += 1
    if not sample:
        raise DataError(f"the corpus ({', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}) has no "
                        "non-empty documents to train a tokenizer on: check the inputs and --text-field")
    log(f"training a {model_type} tokenizer (vocab {vocab_size}, special tokens: {special_tokens or 'none'}) on "
        f"{len(sample)} of {seen} documents from {len(files)} file(s)...")
    output.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model = train_tokenizer(sample, workdir / "tokenizer", vocab_size, model_type=model_type,
                                user_defined_symbols=special_tokens, max_sentences=max_sentences)
        padded = pad_vocab(model, pad_to_multiple_of, model_prefix=output.stem)
        Tokenizer(model)  # loads: checked before it replaces anything
        os.replace(model, output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    tokenizer = Tokenizer(output)
    ids = {t: tokenizer._sp.piece_to_id(t) for t in special_tokens}
    log(f"wrote {output}: vocab {tokenizer.vocab_size} ({vocab_size} trained + {padded} unused padding to a "
        f"multiple of {pad_to_multiple_of}), fingerprint {tokenizer.fingerprint}, unk/bos/eos/pad ids 0/1/2/3"
        + (f", special token ids {ids}" if ids else ""))
    return tokenizer
