"""A sentencepiece tokenizer: train one from documents, load one from a .model file."""

import hashlib
from pathlib import Path

import sentencepiece as spm

from data.errors import DataError

# Paragraphs are the training sentences: long enough to learn "\n" and indentation pieces,
# short enough for sentencepiece. A longer paragraph is fed line by line.
MAX_SENTENCE_BYTES = 16384
# Bounds training time and memory (~5 s on 2 cores); larger corpora are subsampled evenly.
MAX_TRAINING_SENTENCES = 200_000


class Tokenizer:
    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        try:
            model_bytes = self.model_path.read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"cannot load tokenizer {self.model_path} ({e}): give the path of a sentencepiece "
                ".model file, or delete the data cache dir and prepare it again"
            ) from None
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])  # also takes a tensor or array


def train_tokenizer(documents: list[str], model_prefix: Path, vocab_size: int) -> Path:
    """Train a byte-fallback BPE tokenizer; returns the path of the .model file."""
    sentences = _training_sentences(documents)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,  # any text encodes, nothing becomes <unk>
            character_coverage=1.0,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            # Keep text exactly as written (code, indentation, newlines), so decode(encode(s)) == s.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        reason = str(e).split("] ", 1)[-1]
        raise DataError(
            f"cannot train a {vocab_size}-token tokenizer on {len(documents)} documents: {reason}"
        ) from None
    return Path(f"{model_prefix}.model")


def _training_sentences(documents: list[str]) -> list[str]:
    sentences = []
    for doc in documents:
        for paragraph in doc.split("\n\n"):
            if len(paragraph.encode()) <= MAX_SENTENCE_BYTES:
                sentences.append(paragraph)
            else:
                sentences += paragraph.split("\n")
    sentences = [s for s in sentences if s.strip()]
    # An even stride, not sentencepiece's random sampling, keeps the tokenizer reproducible.
    stride = max(1, -(-len(sentences) // MAX_TRAINING_SENTENCES))
    return sentences[::stride]
