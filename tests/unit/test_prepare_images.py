"""data/prepare_images.py and data/image_text.py: image-text corpora (parquet, arrow, imagefolder) -> caption tokens
and patch stores -> SOLO samples; broken images, documented conversions, one-line refusals, atomic publish."""
import io
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.errors import DataError
from data.image_text import open_image_text
from data.images import PATCH_VALUES, VisionTokens, caption_sample, open_image, patchify
from data.prepare_images import LOGGED_SKIPS, prepare_image_text
from data.prepared import PreparedDataset
from data.tokenizer import Tokenizer
from data.tokenizer_train import train_from_files
from launcher.cli import main as shardwright
from tests.corpora import write_mixed_corpus

quiet = dict(log=lambda line: None, progress=False)
FEATURES = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    files, _ = write_mixed_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("tok") / "spm"
    train_from_files([str(f) for f in files], out, 512, log=lambda line: None)
    return out.with_name("spm.model")


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_dataset(images: list, captions: list) -> datasets.Dataset:
    """An in-memory HF dataset of encoded images (bytes, or None) in an Image column, and captions."""
    rows = {"image": [None if b is None else {"bytes": b, "path": None} for b in images], "caption": captions}
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def write_parquet(path, images: list, captions: list):
    """An HF parquet file (its Image feature in the schema metadata)."""
    image_dataset(images, captions).to_parquet(str(path))
    return path


def expected_samples(images: list[bytes], captions: list[str], tokenizer_path, max_side: int = 1024):
    """What prepare + the reader must give: patchify and caption_sample called directly."""
    tok = Tokenizer(tokenizer_path)
    vision = VisionTokens.after(tok.vocab_size)
    samples = []
    for data, caption in zip(images, captions):
        patches, rows, cols = patchify(open_image(data), max_side)
        samples.append(caption_sample(patches, rows, cols, tok.encode(caption) + [tok.eos_id], vision))
    return samples


def assert_same_samples(dataset, expected):
    assert len(dataset) == len(expected)
    for got, want in zip(dataset, expected):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.patches, want.patches)
        np.testing.assert_array_equal(got.is_target, want.is_target)
        assert got.tokens.dtype == np.int64 and got.patches.dtype == np.uint8


CAPTIONS = ["a red square", "noise, tall", "wide noise", "grey"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four good images of different shapes and formats, and a row without a caption (dropped)."""
    root = tmp_path_factory.mktemp("images")
    images = [encoded(Image.new("RGB", (64, 64), (200, 10, 10))), encoded(noise(50, 130, 1), "JPEG"),
              encoded(noise(641, 480, 2)), encoded(Image.new("L", (40, 20), 90))]
    path = write_parquet(root / "captions.parquet", images[:2] + [images[0]] + images[2:],
                         CAPTIONS[:2] + ["  "] + CAPTIONS[2:])
    return path, images


def test_parquet_round_trip_gives_what_patchify_and_caption_sample_give(corpus, tokenizer_path, tmp_path):
    path, images = corpus
    out = tmp_path / "ds"
    lines = []
    manifest = prepare_image_text([str(path)], out, tokenizer_path, text_field="caption", log=lines.append,
                                  progress=False)
    dataset = open_image_text(out)
    expected = expected_samples(images, CAPTIONS, tokenizer_path)
    assert_same_samples(dataset, expected)
    assert dataset[-1].tokens.tolist() == expected[-1].tokens.tolist()
    vocab = Tokenizer(tokenizer_path).vocab_size
    assert dataset.vision == VisionTokens.after(vocab) and manifest["vocab_size"] == vocab + 4
    assert dataset.tokenizer.fingerprint == Tokenizer(tokenizer_path).fingerprint
    assert dataset.sample_lengths().tolist() == [len(s) for s in expected]
    assert manifest["num_images"] == 4 and manifest["num_dropped_empty"] == 1 and manifest["num_skipped_broken"] == 0
    assert manifest["num_patches"] == sum(len(s.patches) for s in expected) == 4 + 2 * 5 + 21 * 16 + 2
    assert manifest["num_tokens"] == sum(len(s) for s in expected)
    assert "4 images (0 broken skipped, 1 without a caption dropped)" in lines[-1] and "patches/s" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000-patches.bin",
                                                     "shard-00000-patches.idx", "shard-00000.bin", "shard-00000.idx",
                                                     "tokenizer.model"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial build left
    with pytest.raises(IndexError):
        dataset[4]
    with pytest.raises(DataError, match="is a prepared image-text dataset, but a text one is needed"):
        PreparedDataset(out)


def test_the_size_cap_is_configurable(corpus, tokenizer_path, tmp_path):
    path, images = corpus
    prepare_image_text([str(path)], tmp_path / "ds", tokenizer_path, text_field="caption", max_side=64, **quiet)
    dataset = open_image_text(tmp_path / "ds")
    assert_same_samples(dataset, expected_samples(images, CAPTIONS, tokenizer_path, max_side=64))
    assert max(len(s.patches) for s in dataset) <= 4  # at most 2 x 2 patches of 32
    with pytest.raises(DataError, match="--max-image-side must be a positive multiple of 32, got 100"):
        prepare_image_text([str(path)], tmp_path / "other", tokenizer_path, text_field="caption", max_side=100,
                           **quiet)


def write_imagefolder(root, images: list[bytes], captions: list[str]):
    """An imagefolder: PNGs (one in a subdirectory) and a metadata.jsonl naming them, in metadata order."""
    (root / "sub").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (data, caption) in enumerate(zip(images, captions)):
            name = f"sub/{i}.png" if i == 1 else f"{i}.png"
            (root / name).write_bytes(data)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return root


def test_imagefolder_binary_column_shards_and_workers(tokenizer_path, tmp_path):
    images = [encoded(noise(32 * (1 + i % 3), 40, seed=i)) for i in range(7)]
    captions = [f"picture number {i}" for i in range(7)]
    folder = write_imagefolder(tmp_path / "folder", images[:4], captions[:4])
    raw = tmp_path / "raw.parquet"  # plain parquet (no HF metadata), images as a binary column
    pq.write_table(pa.table({"jpg": images[4:], "text": captions[4:]}), raw)
    for inputs, column, kept in (([str(folder)], None, slice(0, 4)), ([str(raw)], "jpg", slice(4, 7))):
        out, parallel = tmp_path / f"ds-{column}", tmp_path / f"np2-{column}"
        manifest = prepare_image_text(inputs, out, tokenizer_path, image_column=column, shard_patches=5, **quiet)
        assert len(manifest["shards"]) > 1 and all(s["patches"] >= 5 for s in manifest["shards"][:-1])
        assert_same_samples(open_image_text(out), expected_samples(images[kept], captions[kept], tokenizer_path))
        prepare_image_text(inputs, parallel, tokenizer_path, image_column=column, shard_patches=5, num_proc=2,
                           **quiet)
        stored = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".idx"))
        assert len(stored) == 4 * len(manifest["shards"])
        assert all((out / name).read_bytes() == (parallel / name).read_bytes() for name in stored)


def test_a_save_to_disk_directory_is_read_as_its_arrow_files(corpus, tokenizer_path, tmp_path):
    path, images = corpus
    image_dataset(images[:2] + [images[0]] + images[2:], CAPTIONS[:2] + [""] + CAPTIONS[2:]).save_to_disk(
        str(tmp_path / "saved"))
    assert {p.suffix for p in (tmp_path / "saved").iterdir()} == {".arrow", ".json"}
    prepare_image_text([str(tmp_path / "saved")], tmp_path / "ds", tokenizer_path, text_field="caption", **quiet)
    assert_same_samples(open_image_text(tmp_path / "ds"), expected_samples(images, CAPTIONS, tokenizer_path))
    with pytest.raises(DataError, match="holds no parquet or arrow files and no metadata.jsonl"):
        prepare_image_text([str(tmp_path / "ds")], tmp_path / "other", tokenizer_path, **quiet)


def test_rerun_is_a_no_op_unless_forced(corpus, tokenizer_path, tmp_path):
    path, _ = corpus
    out = tmp_path / "ds"
    prepare_image_text([str(path)], out, tokenizer_path, text_field="caption", **quiet)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    prepare_image_text([str(path)], out, tokenizer_path, text_field="caption", log=lines.append, progress=False)
    assert "nothing to do" in lines[-1] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(DataError, match="max_side=1024, not 512.*--force"):
        prepare_image_text([str(path)], out, tokenizer_path, text_field="caption", max_side=512, **quiet)
    prepare_image_text([str(path)], out, tokenizer_path, text_field="caption", max_side=512, force=True, **quiet)
    assert json.loads((out / "manifest.json").read_text())["max_side"] == 512


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def broken(kind: str):
    """An image that cannot be prepared, and what its one-line error must say."""
    good = encoded(noise(64, 64, 0))
    if kind == "truncated":
        return good[: len(good) // 2], "truncated or corrupt"
    if kind == "corrupt":
        return b"GIF89a but not really an image", "not a readable image"
    if kind == "huge":
        return encoded(Image.new("1", (10000, 10000))), "is too large"
    if kind == "float-pixels":
        return encoded(Image.new("F", (8, 8)), "TIFF"), "pixel mode 'F' is not supported"
    if kind == "missing":
        return None, "has no image"
    raise AssertionError(kind)


BROKEN = ["truncated", "corrupt", "huge", "float-pixels", "missing"]


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_image_is_one_line_and_nothing_is_published(kind, tokenizer_path, tmp_path):
    data, fragment = broken(kind)
    good = [encoded(noise(40, 40, 3)), encoded(noise(70, 30, 4))]
    path = write_parquet(tmp_path / "x.parquet", [good[0], data, good[1]], ["one", "two", "three"])
    with pytest.raises(DataError) as error:
        prepare_image_text([str(path)], tmp_path / "out", tokenizer_path, text_field="caption", **quiet)
    assert_one_line(error, f"{path} row 1", fragment)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    lines = []
    manifest = prepare_image_text([str(path)], tmp_path / "out", tokenizer_path, text_field="caption",
                                  skip_broken_images=True, log=lines.append, progress=False)
    assert manifest["num_images"] == 2 and manifest["num_skipped_broken"] == 1
    assert any(line.startswith("skipped: ") and f"{path} row 1" in line for line in lines)
    assert "1 broken skipped" in lines[-1]
    assert_same_samples(open_image_text(tmp_path / "out"), expected_samples(good, ["one", "three"], tokenizer_path))


def test_skips_past_the_first_ten_are_counted_not_named(tokenizer_path, tmp_path):
    good = encoded(noise(40, 40, 5))
    path = write_parquet(tmp_path / "x.parquet", [b"junk"] * 12 + [good], [f"caption {i}" for i in range(13)])
    lines = []
    manifest = prepare_image_text([str(path)], tmp_path / "out", tokenizer_path, text_field="caption",
                                  skip_broken_images=True, log=lines.append, progress=False)
    skips = [line for line in lines if line.startswith("skipped: ")]
    assert len(skips) == LOGGED_SKIPS and f"{path} row 9 " in skips[-1] and "only counted" in skips[-1]
    assert manifest["num_skipped_broken"] == 12 and manifest["num_images"] == 1 and "12 broken skipped" in lines[-1]


def test_a_missing_imagefolder_file_is_named(tokenizer_path, tmp_path):
    folder = write_imagefolder(tmp_path / "folder", [encoded(noise(40, 40, i)) for i in range(3)], ["a", "b", "c"])
    (folder / "2.png").unlink()
    with pytest.raises(DataError) as error:
        prepare_image_text([str(folder)], tmp_path / "out", tokenizer_path, **quiet)
    assert_one_line(error, f"image file {folder / '2.png'} does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image, fmt, rgb", [
    # docs/data.md's conversions: greyscale expanded, alpha over white, 16-bit scaled, palette expanded, CMYK by PIL.
    (Image.new("L", (32, 32), 90), "PNG", (90, 90, 90)),
    (Image.new("LA", (32, 32), (0, 0)), "PNG", (255, 255, 255)),
    (Image.new("RGBA", (32, 32), (10, 20, 30, 255)), "PNG", (10, 20, 30)),
    (Image.new("RGBA", (32, 32), (10, 20, 30, 0)), "PNG", (255, 255, 255)),
    (Image.new("I;16", (32, 32), 65535), "PNG", (255, 255, 255)),
    (Image.new("RGB", (32, 32), (7, 8, 9)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", (7, 8, 9)),
    (Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
])
def test_image_modes_are_converted_as_documented(image, fmt, rgb, tokenizer_path, tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [encoded(image, fmt)], ["one"])
    prepare_image_text([str(path)], tmp_path / "out", tokenizer_path, text_field="caption", **quiet)
    (sample,) = open_image_text(tmp_path / "out")
    channels = sample.patches.reshape(3, 32 * 32)
    assert np.abs(channels.astype(int) - np.asarray(rgb)[:, None]).max() <= 1  # JPEG may round by one


def write_bad(tmp_path, kind):
    """A corpus prepare must refuse, the prepare_image_text keywords, and what the one line must say."""
    good = encoded(noise(40, 40, 0))
    path = tmp_path / "x.parquet"
    if kind == "missing-text-column":
        write_parquet(path, [good], ["one"])
        return path, {}, ["no column 'text'", "caption", "--text-field"]
    if kind == "missing-image-column":
        write_parquet(path, [good], ["one"])
        return path, {"image_column": "img", "text_field": "caption"}, ["no column 'img'", "--image-column"]
    if kind == "not-an-image-column":
        write_parquet(path, [good], ["one"])
        return path, {"image_column": "caption", "text_field": "caption"}, ["column 'caption'",
                                                                            "is not an image column", "string"]
    if kind == "no-image-column":
        pq.write_table(pa.table({"caption": ["one"]}), path)
        return path, {"text_field": "caption"}, ["no image column", "--image-column"]
    if kind == "two-image-columns":
        features = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "text": datasets.Value("string")})
        image = {"bytes": good, "path": None}
        datasets.Dataset.from_dict({"a": [image], "b": [image], "text": ["one"]}, features=features).to_parquet(
            str(path))
        return path, {}, ["several image columns (a, b)", "--image-column"]
    if kind == "text-not-a-string":
        datasets.Dataset.from_dict({"image": [{"bytes": good, "path": None}], "n": [5]},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "n": datasets.Value("int64")})).to_parquet(str(path))
        return path, {"text_field": "n"}, ["column 'n'", "int64 values, not text"]
    if kind == "empty-dataset":
        write_parquet(path, [], [])
        return path, {"text_field": "caption"}, ["no images to prepare", "(0 rows in"]
    if kind == "no-captions":
        write_parquet(path, [good, good], [None, ""])
        return path, {"text_field": "caption"}, ["no images to prepare", "2 without a caption"]
    if kind == "json-input":
        (path := tmp_path / "x.jsonl").write_text('{"text": "one"}\n')
        return path, {}, ["is json data", "parquet or arrow", "imagefolder"]
    raise AssertionError(kind)


BAD = ["missing-text-column", "missing-image-column", "not-an-image-column", "no-image-column", "two-image-columns",
       "text-not-a-string", "empty-dataset", "no-captions", "json-input"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_corpora_are_one_line_naming_the_input(kind, tokenizer_path, tmp_path):
    path, options, fragments = write_bad(tmp_path, kind)
    with pytest.raises(DataError) as error:
        prepare_image_text([str(path)], tmp_path / "out", tokenizer_path, **options, **quiet)
    assert_one_line(error, str(path), *fragments)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def run_cli(capsys, *args):
    code = shardwright(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(code, err, *fragments):
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_the_prepare_command_takes_image_text_corpora(corpus, tokenizer_path, tmp_path, capsys):
    path, images = corpus
    common = ["--tokenizer", tokenizer_path, "--no-progress"]
    code, out, err = run_cli(capsys, path, "--image-column", "--text-field", "caption", "--output", tmp_path / "ds",
                             "--max-image-side", 64, *common)
    assert code == 0, err
    assert "preparing 1 image-text input(s)" in out and f"prepared {tmp_path / 'ds'}: 4 images" in out
    assert_same_samples(open_image_text(tmp_path / "ds"), expected_samples(images, CAPTIONS, tokenizer_path, 64))

    for args, fragments in [
        ([path, "--image-column", "--output", tmp_path / "a"], [str(path), "no column 'text'", "--text-field"]),
        ([path, "--image-column", "caption", "--text-field", "caption", "--output", tmp_path / "a"],
         ["is not an image column"]),
        ([write_parquet(tmp_path / "empty.parquet", [], []), "--image-column", "--text-field", "caption",
          "--output", tmp_path / "a"], ["no images to prepare"]),
        ([path, "--skip-broken-images", "--output", tmp_path / "a"],
         ["--skip-broken-images: only for image-text corpora"]),
        ([path, "--image-column", "--bos", "--output", tmp_path / "a"], ["--bos: only for text corpora"]),
    ]:
        code, _, err = run_cli(capsys, *args, *common)
        assert_cli_error(code, err, *fragments)
        assert not (tmp_path / "a").exists()
