"""grain input pipeline from the `lgg_mri` array_record source to device batches.

The batch contract, used unchanged from the host batch to the model's inputs
(B = per-process batch size on the host, global batch size on the devices):

    image_BxHxWxC  uint8 [B, H, W, C]  C = 1 for FLAIR (channels="flair"),
                                       3 for pre-contrast/FLAIR/post-contrast ("all")
    mask_BxHxW     uint8 [B, H, W]     {0, 1}
    label_B        int32 [B]           1 if the mask has a tumor pixel
    valid_B        bool  [B]           False on evaluation padding
    index_B        int32 [B]           record index within the split, -1 on padding

`BATCH_KEYS` lists them. Two loaders produce it: `BatchLoader` from the TFDS
`lgg_mri` array_record source and `ArrayLoader` from arrays in memory; a
loader is any callable index_B -> batch with `len()`. A run gets its loaders
from `dlvae_jax.data.source.split_loader`, which picks between the two and
builds the array_record cache; both give the same grain dataset (same
structure, same iterator state) and the same batches, byte for byte.

Training: one global permutation per epoch (same seed on every process,
reseeded each epoch by grain), truncated to a multiple of the global batch so
every process yields the same number of batches (drop-remainder), then split
across processes with a stride. Sharding comes before batching and the
loader, so a process's loader is only ever called with its own indices (an
array_record loader reads its shard and nothing else). Evaluation: no
shuffle; the split is padded up to a multiple of the global batch and padding
carries valid=False, so every slice is visited exactly once whatever the
batch size; each process's index list is its own as well.

Placing batches on devices (meshes, shardings) is the runners' job:
`dlvae_jax.train.runners`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import grain
import numpy as np

from dlvae_jax.data import tfds_lgg
from dlvae_jax.data.lgg import CHANNEL_CHOICES, FLAIR_CHANNEL
from dlvae_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's slot: index in [0, count)."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_jax(cls) -> "Shard":
        opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        return cls(opts.shard_index, opts.shard_count)


BATCH_KEYS = ("image_BxHxWxC", "mask_BxHxW", "label_B", "valid_B", "index_B")


def _batch(images, masks, index_B, valid_B) -> dict[str, np.ndarray]:
    if images.ndim == 3:
        images = images[..., None]
    return {
        "image_BxHxWxC": images,
        "mask_BxHxW": masks,
        "label_B": masks.reshape(len(masks), -1).any(axis=1).astype(np.int32),
        "valid_B": valid_B,
        "index_B": index_B.astype(np.int32),
    }


class ArrayLoader:
    """Maps record indices [B] (-1 = padding) to a host batch from arrays in memory.

    images: uint8 [N, H, W] or [N, H, W, C]; masks: uint8 [N, H, W] in {0, 1}.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, index_B: np.ndarray) -> dict[str, np.ndarray]:
        index_B = np.asarray(index_B, np.int64)
        valid_B = index_B >= 0
        safe = np.where(valid_B, index_B, 0)
        images = self.images[safe]
        masks = self.masks[safe]
        images[~valid_B] = 0
        masks[~valid_B] = 0
        return _batch(images, masks, index_B, valid_B)


class BatchLoader:
    """Maps an int array of record indices [B] (-1 = padding) to a host batch.

    Reads raw records in one call and decodes them with `tfds_lgg.decode_raw`
    straight into preallocated batch arrays.
    """

    def __init__(self, tfds_dir: str | os.PathLike, split: str, channels: str = "flair"):
        if channels not in CHANNEL_CHOICES:
            raise ValueError(f"channels must be one of {CHANNEL_CHOICES}, got {channels!r}")
        self.source = tfds_lgg.raw_source(tfds_dir, split)
        self.size = tfds_lgg.built_image_size(tfds_dir)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.source)

    def __call__(self, index_B: np.ndarray) -> dict[str, np.ndarray]:
        index_B = np.asarray(index_B, np.int64)
        b, s = len(index_B), self.size
        shape = (b, s, s) if self.channels == "flair" else (b, s, s, 3)
        images = np.zeros(shape, np.uint8)
        masks = np.zeros((b, s, s), np.uint8)
        valid_B = index_B >= 0
        rows = np.flatnonzero(valid_B)
        if rows.size:
            records = self.source.__getitems__(index_B[rows].tolist())
            for row, rec in zip(rows, records):
                ex = tfds_lgg.decode_raw(rec, s)
                images[row] = ex["image"][..., FLAIR_CHANNEL] if self.channels == "flair" else ex["image"]
                masks[row] = ex["mask"]
        return _batch(images, masks, index_B, valid_B)


def _local_batch(global_batch_size: int, shard: Shard) -> int:
    if global_batch_size % shard.count:
        raise DataError(f"global batch size {global_batch_size} is not divisible by {shard.count} processes")
    return global_batch_size // shard.count


Loader = Callable[[np.ndarray], dict]


def _loader(source, split: str, channels: str):
    """A loader as given, or the TFDS loader of a built `lgg_mri` folder."""
    if isinstance(source, (str, os.PathLike)):
        return BatchLoader(source, split, channels)
    return source


def train_dataset(
    source: str | os.PathLike | Loader,
    split: str = "train",
    global_batch_size: int = 64,
    seed: int = 0,
    num_epochs: int | None = None,
    channels: str = "flair",
    shard: Shard | None = None,
) -> grain.MapDataset:
    """Shuffled training batches for this process; `num_epochs=None` repeats forever.

    `source` is a built TFDS dir (then `split` and `channels` select from it) or a loader.
    """
    shard = shard or Shard.from_jax()
    b = _local_batch(global_batch_size, shard)
    loader = _loader(source, split, channels)
    n_used = len(loader) // global_batch_size * global_batch_size
    if n_used == 0:
        raise DataError(f"split {split!r} has {len(loader)} slices, fewer than one batch of {global_batch_size}")
    ds = grain.MapDataset.range(len(loader)).shuffle(seed=seed)[:n_used][shard.index::shard.count]
    ds = ds.batch(b, drop_remainder=True)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # grain reseeds the shuffle each epoch
    return ds.map(loader)


def eval_indices(n: int, global_batch_size: int, shard: Shard) -> np.ndarray:
    """Record indices [num_batches * B] of this process for evaluation, -1 for padding.

    Global position i (of ceil(n / G) * G) goes to process (i % G) // B, so the
    processes together cover 0..n-1 exactly once.
    """
    b = _local_batch(global_batch_size, shard)
    n_batches = -(-n // global_batch_size)
    pos = (np.arange(n_batches)[:, None] * global_batch_size + shard.index * b + np.arange(b)[None, :]).ravel()
    return np.where(pos < n, pos, -1)


def eval_dataset(
    source: str | os.PathLike | Loader,
    split: str = "validation",
    global_batch_size: int = 64,
    channels: str = "flair",
    shard: Shard | None = None,
) -> grain.MapDataset:
    """Evaluation batches for this process in record order, padded with valid_B=False."""
    shard = shard or Shard.from_jax()
    b = _local_batch(global_batch_size, shard)
    loader = _loader(source, split, channels)
    idx = eval_indices(len(loader), global_batch_size, shard)
    return grain.MapDataset.source(idx).batch(b).map(loader)


def host_iterator(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """Iterates `ds` with `num_threads` reader threads and `prefetch` batches in flight."""
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
