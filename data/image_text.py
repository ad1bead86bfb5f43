"""A prepared image-text dataset (`shardwright prepare --image-column`, data/prepare_images.py) read back
as SOLO samples:

    dataset = open_image_text("data/captions")
    len(dataset); dataset[i]     # data.images.Sample: tokens, patches, is_target
    dataset.vision               # VisionTokens: the ids of <vision> <vpatch> <vrow_sep> </vision>
    dataset.tokenizer            # the Tokenizer of the captions (its vocabulary precedes the image tokens)
    dataset.sample_lengths()     # tokens per sample, without reading patches (for pack_samples)
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.images import PATCH_VALUES, Sample, VisionTokens, caption_sample, vision_token_count
from data.indexed import open_indexed
from data.prepare import MANIFEST
from data.prepare_images import IMAGE_TEXT_FORMAT, IMAGE_TEXT_FORMAT_VERSION, PATCH_STORE
from data.prepared import read_manifest
from data.tokenizer import Tokenizer


def open_image_text(path: str | Path) -> "ImageTextDataset":
    return ImageTextDataset(path)


class ImageTextDataset(Sequence):
    """The images of a prepared image-text directory, in corpus order, each as a data.images.Sample: tokens
    = <vision> rows of <vpatch> separated by <vrow_sep> </vision>, then the caption and EOS (int64); patches =
    uint8 [rows * cols, 3072] of its <vpatch> tokens in order, unnormalized; targets on the caption only.
    At open every shard pair is checked: present, whole, and holding what the manifest says."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path, IMAGE_TEXT_FORMAT, IMAGE_TEXT_FORMAT_VERSION)
        fix = f"prepare {self.path} again with --force"
        self.tokenizer = Tokenizer(self.path / "tokenizer.model")
        if self.tokenizer.fingerprint != self.manifest["tokenizer_fingerprint"]:
            raise DataError(f"{self.path / 'tokenizer.model'} is not the tokenizer {self.path / MANIFEST} names: {fix}")
        self.vision = VisionTokens(**self.manifest["vision_tokens"])
        self.vocab_size = self.manifest["vocab_size"]
        self._captions, self._patches = [], []
        for shard in self.manifest["shards"]:
            self._captions.append(self._open_captions(shard, fix))
            self._patches.append(self._open_patches(shard, fix))
        self._ends = np.cumsum([shard["documents"] for shard in self.manifest["shards"]], dtype=np.int64)

    def _open_captions(self, shard: dict, fix: str):
        prefix = self.path / shard["name"]
        captions = open_indexed(prefix, self.manifest["text_vocab_size"])
        images, tokens = len(captions.document_indices) - 1, int(captions.sequence_lengths.sum(dtype=np.int64))
        if (len(captions), images, tokens) != (shard["documents"], shard["documents"], shard["caption_tokens"]):
            raise DataError(f"{prefix}.idx holds {len(captions)} captions of {tokens} tokens in {images} documents but "
                            f"{self.path / MANIFEST} says {shard['documents']} of {shard['caption_tokens']}: {fix}")
        return captions

    def _open_patches(self, shard: dict, fix: str):
        prefix = self.path / f"{shard['name']}{PATCH_STORE}"
        patches = open_indexed(prefix, None)
        images, values = len(patches.document_indices) - 1, int(patches.sequence_lengths.sum(dtype=np.int64))
        if patches.index.dtype != np.uint8 or (patches.sequence_lengths % PATCH_VALUES).any():
            raise DataError(f"{prefix}.idx does not hold uint8 rows of {PATCH_VALUES}-value patches: {fix}")
        if (images, values) != (shard["documents"], shard["patches"] * PATCH_VALUES):
            raise DataError(f"{prefix}.idx holds {images} images of {values // PATCH_VALUES} patches but "
                            f"{self.path / MANIFEST} says {shard['documents']} of {shard['patches']}: {fix}")
        return patches

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of a dataset of {len(self)}")
        index %= len(self)
        shard = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[shard - 1]) if shard else 0)
        patches = self._patches[shard]
        first, end = int(patches.document_indices[local]), int(patches.document_indices[local + 1])
        rows, cols = end - first, int(patches.sequence_lengths[first]) // PATCH_VALUES
        if int(patches.sequence_lengths[first:end].sum()) != rows * cols * PATCH_VALUES:
            raise DataError(f"image {index} of {self.path} has rows of different lengths: prepare it again with "
                            "--force")
        # A document's rows are contiguous in the .bin (open_indexed checks the pointers): one read.
        values = np.array(patches.get(first, 0, rows * cols * PATCH_VALUES))
        caption = self._captions[shard][local]
        return caption_sample(values.reshape(rows * cols, PATCH_VALUES), rows, cols, caption, self.vision)

    def sample_lengths(self) -> np.ndarray:
        """Tokens of every sample (image markup + caption + EOS), int64, from the indexes alone."""
        lengths = []
        for captions, patches in zip(self._captions, self._patches):
            starts = patches.document_indices[:-1]
            rows = np.diff(patches.document_indices)
            cols = patches.sequence_lengths[starts] // PATCH_VALUES
            lengths.append(vision_token_count(rows, cols) + captions.sequence_lengths)
        return np.concatenate(lengths).astype(np.int64)
