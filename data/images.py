"""Images as SOLO reads them, and image-text samples packed into fixed-length rows.

SOLO has no vision encoder: an image is resized so both sides are multiples of 32 (the long side
to at most 1024), cut into 32x32 patches flattened in (C, H, W) order (3072 values each) and
written into the token sequence as

    <vision> R rows of C <vpatch>, with <vrow_sep> between rows </vision>

2 + R*C + (R - 1) tokens (1057 for 1024x1024). Each <vpatch> position's embedding gets a linear
projection of its patch added. Patches are kept as uint8 pixels (a quarter of the bytes of float32)
and normalized with ImageNet's mean and std when a batch is built.
"""

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import DataError

PATCH = 32
PATCH_VALUES = 3 * PATCH * PATCH
MAX_SIDE = 1024
# Refuse images before decoding them when their pixels would take much memory (8k x 8k RGB is 192 MiB);
# SOLO itself never uses more than 1024 x 1024. Below PIL's own decompression-bomb warning (89M pixels).
MAX_PIXELS = 8192 * 8192
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -100  # models.common.loss.IGNORE_INDEX (data/ must not import models/)


def resized_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """SOLO's resize: the long side up to a multiple of 32 (at most max_side), the short side in
    proportion, then up to a multiple of 32 (at least 32: a 1-pixel sliver still gets one row)."""
    if min(width, height) < 1:
        raise DataError(f"an image of {width}x{height} pixels has no pixels")
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(math.ceil(long_side / PATCH) * PATCH, max_side)
    new_short = max(PATCH, math.ceil(int(new_long * short_side / long_side) / PATCH) * PATCH)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def vision_token_count(rows: int, cols: int) -> int:
    return 2 + rows * cols + (rows - 1)


def to_rgb(image, what: str = "image"):
    """An 8-bit RGB copy of a PIL image, the documented conversions (docs/data.md): greyscale and
    palette images are expanded, alpha is composited over white, CMYK goes through PIL's
    conversion, 16-bit greyscale is scaled to 8 bits; other modes (floating point) are refused."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(pixels * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    raise DataError(f"{what}: pixel mode {mode!r} is not supported (8/16-bit greyscale, palette, RGB(A), CMYK are); "
                    "convert it to RGB first")


def open_image(source, what: str = "image"):
    """Decode bytes, a path or a PIL image into 8-bit RGB, or raise one DataError line naming `what`
    (truncated or corrupt files, images over MAX_PIXELS, unsupported modes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            with warnings.catch_warnings():  # PIL warns above 89M pixels; MAX_PIXELS below refuses earlier
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source))
        width, height = image.size  # read from the header: nothing decoded yet
        if width * height > MAX_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} pixels")
        image.load()
    except Image.DecompressionBombError as e:  # ours above, or PIL's own at open (over 179M pixels)
        raise DataError(f"{what} is too large ({e}; the limit is {MAX_PIXELS} pixels, SOLO uses at most "
                        "1024x1024): downscale it before preparing") from None
    except UnidentifiedImageError as e:
        raise DataError(f"{what} is not a readable image ({e}): remove or re-encode it") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated files raise OSError from load()
        raise DataError(f"{what} could not be decoded ({e}): it is truncated or corrupt; remove or re-encode it") \
            from None
    return to_rgb(image, what)


def patchify(image, max_side: int = MAX_SIDE) -> tuple[np.ndarray, int, int]:
    """An RGB PIL image resized as SOLO does and cut into patches: uint8 [rows * cols, 3072], each
    patch flattened in (C, H, W) order, patches in row-major order; and (rows, cols)."""
    from PIL import Image

    width, height = resized_size(*image.size, max_side=max_side)
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)  # [H, W, C]
    rows, cols = height // PATCH, width // PATCH
    patches = pixels.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 4, 1, 3)  # [R, C', ch, y, x]
    return np.ascontiguousarray(patches.reshape(rows * cols, PATCH_VALUES)), rows, cols


def unpatchify(patches: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The [H, W, 3] pixels that patchify cut into `patches` (its inverse after the resize)."""
    grid = np.asarray(patches).reshape(rows, cols, 3, PATCH, PATCH).transpose(0, 3, 1, 4, 2)
    return grid.reshape(rows * PATCH, cols * PATCH, 3)


def normalize_patches(patches):
    """uint8 patches [..., 3072] (a numpy array or torch tensor) -> float32 torch tensor, each channel
    scaled to [0, 1] then standardized with ImageNet's mean and std."""
    import torch

    values = torch.as_tensor(patches).to(torch.float32) / 255.0
    shape = values.shape
    channels = values.reshape(*shape[:-1], 3, PATCH * PATCH)
    mean = torch.tensor(IMAGENET_MEAN).unsqueeze(-1)
    std = torch.tensor(IMAGENET_STD).unsqueeze(-1)
    return ((channels - mean) / std).reshape(shape)


@dataclass(frozen=True)
class VisionTokens:
    """Token ids of SOLO's image markup (new ids appended to a text vocabulary)."""

    start: int  # <vision>
    patch: int  # <vpatch>
    row_sep: int  # <vrow_sep>
    end: int  # </vision>

    @classmethod
    def after(cls, vocab_size: int) -> "VisionTokens":
        """The four ids right after a text vocabulary of vocab_size tokens."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2, vocab_size + 3)

    def ids(self) -> tuple[int, ...]:
        return (self.start, self.patch, self.row_sep, self.end)


def image_tokens(rows: int, cols: int, vision: VisionTokens) -> np.ndarray:
    """`<vision>` rows of `<vpatch>` separated by `<vrow_sep>` `</vision>`, int64."""
    row = [vision.patch] * cols
    body = ([vision.row_sep] + row) * rows
    return np.asarray([vision.start] + body[1:] + [vision.end], dtype=np.int64)


@dataclass
class Sample:
    """One image-text document: its tokens, the patches of its <vpatch> tokens in order (uint8
    [n_patches, 3072]) and which tokens are loss targets (False on image markup and prompts)."""

    tokens: np.ndarray  # int64 [n]
    patches: np.ndarray  # uint8 [number of <vpatch> in tokens, 3072]
    is_target: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return len(self.tokens)


def caption_sample(patches: np.ndarray, rows: int, cols: int, caption_tokens, vision: VisionTokens) -> Sample:
    """An image followed by its caption (which should end in EOS): the loss is on the caption only."""
    markup = image_tokens(rows, cols, vision)
    caption = np.asarray(caption_tokens, dtype=np.int64)
    return Sample(tokens=np.concatenate([markup, caption]), patches=patches,
                  is_target=np.concatenate([np.zeros(len(markup), bool), np.ones(len(caption), bool)]))


def pack_samples(lengths, seq_len: int) -> list[list[int]]:
    """Greedy in-order packing of documents into rows of seq_len tokens, never splitting one: the
    indices of the samples of each row. A sample longer than seq_len is refused (an image would
    have to be split); the caller can drop it with a count instead."""
    rows, current, used = [], [], 0
    for i, length in enumerate(lengths):
        if length > seq_len:
            raise DataError(f"sample {i} has {length} tokens, more than train.seq_len {seq_len}, and packing never "
                            "splits an image: raise train.seq_len or lower the image size cap")
        if used + length > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += length
    if current:
        rows.append(current)
    return rows


def build_row(samples: list[Sample], seq_len: int, pad_token: int, patch_token: int) -> dict[str, np.ndarray]:
    """One packed row of whole samples, padded to seq_len: `tokens`, `targets` (the next token of
    the same sample where that token is a target, else IGNORE_INDEX; padding never a target),
    `positions` restarting at 0 per sample, `document_ids` (padding is one more document) and
    `patches` uint8 [seq_len, 3072], each token's patch (zeros where the token is not <vpatch>)."""
    tokens = np.full(seq_len, pad_token, dtype=np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    document_ids = np.zeros(seq_len, dtype=np.int64)
    patches = np.zeros((seq_len, PATCH_VALUES), dtype=np.uint8)
    start = 0
    for doc, sample in enumerate(samples):
        n = len(sample)
        end = start + n
        if end > seq_len:
            raise DataError(f"samples of {end} tokens do not fit a row of {seq_len}")
        tokens[start:end] = sample.tokens
        next_ok = sample.is_target[1:]
        targets[start:end - 1] = np.where(next_ok, sample.tokens[1:], IGNORE_INDEX)
        positions[start:end] = np.arange(n)
        document_ids[start:end] = doc
        slots = np.flatnonzero(sample.tokens == patch_token)
        if len(slots) != len(sample.patches):
            raise DataError(f"a sample has {len(slots)} <vpatch> tokens but {len(sample.patches)} patches")
        patches[start + slots] = sample.patches
        start = end
    positions[start:] = np.arange(seq_len - start)
    document_ids[start:] = len(samples)
    return {"tokens": tokens, "targets": targets, "positions": positions, "document_ids": document_ids,
            "patches": patches}
