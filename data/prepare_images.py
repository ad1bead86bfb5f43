"""`shardwright prepare --image-column`: image-text corpora -> a prepared image-text dataset directory (SOLO).

    OUTPUT/
      manifest.json                  settings, inputs, counts, shards, tokenizer fingerprint, the image
                                     token ids; written last: a directory with one is complete
      tokenizer.model                the sentencepiece model the caption tokens come from
      shard-00000.bin/.idx           megatron-core indexed datasets, one document per image: its caption's
                                     tokens + EOS (text vocabulary ids)
      shard-00000-patches.bin/.idx   ... and its patches, uint8: one sequence per row of patches (cols * 3072
      ...                            values, each 32x32 patch in (C, H, W) order), so the index holds every
                                     image's rows and cols; a new shard starts after `shard_patches` patches

Each image is decoded to 8-bit RGB (data.images.open_image: the documented mode conversions), resized
as SOLO does (long side to a multiple of 32 up to `max_side`, short side in proportion) and cut into
patches; pixels stay uint8 and are normalized when a batch is built. The image markup (<vision> rows
of <vpatch> ... </vision>) is not stored: its ids follow the text vocabulary (data.images.VisionTokens)
and the reader (data.image_text) writes it from each image's rows and cols. Rows whose caption is
missing or blank are dropped and counted; a broken image stops the prepare with one line naming it,
or with `skip_broken_images` is left out and counted. Reading, ordering, workers, the atomic publish
and re-runs are as for text (data/prepare.py).
"""

import functools
import shutil
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.images import MAX_SIDE, PATCH, PATCH_VALUES, VisionTokens, open_image, patchify, vision_token_count
from data.indexed import _megatron_indexed_dataset, token_dtype
from data.prepare import (BuildTimer, ShardWriter, already_prepared, build_and_publish, check_num_proc,
                          check_output_location, dataset_id, encode_texts, init_sentencepiece, load_tokenizer,
                          ordered_map, progress_bar, write_manifest)
from data.sources import ImageTextRow, image_text_stamps, iter_image_text_rows, resolve_image_text_inputs
from data.tokenizer import Tokenizer

IMAGE_TEXT_FORMAT = "shardwright-prepared-image-text"
IMAGE_TEXT_FORMAT_VERSION = 1
PATCH_STORE = "-patches"  # shard-NNNNN-patches.bin/.idx beside shard-NNNNN.bin/.idx
DEFAULT_SHARD_PATCHES = 1 << 20  # 3 GiB of patches per shard
IMAGES_PER_TASK = 16  # a task's patches are at most 16 x 3 MiB
LOGGED_SKIPS = 10  # skipped broken images named one line each; the rest only counted


def prepare_image_text(inputs: list[str], output: str | Path, tokenizer: str | Path, *, image_column: str | None = None,
                       text_field: str = "text", fmt: str | None = None, max_side: int = MAX_SIDE,
                       skip_broken_images: bool = False, num_proc: int = 1,
                       shard_patches: int = DEFAULT_SHARD_PATCHES, force: bool = False, progress: bool | None = None,
                       log=print) -> dict:
    """Patch the images and tokenize the captions of `inputs` into OUTPUT (see the module docstring); returns
    the manifest. `image_column` None: the one column with an HF Image feature. A finished OUTPUT made with
    the same settings and unchanged inputs is left alone."""
    check_num_proc(num_proc)
    if max_side < PATCH or max_side % PATCH:
        raise DataError(f"--max-image-side must be a positive multiple of {PATCH}, got {max_side}")
    if shard_patches < 1:
        raise DataError(f"--shard-patches must be >= 1, got {shard_patches}")
    output = check_output_location(output)
    sources = resolve_image_text_inputs(list(inputs), fmt)
    tok = load_tokenizer(tokenizer)
    settings = {
        "inputs": image_text_stamps(sources),
        "format": fmt,
        "image_column": image_column,
        "text_field": text_field,
        "tokenizer_fingerprint": tok.fingerprint,
        "max_side": max_side,
        "skip_broken_images": skip_broken_images,
        "shard_patches": shard_patches,
    }
    existing = already_prepared(output, settings, IMAGE_TEXT_FORMAT, IMAGE_TEXT_FORMAT_VERSION, ("", PATCH_STORE),
                                force)
    if existing is not None:
        log(f"{output} is already prepared ({existing['num_images']} images, {existing['num_patches']} patches) "
            "from the same inputs and settings: nothing to do (pass --force to rebuild)")
        return existing
    manifest = build_and_publish(output, lambda partial: _build(sources, partial, tok, settings, num_proc, progress,
                                                                log))
    stats = manifest["stats"]
    log(f"prepared {output}: {manifest['num_images']} images ({manifest['num_skipped_broken']} broken skipped, "
        f"{manifest['num_dropped_empty']} without a caption dropped), {manifest['num_patches']} patches, "
        f"{manifest['num_tokens']} tokens ({manifest['num_caption_tokens']} of captions) in "
        f"{len(manifest['shards'])} shard(s) from {len(sources)} input(s) in {stats['seconds']:.1f}s: "
        f"{stats['images_per_s']:.1f} images/s, {stats['patches_per_s']:.0f} patches/s, peak RSS "
        f"{stats['peak_rss_mib_main']:.0f} MiB")
    return manifest


def _build(sources, out_dir: Path, tok: Tokenizer, settings: dict, num_proc: int, progress, log) -> dict:
    _megatron_indexed_dataset()  # slow first import (megatron.core); not part of the throughput
    timer = BuildTimer()
    vision = VisionTokens.after(tok.vocab_size)
    dtype = token_dtype(tok.vocab_size)  # captions hold text ids only
    log(f"preparing {len(sources)} image-text input(s) with tokenizer {tok.model_path} (vocab {tok.vocab_size}, "
        f"image tokens {', '.join(map(str, vision.ids()))} after it), images resized to at most "
        f"{settings['max_side']} pixels a side, {num_proc} process(es)")
    writer = ShardWriter(out_dir, {"": dtype, PATCH_STORE: np.uint8}, "patches", settings["shard_patches"])
    rows = iter_image_text_rows(sources, settings["image_column"], settings["text_field"])
    work = functools.partial(_patch_and_tokenize, max_side=settings["max_side"],
                             skip_broken=settings["skip_broken_images"], eos_id=tok.eos_id, dtype=dtype)
    bar = progress_bar(progress, " images")
    num_patches = num_tokens = num_caption_tokens = skipped = dropped = 0
    try:
        for images, broken, empty in ordered_map(work, _batches(rows), num_proc, init_sentencepiece,
                                                 (tok.model_path.read_bytes(),)):
            for patches, image_rows, image_cols, caption in images:
                writer.add_document({"": (caption, [len(caption)]),
                                     PATCH_STORE: (patches.reshape(-1), [image_cols * PATCH_VALUES] * image_rows)},
                                    patches=len(patches), caption_tokens=len(caption))
                num_patches += len(patches)
                num_caption_tokens += len(caption)
                num_tokens += vision_token_count(image_rows, image_cols) + len(caption)
            for message in broken:
                skipped += 1
                if skipped <= LOGGED_SKIPS:
                    log(f"skipped: {message}" + (" (further skips are only counted)" if skipped == LOGGED_SKIPS
                                                 else ""))
            dropped += empty
            bar.update(len(images))
            bar.set_postfix_str(f"{num_patches / timer.seconds():.0f} patches/s", refresh=False)
    finally:
        bar.close()
    shards = writer.close()
    if writer.num_documents == 0:
        inputs = ", ".join(str(s.path) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise DataError(f"the corpus has no images to prepare ({dropped + skipped} rows in {inputs}: {dropped} without "
                        f"a caption, {skipped} with a broken image skipped): check the inputs, --image-column and "
                        "--text-field")
    shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
    stats = timer.stats()
    manifest = {
        "format": IMAGE_TEXT_FORMAT,
        "format_version": IMAGE_TEXT_FORMAT_VERSION,
        "dataset_id": dataset_id(out_dir, tok.fingerprint,
                                 [f"{s['name']}{store}" for s in shards for store in ("", PATCH_STORE)]),
        "settings": settings,
        "tokenizer_fingerprint": tok.fingerprint,
        "text_vocab_size": tok.vocab_size,
        "vision_tokens": {"start": vision.start, "patch": vision.patch, "row_sep": vision.row_sep, "end": vision.end},
        "vocab_size": vision.end + 1,  # the text vocabulary and the four image tokens
        "dtype": np.dtype(dtype).name,
        "eos_id": tok.eos_id,
        "patch_size": PATCH,
        "max_side": settings["max_side"],
        "num_images": writer.num_documents,
        "num_patches": num_patches,
        "num_caption_tokens": num_caption_tokens,
        "num_tokens": num_tokens,  # of the samples: image markup and captions
        "num_skipped_broken": skipped,
        "num_dropped_empty": dropped,
        "shards": shards,  # documents (= images), patches, caption_tokens per shard
        "stats": {"num_proc": num_proc, "images_per_s": writer.num_documents / stats["seconds"],
                  "patches_per_s": num_patches / stats["seconds"], "tokens_per_s": num_tokens / stats["seconds"],
                  **stats},
    }
    write_manifest(out_dir, manifest)
    return manifest


def _batches(rows):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == IMAGES_PER_TASK:
            yield batch
            batch = []
    if batch:
        yield batch


def _patch_and_tokenize(rows: list[ImageTextRow], max_side: int, skip_broken: bool, eos_id: int, dtype):
    """(patches uint8 [n, 3072], rows, cols, caption tokens + EOS) of each row with a caption and a good image,
    in order; the one-line messages of broken images (raised instead unless skip_broken); and how many rows
    had no caption (None, "" or whitespace only) and were dropped."""
    captioned = [row for row in rows if row.text and not row.text.isspace()]
    images, broken = [], []
    for row, ids in zip(captioned, encode_texts([row.text for row in captioned])):
        try:
            image = open_image(_encoded_image(row), row.where)
        except DataError as e:
            if not skip_broken:
                raise
            broken.append(str(e))
            continue
        patches, image_rows, image_cols = patchify(image, max_side)
        images.append((patches, image_rows, image_cols, np.asarray([*ids, eos_id], dtype=dtype)))
    return images, broken, len(rows) - len(captioned)


def _encoded_image(row: ImageTextRow) -> bytes | Path:
    if row.image is None:
        raise DataError(f"{row.where} has no image (its image column is empty): remove the row or give it one")
    if isinstance(row.image, Path) and not row.image.is_file():
        named_by = "" if row.where == str(row.image) else f" (named by {row.where})"
        raise DataError(f"image file {row.image}{named_by} does not exist: add it or remove the row")
    return row.image
