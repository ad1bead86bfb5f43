"""SOLO's embedded demo: image-caption pairs drawn deterministically, so a run needs no download.

Each 64 x 64 image (2 x 2 SOLO patches) holds one shape on a light background: a circle, square or
triangle of one of five colours, small or large, in one of the four quadrants, its centre and size
jittered by a few pixels and the background's shade varied. The caption names all four attributes,
"a small red circle at the top left". Image i of a split is a function of (seed, split, i) alone; the
train and valid splits draw from different streams, so no valid image is a train image.
"""
import hashlib
import re
from dataclasses import dataclass

from data.errors import DataError

SIDE = 64
SIZES = {"small": 7, "large": 13}  # radius (half the side) in pixels, before jitter
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48)}
ATTRIBUTES = ("size", "colour", "shape", "place")
SPLITS = {"train": 0, "valid": 1}
CAPTION = re.compile(r"a (\w+) (\w+) (\w+) at the (\w+ \w+)")


@dataclass(frozen=True)
class Shape:
    size: str
    colour: str
    shape: str
    place: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.place}"


def parse_caption(text: str) -> Shape | None:
    """The attributes a caption names, None if it is not of the captions' form."""
    match = CAPTION.fullmatch(text.strip())
    return Shape(*match.groups()) if match else None


def _draws(seed: int, split: str, index: int) -> tuple[Shape, tuple[int, int, int, int]]:
    """Image `index` of a split: its attributes (uniform over all 120 combinations, up to 2^-16) and its jitter
    (background shade, centre x and y offsets, radius offset), from a hash of (seed, split, index): a few
    microseconds, so a split's captions are known without drawing its images."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    digest = hashlib.blake2b(f"shapes:{seed}:{split}:{index}".encode(), digest_size=16).digest()
    draws = [int.from_bytes(digest[i:i + 2], "little") for i in range(0, 16, 2)]

    def pick(value: int, choices) -> str:
        return list(choices)[value % len(choices)]

    shape = Shape(pick(draws[0], SIZES), pick(draws[1], COLOURS), pick(draws[2], SHAPES), pick(draws[3], PLACES))
    return shape, (200 + draws[4] % 56, draws[5] % 7 - 3, draws[6] % 7 - 3, draws[7] % 3 - 1)


def shape_of(seed: int, split: str, index: int) -> Shape:
    """The attributes of image `index` of a split (what its caption says), without drawing it."""
    return _draws(seed, split, index)[0]


def draw(seed: int, split: str, index: int):
    """Image `index` of a split (an RGB PIL image, SIDE x SIDE) and its attributes."""
    from PIL import Image, ImageDraw

    shape, (shade, dx, dy, dr) = _draws(seed, split, index)
    image = Image.new("RGB", (SIDE, SIDE), (shade, shade, shade))
    cx, cy = PLACES[shape.place][0] + dx, PLACES[shape.place][1] + dy
    r = SIZES[shape.size] + dr
    pen, fill = ImageDraw.Draw(image), COLOURS[shape.colour]
    if shape.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image, shape
