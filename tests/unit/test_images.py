"""SOLO's image reading (data/images.py): the resize table, the token count, patches, broken images, packing."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.errors import DataError
from data.images import (IGNORE_INDEX, PATCH_VALUES, VisionTokens, build_row, caption_sample, image_tokens,
                         normalize_patches, open_image, pack_samples, patchify, resized_size, unpatchify,
                         vision_token_count)

VISION = VisionTokens.after(100)


@pytest.mark.parametrize("size, expected", [
    # SOLO's rule worked by hand: long side up to a multiple of 32 (cap 1024), short side in proportion, up to 32s.
    ((1024, 1024), (1024, 1024)),
    ((2000, 1000), (1024, 512)),     # 1024 * 1000 / 2000 = 512
    ((1000, 2000), (512, 1024)),
    ((640, 480), (640, 480)),
    ((641, 480), (672, 512)),        # 672 * 480 / 641 = 503.2 -> 503 -> 512
    ((100, 30), (128, 64)),          # 128 * 30 / 100 = 38.4 -> 38 -> 64
    ((5, 3), (32, 32)),
    ((3000, 1), (1024, 32)),         # a sliver keeps one row of patches
])
def test_resize_table(size, expected):
    assert resized_size(*size) == expected


def test_a_1024_square_image_is_1057_tokens():
    patches, rows, cols = patchify(Image.new("RGB", (1024, 1024)))
    tokens = image_tokens(rows, cols, VISION)
    assert (rows, cols) == (32, 32) and len(tokens) == vision_token_count(rows, cols) == 1057
    assert tokens[0] == VISION.start and tokens[-1] == VISION.end
    assert (tokens == VISION.patch).sum() == 1024 and (tokens == VISION.row_sep).sum() == 31
    assert tokens[33] == VISION.row_sep  # after the first row of 32 patches


def test_patchify_unpatchify_round_trip_and_channel_order():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    patches, rows, cols = patchify(Image.fromarray(pixels))  # already multiples of 32: no resampling change
    assert patches.shape == (6, PATCH_VALUES) and (rows, cols) == (2, 3)
    np.testing.assert_array_equal(unpatchify(patches, rows, cols), pixels)
    # (C, H, W) inside a patch: the first 1024 values are patch (0, 0)'s red channel, row by row.
    np.testing.assert_array_equal(patches[0, :1024].reshape(32, 32), pixels[:32, :32, 0])
    np.testing.assert_array_equal(patches[4, 1024:2048].reshape(32, 32), pixels[32:, 32:64, 1])


def test_normalize_patches_uses_imagenet_statistics():
    patches = np.full((1, PATCH_VALUES), 255, dtype=np.uint8)
    values = normalize_patches(patches).reshape(3, -1)
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(values[:, 0], expected)
    assert torch.equal(values, values[:, :1].expand_as(values))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("image, fmt, pixel", [
    (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
    (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG", (255, 255, 255)),      # transparent: the white behind
    (Image.new("RGBA", (4, 4), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", None),              # red-ish through PIL's conversion
    (Image.new("I;16", (4, 4), 65535), "PNG", (255, 255, 255)),
])
def test_modes_are_converted_to_8_bit_rgb(image, fmt, pixel):
    rgb = open_image(encoded(image, fmt))
    assert rgb.mode == "RGB"
    if pixel is not None:
        assert rgb.getpixel((0, 0)) == pixel


def test_broken_images_are_one_line_errors():
    good = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(DataError, match="truncated or corrupt"):
        open_image(good[: len(good) // 2], "row 7")
    with pytest.raises(DataError, match="row 8 is not a readable image"):
        open_image(b"not an image", "row 8")
    for side in (10000, 40000):  # refused before decoding: by our limit, by PIL's own bomb check
        with pytest.raises(DataError, match="row 9 is too large .* downscale it"):
            open_image(encoded(Image.new("1", (side, side)), "PNG"), "row 9")
    with pytest.raises(DataError, match="pixel mode 'F' is not supported"):
        open_image(Image.new("F", (4, 4)))


def sample(n_caption: int, rows: int = 1, cols: int = 2, fill: int = 7):
    patches = np.full((rows * cols, PATCH_VALUES), fill, dtype=np.uint8)
    return caption_sample(patches, rows, cols, list(range(1, n_caption + 1)), VISION)


def test_packing_keeps_samples_whole_and_refuses_an_oversized_one():
    assert pack_samples([5, 5, 3, 8, 1], 10) == [[0, 1], [2], [3, 4]]
    with pytest.raises(DataError, match="never splits an image"):
        pack_samples([5, 11], 10)


def test_a_row_has_targets_only_on_captions_and_each_patch_at_its_token():
    first, second = sample(3, fill=7), sample(2, rows=2, cols=1, fill=9)
    row = build_row([first, second], 20, pad_token=0, patch_token=VISION.patch)
    n1 = len(first)
    # Image markup predicts nothing until </vision>, whose target is the first caption token.
    targets = row["targets"]
    assert (targets[: n1 - 4] == IGNORE_INDEX).all() and targets[n1 - 4] == 1 and list(targets[n1 - 3:n1]) == [2, 3,
                                                                                                            IGNORE_INDEX]
    assert (targets[len(first) + len(second):] == IGNORE_INDEX).all()  # padding
    assert list(row["positions"][n1:n1 + 3]) == [0, 1, 2] and row["document_ids"][n1] == 1
    slots = np.flatnonzero(row["tokens"] == VISION.patch)
    assert (row["patches"][slots[:2]] == 7).all() and (row["patches"][slots[2:]] == 9).all()
    others = np.setdiff1d(np.arange(20), slots)
    assert (row["patches"][others] == 0).all()
