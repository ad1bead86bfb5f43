"""What SOLO trains on: packed image-caption rows, and how well it captions at the end of a run.

Batches hold the text keys (tokens, positions, targets, document_ids) plus `patches` [rows, seq_len, 3072]:
each `<vpatch>` token's patch normalized with ImageNet's statistics, zeros at every other token. It is cut
on the sequence with the tokens (context parallelism: a rank gets only its tokens' patches) and is a
first-stage input (pipeline parallelism). Rows pack whole samples (data/images.py: build_row): positions
restart and attention stays inside each sample (document_ids are always served), and targets are the
captions' tokens only (image markup is never a target), so the loss is the text token loss.

The data is the embedded demo (data/shapes.py), with the tokenizer of the embedded text corpus
(data.source, data.vocab_size): the one an `llm` run of the same data section trains, so such a run's
weights can start a SOLO run. At the end of a demo run, greedy captions of held-out images are scored against
their attributes, and again with every patch zeroed (the image blanked): what the image adds.
Or it is one image-text dataset written by `shardwright prepare --image-column` (data.prepared), split into
train / valid / test by data.splits as text datasets are (data.prepared.split_blocks); a prepared corpus has
no attributes to score, so its runs end without the caption evaluation.
"""
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import product
from pathlib import Path

import numpy as np
import torch

from data.build import blend_entries, resolve_tokenizer, split_fractions
from data.embedded import prepare_embedded
from data.errors import DataError
from data.images import (PATCH, PATCH_VALUES, Sample, VisionTokens, build_row, caption_sample, image_tokens,
                         normalize_patches, pack_samples, patchify)
from data.image_text import open_image_text
from data.loader import GlobalBatchLoader
from data.prepare_images import IMAGE_TEXT_FORMAT
from data.prepared import split_blocks
from data.shapes import ATTRIBUTES, COLOURS, PLACES, SHAPES, SIDE, SIZES, Shape, draw, parse_caption, shape_of
from data.tokenizer import Tokenizer
from models.common.text import TEXT_DATA, TEXT_KEYS
from models.spec import BatchKey, DataSpec

SOLO_KEYS = {**TEXT_KEYS, "patches": BatchKey(sequence_dim=1, consumer="inputs")}
TRAIN_IMAGES = 16384
VALID_IMAGES = 512
CAPTION_EVAL_IMAGES = 256  # the first of the valid split, captioned at the end of a run
GRID = SIDE // PATCH  # a demo image is GRID x GRID patches


def model_patches(tokens: torch.Tensor, patches: torch.Tensor, patch_token: int) -> torch.Tensor:
    """The model's `patches` input from uint8 patches [..., T, 3072] (build_row's): normalized, zero wherever the
    token is not `<vpatch>` (normalization alone would turn a zero pixel into -mean/std)."""
    return normalize_patches(patches) * (tokens == patch_token).unsqueeze(-1)


class ShapesSamples:
    """The demo's images of one split as captioned samples (data.images.Sample, each image drawn when read): the
    interface of a prepared dataset (data/image_text.py), so both are packed by PackedRows."""

    def __init__(self, seed: int, split: str, n_images: int, tokenizer: Tokenizer, vision: VisionTokens):
        self.seed, self.split, self.n_images, self.tokenizer, self.vision = seed, split, n_images, tokenizer, vision

    def caption_tokens(self, shape: Shape) -> list[int]:
        return self.tokenizer.encode(shape.caption) + [self.tokenizer.eos_id]

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, i: int) -> Sample:
        image, shape = draw(self.seed, self.split, i)
        patches, rows, cols = patchify(image)
        return caption_sample(patches, rows, cols, self.caption_tokens(shape), self.vision)

    def sample_lengths(self) -> np.ndarray:
        """Tokens of every sample, from the captions alone (no image drawn)."""
        markup = len(image_tokens(GRID, GRID, self.vision))
        return np.asarray([markup + len(self.caption_tokens(shape_of(self.seed, self.split, i)))
                           for i in range(self.n_images)], dtype=np.int64)


class PackedRows:
    """Samples `indices` of a sequence of samples (ShapesSamples, or a prepared ImageTextDataset) packed in order
    into rows of seq_len tokens (data.images.pack_samples, build_row), each row built when it is read."""

    def __init__(self, samples, indices: np.ndarray, seq_len: int, pad_token: int):
        self.samples, self.vision, self.seq_len, self.pad_token = samples, samples.vision, seq_len, pad_token
        self.images = len(indices)
        self.rows = [indices[row] for row in pack_samples(samples.sample_lengths()[indices], seq_len)]
        self.num_samples = len(self.rows)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        return build_row([self.samples[int(i)] for i in self.rows[row]], self.seq_len, self.pad_token,
                         self.vision.patch)


@dataclass
class PreparedImageText:
    """What the trainer reads of a prepared image-text run's data: its tokenizer."""
    tokenizer: Tokenizer


class CaptionLoader(GlobalBatchLoader):
    """The global batch of each step (a function of seed and step, GlobalBatchLoader) of packed caption rows."""

    def __init__(self, rows: PackedRows, *args):
        super().__init__(rows, *args)
        self.patch_token = rows.vision.patch

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        rows = [samples[i] for samples, i in self.rank_samples(step)]
        batch = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}
        batch["patches"] = model_patches(batch["tokens"], batch["patches"], self.patch_token)
        return [dict(zip(batch, values)) for values in zip(*(v.split(self.micro_batch_size) for v in batch.values()))]


@dataclass
class ShapesDemo:
    """The demo's data: the tokenizer (what the trainer reads), the image markup ids, the valid split (for the
    caption evaluation) and the training length."""
    tokenizer: Tokenizer
    vision: VisionTokens
    valid: ShapesSamples
    seq_len: int

    @cached_property
    def longest_caption(self) -> int:
        """Tokens of the longest caption, EOS included."""
        return max(len(self.valid.caption_tokens(Shape(*a))) for a in product(SIZES, COLOURS, SHAPES, PLACES))


def build_loaders(data_cfg, seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  seed: int, log=print):
    if data_cfg.prepared:
        return prepared_loaders(data_cfg, seq_len, global_batch_size, micro_batch_size, dp_rank, dp_size, seed, log)
    text = prepare_embedded(data_cfg.source, data_cfg.vocab_size, Path(data_cfg.cache_dir).expanduser(),
                            data_cfg.valid_fraction, log=log)
    vision = VisionTokens.after(text.tokenizer.vocab_size)
    train_samples, valid_samples = (ShapesSamples(seed, split, n, text.tokenizer, vision)
                                    for split, n in (("train", TRAIN_IMAGES), ("valid", VALID_IMAGES)))
    train, valid = (PackedRows(samples, np.arange(len(samples)), seq_len, text.tokenizer.pad_id)
                    for samples in (train_samples, valid_samples))
    log(f"shapes demo: {TRAIN_IMAGES} train images in {len(train)} rows, {VALID_IMAGES} valid images in "
        f"{len(valid)} rows, tokenizer of {data_cfg.source} (vocab {text.tokenizer.vocab_size} + 4 image tokens)")
    loaders = (CaptionLoader(rows, global_batch_size, micro_batch_size, dp_rank, dp_size, seed)
               for rows in (train, valid))
    return (ShapesDemo(text.tokenizer, vision, valid_samples, seq_len), *loaders)


def split_indices(n_samples: int, fractions: list[float], split: str) -> np.ndarray:
    """The indices of a split's samples, in corpus order (data.prepared.split_blocks: as text datasets split)."""
    return np.concatenate([np.arange(lo, hi) for lo, hi in split_blocks(n_samples, fractions, split)]
                          + [np.zeros(0, dtype=np.int64)])


def prepared_loaders(data_cfg, seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                     dp_size: int, seed: int, log=print):
    entries = blend_entries(data_cfg.prepared)
    if len(entries) != 1:
        raise DataError(f"data.prepared lists {len(entries)} datasets, but model.family=solo trains on one prepared "
                        "image-text dataset (blends of them are not built): list one")
    dataset = open_image_text(entries[0].path)
    tokenizer = resolve_tokenizer(data_cfg, [(entries[0].path, dataset.manifest)])
    fractions = split_fractions(data_cfg.splits)
    train, valid = (PackedRows(dataset, split_indices(len(dataset), fractions, split), seq_len, tokenizer.pad_id)
                    for split in ("train", "valid"))
    for split, rows in (("train", train), ("valid", valid)):
        if rows.num_samples == 0:
            raise DataError(f"the {split} split of {entries[0].path} (data.splits={data_cfg.splits}) holds no image: "
                            f"give it a share, or prepare more images")
    log(f"prepared image-text dataset {entries[0].path}: train {train.images} images in {len(train)} rows, valid "
        f"{valid.images} images in {len(valid)} rows, tokenizer {tokenizer.model_path} (vocab {tokenizer.vocab_size} "
        f"+ 4 image tokens)")
    loaders = (CaptionLoader(rows, global_batch_size, micro_batch_size, dp_rank, dp_size, seed)
               for rows in (train, valid))
    return (PreparedImageText(tokenizer), *loaders)


def prompt_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """A text-only prompt: no image, so every patch is zero."""
    return {**TEXT_DATA.prompt_batch(tokens), "patches": torch.zeros(*tokens.shape, PATCH_VALUES, device=tokens.device)}


def caption_prompts(demo: ShapesDemo, images: range, blanked: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                              torch.Tensor]:
    """Model inputs for captioning `images`: each image's markup then padding in a slot of its own (slots packed
    into rows of seq_len tokens, positions restarting and attention kept inside each), its patches or zeros; and
    each image's row and first caption position."""
    markup = len(image_tokens(GRID, GRID, demo.vision))
    width = markup + demo.longest_caption
    per_row = demo.seq_len // width
    if per_row == 0:
        raise DataError(f"train.seq_len={demo.seq_len} is shorter than an image and its caption ({width} tokens): "
                        f"raise it")
    samples = []
    for i in images:
        image, _ = draw(demo.valid.seed, demo.valid.split, i)
        patches, r, c = patchify(image)
        samples.append(caption_sample(patches, r, c, [demo.tokenizer.pad_id] * demo.longest_caption, demo.vision))
    rows = [build_row(samples[k:k + per_row], demo.seq_len, demo.tokenizer.pad_id, demo.vision.patch)
            for k in range(0, len(samples), per_row)]
    batch = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0] if key != "targets"}
    batch["patches"] = model_patches(batch["tokens"], batch["patches"], demo.vision.patch) * (not blanked)
    slot = torch.arange(len(samples))
    return batch, slot // per_row, slot % per_row * width + markup


def greedy_captions(demo: ShapesDemo, greedy_tokens, images: range, blanked: bool) -> list[str]:
    """Each image's caption decoded greedily after `</vision>` until EOS; "" when the model emits an image token."""
    batch, rows, starts = caption_prompts(demo, images, blanked)
    tokens = batch["tokens"]
    for k in range(demo.longest_caption):
        tokens[rows, starts + k] = greedy_tokens(batch)[rows, starts + k - 1]
        if (tokens[rows[:, None], starts[:, None] + torch.arange(k + 1)] == demo.tokenizer.eos_id).any(1).all():
            break
    captions = []
    for row, start in zip(rows.tolist(), starts.tolist()):
        ids = tokens[row, start:start + demo.longest_caption].tolist()
        ids = ids[:ids.index(demo.tokenizer.eos_id)] if demo.tokenizer.eos_id in ids else ids
        captions.append("" if max(ids, default=0) >= demo.tokenizer.vocab_size else demo.tokenizer.decode(ids))
    return captions


def caption_accuracy(demo: ShapesDemo, greedy_tokens) -> dict[str, float]:
    """DataSpec.final_evaluation: over the first CAPTION_EVAL_IMAGES valid images, the fraction of greedy captions
    that are exactly right (`caption_exact`) and that name each attribute right (`caption_<attribute>`), then the
    same with every patch zeroed (`..._blanked`: the model sees the image markup but no pixels)."""
    if not isinstance(demo, ShapesDemo):  # a prepared corpus: no attributes to score captions against
        return {}
    truth = [shape_of(demo.valid.seed, demo.valid.split, i) for i in range(CAPTION_EVAL_IMAGES)]
    metrics = {}
    for blanked in (False, True):
        captions = greedy_captions(demo, greedy_tokens, range(CAPTION_EVAL_IMAGES), blanked)
        said = [parse_caption(c) for c in captions]
        suffix = "_blanked" if blanked else ""
        metrics[f"caption_exact{suffix}"] = float(np.mean([c == t.caption for c, t in zip(captions, truth)]))
        for name in ATTRIBUTES:
            metrics[f"caption_{name}{suffix}"] = float(np.mean(
                [s is not None and getattr(s, name) == getattr(t, name) for s, t in zip(said, truth)]))
    return metrics


SOLO_DATA = replace(TEXT_DATA, keys=SOLO_KEYS, build_loaders=build_loaders, prompt_batch=prompt_batch,
                    final_evaluation=caption_accuracy, prepared_format=IMAGE_TEXT_FORMAT)
