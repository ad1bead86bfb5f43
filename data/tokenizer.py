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


def train_tokenizer(documents: list[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
                    user_defined_symbols: list[str] = (), max_sentences: int = MAX_TRAINING_SENTENCES) -> Path:
    """Train a byte-fallback BPE (or unigram) tokenizer; returns the path of the .model file.
    user_defined_symbols always encode as one piece each (e.g. "<image>")."""
    if vocab_size < 1:  # sentencepiece gives no reason for this one
        raise DataError(f"cannot train a tokenizer of {vocab_size} pieces: set a vocab size of a few thousand, "
                        f"e.g. 4096")
    sentences = _training_sentences(documents, max_sentences)
    extra = {"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
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
            **extra,
        )
    except RuntimeError as e:
        reason = str(e).split("] ", 1)[-1]
        raise DataError(
            f"cannot train a {vocab_size}-token tokenizer on {len(documents)} documents: {reason}"
        ) from None
    model = Path(f"{model_prefix}.model")
    pad_vocab(model, 1, model_prefix=model_prefix.name)  # record no directory: same file wherever trained
    return model


def _training_sentences(documents: list[str], max_sentences: int = MAX_TRAINING_SENTENCES) -> list[str]:
    sentences = []
    for doc in documents:
        for paragraph in doc.split("\n\n"):
            if len(paragraph.encode()) <= MAX_SENTENCE_BYTES:
                sentences.append(paragraph)
            else:
                sentences += paragraph.split("\n")
    sentences = [s for s in sentences if s.strip()]
    # An even stride, not sentencepiece's random sampling, keeps the tokenizer reproducible.
    stride = max(1, -(-len(sentences) // max_sentences))
    return sentences[::stride]


def pad_vocab(model_path: Path, multiple: int, model_prefix: str | None = None) -> int:
    """Append never-produced (UNUSED) pieces `<unused_N>` to the .model file until its vocab
    size is a multiple of `multiple` (so embedding rows split evenly over TP ranks); returns
    the number added. model_prefix replaces the training path recorded in the file (so the
    file, and its fingerprint, do not depend on where it was trained)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if model_prefix is not None:
        proto.trainer_spec.model_prefix = model_prefix
    missing = -len(proto.pieces) % multiple
    if missing:
        existing = {p.piece for p in proto.pieces}
        added, n = 0, 0
        while added < missing:
            name, n = f"<unused_{n}>", n + 1
            if name in existing:
                continue
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = name, 0.0, model_pb2.ModelProto.SentencePiece.UNUSED
            added += 1
        proto.trainer_spec.vocab_size = len(proto.pieces)
    if missing or model_prefix is not None:
        Path(model_path).write_bytes(proto.SerializeToString())
    return missing
