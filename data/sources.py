"""Raw corpora on local disk -> documents, read through HF `datasets` one file at a time.

A corpus is a list of files, globs or directories. Each file is read in streaming mode (no
Arrow copy of the corpus is written anywhere), in sorted order, so the documents come out in a
fixed order and an error names the file it came from.

Formats by extension (compressed .gz/.bz2/.xz/.zst variants of the text formats too):
  .jsonl .ndjson .json   JSON lines, or one JSON array of records   -> `text_field`
  .parquet               Parquet                                     -> `text_field`
  .arrow                 Arrow IPC (stream or file)                  -> `text_field`
  .txt .text             plain UTF-8 text; `text_unit` says what a document is: the whole
                         file ("document"), each blank-line separated paragraph, or each line

Image-text corpora (iter_image_text_rows) are parquet or arrow files with an image column and a
text column, or `imagefolder` directories (images plus a metadata.jsonl naming each image's
`file_name` and its text), read the same way.
"""

import bz2
import codecs
import contextlib
import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError

FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
           ".txt": "text", ".text": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
IMAGEFOLDER_METADATA = "metadata.jsonl"
TEXT_UNITS = ("document", "paragraph", "line")
BATCH_ROWS = 1000  # rows per read batch


def resolve_inputs(patterns: list[str], fmt: str | None = None, output: Path | None = None) -> list[Path]:
    """The files named by paths, globs and directories (their files with a known extension,
    hidden ones left out), in sorted order, but none under `output` (the dataset being written, when it lies inside
    an input directory: its manifest.json is no input). A pattern that matches nothing is an error (a typo
    would silently drop data)."""
    if not patterns:
        raise DataError("no input files given: pass files, globs (quoted, e.g. 'corpus/*.jsonl') or directories")
    files: list[Path] = []
    written = output.resolve() if output is not None else None
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"no files match {pattern}: check the pattern (quote it so the shell leaves it alone)")
        elif Path(expanded).is_dir():
            base = Path(expanded)
            matches = sorted(p for p in base.rglob("*") if p.is_file() and _known(p, fmt)
                             and not any(part.startswith(".") for part in p.relative_to(base).parts))
            if not matches:
                raise DataError(f"directory {pattern} holds no {fmt or 'jsonl/json/parquet/arrow/txt'} files")
        elif Path(expanded).is_file():
            matches = [Path(expanded)]
        else:
            raise DataError(f"input {pattern} does not exist")
        if written is not None:
            matches = [path for path in matches if written not in path.resolve().parents]
        for path in matches:
            file_format(path, fmt)  # refuses unknown extensions
            if path not in files:
                files.append(path)
    return files


def _known(path: Path, fmt: str | None) -> bool:
    try:
        file_format(path, fmt)
        return True
    except DataError:
        return False


def file_format(path: Path, fmt: str | None = None) -> str:
    """The HF `datasets` builder that reads path: `fmt` if given, else from the extension."""
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise DataError(f"--format {fmt} is not one of {', '.join(sorted(set(FORMATS.values())))}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
        if suffixes and FORMATS.get(suffixes[-1]) in ("parquet", "arrow"):
            raise DataError(f"{path}: compressed {suffixes[-1]} files are not supported; decompress it")
    if not suffixes or suffixes[-1] not in FORMATS:
        raise DataError(f"{path} has an unknown extension: name it .jsonl, .json, .parquet, .arrow or .txt "
                        f"(or pass --format)")
    return FORMATS[suffixes[-1]]


def file_stamps(files: list[Path]) -> list[list]:
    """What identifies the inputs for a no-op re-run: path, size and modification time."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def iter_text_batches(files: list[Path], text_field: str = "text", text_unit: str = "document",
                      fmt: str | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[Path, list]]:
    """(file, texts) batches over all files in order; a text is a str or None (a row without
    the field). Errors name the file: not what its extension says, not UTF-8, no such field."""
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit {text_unit!r} is not one of {', '.join(TEXT_UNITS)}")
    datasets = _datasets()
    for path in files:
        builder = file_format(path, fmt)
        _precheck(path, builder)
        if path.stat().st_size == 0:
            continue  # no documents; an all-empty corpus is refused by the caller
        kwargs = {"sample_by": text_unit, "keep_linebreaks": True} if builder == "text" else {}
        field = "text" if builder == "text" else text_field
        try:
            with _quiet_datasets():
                dataset = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True,
                                                **kwargs)
                for batch in dataset.iter(batch_size=batch_rows):
                    if field not in batch:
                        fields = ", ".join(batch) or "none"
                        raise DataError(f"{path} has no field '{field}' (its fields: {fields}): pass "
                                        f"--text-field with the one that holds the text")
                    texts = batch[field]
                    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
                    if bad is not None:
                        raise DataError(f"field '{field}' of {path} holds {type(bad).__name__} values, not text: "
                                        f"pass --text-field with the one that holds the text")
                    yield path, texts
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - anything datasets/pyarrow raise about one file
            raise _read_error(path, builder, e) from None


@dataclass(frozen=True)
class ImageTextInput:
    path: Path
    builder: str  # the HF datasets builder: "parquet", "arrow" or "imagefolder"


@dataclass(frozen=True)
class ImageTextRow:
    where: str  # names the row in messages: "FILE row N", or the image file of an imagefolder
    image: bytes | Path | None  # the encoded image, or the file holding it; None when the row has none
    text: str | None


def resolve_image_text_inputs(patterns: list[str], fmt: str | None = None) -> list[ImageTextInput]:
    """Image-text inputs: a directory with a metadata.jsonl is an imagefolder, any other directory stands
    for the parquet and arrow files under it (an HF save_to_disk directory, say: its json sidecars are
    not inputs); files and globs are as resolve_inputs finds them, and must be parquet or arrow."""
    inputs: list[ImageTextInput] = []
    for pattern in patterns:
        expanded = Path(os.path.expanduser(pattern))
        if not glob.has_magic(str(expanded)) and (expanded / IMAGEFOLDER_METADATA).is_file():
            found = [ImageTextInput(expanded, "imagefolder")]
        elif not glob.has_magic(str(expanded)) and expanded.is_dir():
            found = [ImageTextInput(path, file_format(path, fmt)) for path in sorted(expanded.rglob("*"))
                     if path.is_file() and path.suffix.lower() in (".parquet", ".arrow")
                     and not any(part.startswith(".") for part in path.relative_to(expanded).parts)]
            if not found:
                raise DataError(f"directory {pattern} holds no parquet or arrow files and no {IMAGEFOLDER_METADATA}: "
                                "pass image-text files or an imagefolder directory")
        else:
            found = [ImageTextInput(path, file_format(path, fmt)) for path in resolve_inputs([pattern], fmt)]
        for item in found:
            if item.builder not in ("parquet", "arrow", "imagefolder"):
                raise DataError(f"{item.path} is {item.builder} data, but image-text inputs are parquet or arrow files "
                                f"with an image column, or imagefolder directories with a {IMAGEFOLDER_METADATA}")
            if item not in inputs:
                inputs.append(item)
    return inputs


def image_text_stamps(inputs: list[ImageTextInput]) -> list[list]:
    """What identifies image-text inputs for a no-op re-run: a file's path, size and modification time; an
    imagefolder's path, file count and a digest of its files' stamps."""
    stamps = []
    for item in inputs:
        if item.builder == "imagefolder":
            files = file_stamps(sorted(p for p in item.path.rglob("*") if p.is_file()))
            digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
            stamps.append([str(item.path.resolve()), len(files), digest])
        else:
            stamps += file_stamps([item.path])
    return stamps


def iter_image_text_rows(inputs: list[ImageTextInput], image_column: str | None,
                         text_field: str = "text") -> Iterator[ImageTextRow]:
    """The rows of every input in order, images still encoded. `image_column` None: the one column with
    an HF Image feature. Errors name the input: no such column, not an image column, not text."""
    datasets = _datasets()
    for item in inputs:
        path, builder = item.path, item.builder
        if builder != "imagefolder":
            _precheck(path, builder)
            if path.stat().st_size == 0:
                continue  # no rows; an empty corpus is refused by the caller
        source = {"data_dir": str(path)} if builder == "imagefolder" else {"data_files": [str(path)]}
        try:
            with _quiet_datasets():
                dataset = datasets.load_dataset(builder, split="train", streaming=True, **source)
                features = dataset.features or {}
                column = _image_column(features, image_column, path)
                _check_text_column(features, text_field, path)
                if isinstance(features[column], datasets.Image):  # bytes and path as stored, decoded by the caller
                    dataset = dataset.cast_column(column, datasets.Image(decode=False))
                for number, row in enumerate(dataset.select_columns([column, text_field])):
                    yield _image_text_row(path, builder, number, row[column], row[text_field])
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - anything datasets/pyarrow raise about one input
            raise _read_error(path, builder, e) from None


def _image_column(features: dict, requested: str | None, path: Path) -> str:
    import datasets

    columns = ", ".join(features) or "none"
    if requested is None:
        found = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if len(found) == 1:
            return found[0]
        what = f"several image columns ({', '.join(found)})" if found else f"no image column (its columns: {columns})"
        raise DataError(f"{path} has {what}: pass --image-column with the one that holds the images")
    if requested not in features:
        raise DataError(f"{path} has no column '{requested}' (its columns: {columns}): pass --image-column with the "
                        f"one that holds the images")
    feature = features[requested]
    encoded = isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("binary", "large_binary") \
        or (isinstance(feature, dict) and set(feature) == {"bytes", "path"})
    if not encoded:
        raise DataError(f"column '{requested}' of {path} is not an image column (it holds {_describe(feature)}, not "
                        f"encoded images): pass --image-column with the one that holds the images")
    return requested


def _check_text_column(features: dict, text_field: str, path: Path) -> None:
    if text_field not in features:
        raise DataError(f"{path} has no column '{text_field}' (its columns: {', '.join(features) or 'none'}): pass "
                        f"--text-field with the one that holds the text")
    if getattr(features[text_field], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column '{text_field}' of {path} holds {_describe(features[text_field])}, not text: pass "
                        f"--text-field with the one that holds the text")


def _describe(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{dtype} values" if isinstance(dtype, str) else f"{type(feature).__name__} values"


def _image_text_row(path: Path, builder: str, number: int, image, text) -> ImageTextRow:
    """image: {"bytes", "path"} as HF stores an Image (bytes, or for an imagefolder the file), raw bytes, or None."""
    if isinstance(image, dict):
        file = image.get("path")
        image = image.get("bytes") or (Path(file) if file else None)
    if builder == "imagefolder" and isinstance(image, Path):
        where = str(image)
    else:
        where = f"{path} row {number}"
    return ImageTextRow(where, image, text)


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never ask the Hub
    import datasets

    datasets.disable_progress_bars()
    return datasets


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own copy of read errors; we raise one line naming the file instead."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_MAGIC = {b"PAR1": "parquet", b"ARROW1": "Arrow", b"\xff\xff\xff\xff": "Arrow", b"\x1f\x8b": "gzip",
          b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _precheck(path: Path, builder: str) -> None:
    """Cheap checks that give a clearer message than the reader would."""
    if builder in ("json", "text") and path.suffix.lower() not in COMPRESSIONS:
        with open(path, "rb") as f:
            head = f.read(8)
        kind = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
        if kind is not None:
            what = "JSON lines or JSON" if builder == "json" else "plain text"
            raise DataError(f"{path} is not {what}: it holds {kind} data; rename it to what it is "
                            "(or pass --format)")
    if builder == "parquet" and path.stat().st_size:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, path.stat().st_size - 4))
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise DataError(f"{path} is not a parquet file (no PAR1 magic bytes): check what it holds or rename it")


def _read_error(path: Path, builder: str, error: BaseException) -> DataError:
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    decode = next((e for e in chain if isinstance(e, UnicodeDecodeError)), None)
    if decode is not None:
        return DataError(f"{path} is not valid UTF-8 ({decode.reason}, byte 0x{decode.object[decode.start]:02x}): "
                         "convert it to UTF-8")
    first = next((str(e).strip().splitlines()[0] for e in chain if str(e).strip()), type(error).__name__)
    if any(word in first.lower() for word in ("utf8", "utf-8", "invalid encoding")):
        # pyarrow's JSON reader says "Invalid encoding" of an unterminated string too: look at the bytes.
        bad = _first_non_utf8(path)
        if bad is not None:
            return DataError(f"{path} is not valid UTF-8 ({bad}): convert it to UTF-8")
    what = {"json": "is not valid JSON lines or JSON", "parquet": "is not a valid parquet file",
            "arrow": "is not a valid Arrow IPC file", "text": "cannot be read as text",
            "imagefolder": "cannot be read as an imagefolder"}[builder]
    return DataError(f"{path} {what} ({first}): check what it holds or rename it")


def _first_non_utf8(path: Path) -> str | None:
    """Where the file's (decompressed) bytes stop being UTF-8, or None when they are UTF-8 throughout;
    read in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open_decompressed(path) as f:
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return f"{e.reason} at byte {offset + e.start}"
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return f"{e.reason} at the end"
    return None


def _open_decompressed(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard  # datasets reads .zst with it

        return zstandard.open(path, "rb")
    return open(path, "rb")
