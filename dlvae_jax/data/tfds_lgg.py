"""TFDS builder `lgg_mri`: the LGG folder as array_record, readable without TensorFlow.

The manual dir is a dataset folder in the LGG layout (see `dlvae_jax.data.lgg`).
Features are `tfds.features.Tensor` / `Text` only, so building and reading
(`tfds.data_source`) never import TensorFlow. Each example is one slice:

    image         uint8 [H, W, 3]  pre-contrast, FLAIR, post-contrast
    mask          uint8 [H, W]     {0, 1}
    patient       bytes            "TCGA_<inst>_<patient>"
    institution   bytes            "<inst>"
    slice_number  int32 []         the <n> of the file name
    has_tumor     bool []

Splits train / validation / test are patient-level (`dlvae_jax.data.splits`),
chosen by `split_seed`, or given outright as patient lists (`splits=`: how
`dlvae_jax.data.source` builds a run's cache from its workdir splits).
Examples are stored in (patient, slice_number) order (TFDS shuffling is
disabled) so builds are reproducible; shuffle when reading.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from dlvae_jax.data import lgg
from dlvae_jax.data.splits import make_splits
from dlvae_jax.errors import DataError

NAME = "lgg_mri"
# The download's slices are all 256 x 256; a fixed shape lets TFDS decode
# straight into a preallocated array.
DEFAULT_IMAGE_SIZE = 256
_BYTES = tfds.features.Encoding.BYTES


class LggMri(tfds.core.GeneratorBasedBuilder):
    """LGG FLAIR/pre/post-contrast MRI slices with tumor masks, patient-level splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Slices of the LGG segmentation dataset (kaggle_3m layout)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the LGG segmentation dataset folder (kaggle_3m: TCGA_<inst>_<patient>_<date>/ "
        "patient folders with <name>_<n>.tif and <name>_<n>_mask.tif) in the manual dir, "
        "or pass it with `dlvae-jax data build --data-dir DIR`. `dlvae-jax data synth` "
        "writes a synthetic dataset in the same layout."
    )

    def __init__(
        self,
        *,
        split_seed: int = 0,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        image_size: int = DEFAULT_IMAGE_SIZE,
        index: lgg.LggIndex | None = None,
        skip_bad: bool = False,
        splits: dict[str, list[str]] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("file_format", "array_record")
        self._splits = None if splits is None else {k: list(v) for k, v in splits.items()}
        self._split_seed = int(split_seed)
        self._fractions = tuple(fractions)
        self._image_size = int(image_size)
        self._index = index
        self._skip_bad = skip_bad
        self.splits_used: dict[str, list[str]] | None = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # BYTES: raw pixel bytes. The default stores uint8 as one varint
                # per pixel, ~10x slower to write and to parse.
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=_BYTES),
                "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=_BYTES),
                "patient": tfds.features.Text(),
                "institution": tfds.features.Text(),
                "slice_number": tfds.features.Tensor(shape=(), dtype=np.int32),
                "has_tumor": tfds.features.Tensor(shape=(), dtype=np.bool_),
            }),
            supervised_keys=("image", "mask"),
            disable_shuffling=True,
            homepage="https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation",
        )

    def _split_generators(self, dl_manager):
        index = self._index
        if index is None:
            index = lgg.scan(dl_manager.manual_dir, skip_bad=self._skip_bad)
        h, w, _ = index.image_shape
        if (h, w) != (self._image_size, self._image_size):
            raise DataError(f"{index.root}: slices are {h}x{w}, the builder expects "
                            f"{self._image_size}x{self._image_size} (pass image_size)")
        if self._splits is not None:
            self.splits_used = self._splits
        else:
            self.splits_used = make_splits(index, self._split_seed, self._fractions)
        return {
            name: self._generate_examples(index.for_patients(pids))
            for name, pids in self.splits_used.items()
            if pids  # TFDS cannot write an empty split
        }

    def _generate_examples(self, records):
        for r in records:
            image, mask = lgg.load_slice(r, channels="all")
            yield f"{r.patient}_{r.slice_number:04d}", {
                "image": image,
                "mask": mask,
                "patient": r.patient,
                "institution": r.institution,
                "slice_number": np.int32(r.slice_number),
                "has_tumor": np.bool_(r.has_tumor),
            }


def build(
    data_dir: str | os.PathLike,
    tfds_dir: str | os.PathLike,
    split_seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    index: lgg.LggIndex | None = None,
    overwrite: bool = False,
) -> tuple[LggMri, dict[str, list[str]]]:
    """Builds `lgg_mri` from `data_dir` into `tfds_dir`; returns (builder, splits).

    Scan the folder first (pass `index`) so bad input fails before anything is
    written. Only `tfds_dir/lgg_mri/` is ours (`tfds_dir` may hold other
    datasets): it is an `dlvae_jax.outdir.output_folder`, staged beside
    itself, holding `<version>/` and the dataset's `splits.json`, and renamed
    into place only once TFDS has finished, so a failed or interrupted build
    leaves neither a partial dataset nor TFDS's `downloads/` behind, and the
    previous build stays as it was.
    """
    from dlvae_jax.data.splits import write_splits
    from dlvae_jax.outdir import output_folder

    if index is None:
        index = lgg.scan(data_dir)
    tfds_dir = Path(tfds_dir)
    kwargs = dict(split_seed=split_seed, fractions=fractions, image_size=index.image_shape[0], index=index)
    final = tfds_dir / NAME
    if (final / str(LggMri.VERSION)).exists() and not overwrite:
        raise DataError(f"{final / str(LggMri.VERSION)}: already built (pass --overwrite to rebuild)")
    with output_folder(final, "data build", overwrite=overwrite, inputs=[data_dir]) as tmp:
        splits = prepare_into(tmp, data_dir, **kwargs)
        write_splits(tmp / "splits.json", index, splits, split_seed, fractions)
    return LggMri(data_dir=os.fspath(tfds_dir), **kwargs), splits


def prepare_into(folder: str | os.PathLike, data_dir: str | os.PathLike, *, verify=None,
                 **builder_kwargs) -> dict[str, list[str]]:
    """Runs the builder into `folder/<version>/` (an `lgg_mri/` folder being staged); returns the splits used.

    `builder_kwargs` go to `LggMri` (index, image_size, split_seed and
    fractions, or splits). `verify(builder)`, if given, runs once TFDS has
    finished, while the builder can still read what it wrote. TFDS's own
    staging (`folder/.tfds`, its `downloads/`) is removed afterwards.
    """
    folder = Path(folder)
    stage = folder / ".tfds"  # TFDS writes DATA_DIR/lgg_mri/<version> and DATA_DIR/downloads
    builder = LggMri(data_dir=os.fspath(stage), **builder_kwargs)
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir))
    # TFDS's own progress lines name the staging folder, which is not the
    # user's; the command prints where the dataset landed instead.
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=config)
    if verify is not None:
        verify(builder)
    os.rename(builder.data_dir, folder / str(LggMri.VERSION))
    shutil.rmtree(stage)
    return builder.splits_used


def built_image_size(tfds_dir: str | os.PathLike) -> int:
    """Image side length of the built dataset, read from its features.json."""
    path = Path(tfds_dir) / NAME / LggMri.VERSION.__str__() / "features.json"
    try:
        feats = json.loads(path.read_text())["featuresDict"]["features"]
        return int(feats["image"]["tensor"]["shape"]["dimensions"][0])
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise DataError(f"{path}: no built {NAME} dataset here (run `dlvae-jax data build`): {err}") from None


def data_source(tfds_dir: str | os.PathLike, split: str):
    """Random-access source of split `split`: len(), [i] -> dict of NumPy arrays (see module doc).

    The builder's feature shapes come from code, so the image size the data
    was built with is passed back in from features.json.
    """
    size = built_image_size(tfds_dir)
    return tfds.data_source(NAME, split=split, data_dir=os.fspath(tfds_dir), download=False,
                            builder_kwargs={"image_size": size})


# ----------------------------------------------------------------------------- fast raw decoding
#
# TFDS stores each example as a serialized tf.train.Example. Its generic parser
# (protobuf FromString, then per-feature NumPy conversion) costs ~1-2 ms for a
# 256x256x3 slice, which alone would cap one core near 600 slices/s. The layout
# of an Example is small and fixed by the protobuf wire format:
#   Example  { 1: Features }
#   Features { 1: repeated MapEntry { 1: key string, 2: Feature } }
#   Feature  { 1: BytesList { 1: repeated bytes } | 2: FloatList | 3: Int64List { 1: packed varint } }
# so `decode_raw` walks it directly and views the pixel bytes without copying.
# Tests check it against TFDS's own decoding and against the TIFF pixels.


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yields (field number, wire type, value) of one message; value is a memoryview for LEN fields."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            yield field, wire, buf[pos:pos + n]
            pos += n
        elif wire == 0:
            v, pos = _varint(buf, pos)
            yield field, wire, v
        elif wire == 5:
            yield field, wire, buf[pos:pos + 4]
            pos += 4
        elif wire == 1:
            yield field, wire, buf[pos:pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _feature_value(buf: memoryview):
    """Feature -> bytes-like (BytesList with one entry) or list of int (Int64List)."""
    for kind, _, payload in _fields(buf):
        if kind == 1:  # BytesList
            values = [v for f, _, v in _fields(payload) if f == 1]
            return values[0] if len(values) == 1 else values
        if kind == 3:  # Int64List, packed or not
            out = []
            for f, w, v in _fields(payload):
                if w == 2:
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        out.append(x - (1 << 64) if x >= 1 << 63 else x)
                else:
                    out.append(v - (1 << 64) if v >= 1 << 63 else v)
            return out
        if kind == 2:  # FloatList, packed; lgg_mri has none
            packed = [v for f, w, v in _fields(payload) if f == 1 and w == 2]
            return np.frombuffer(b"".join(bytes(v) for v in packed), "<f4").tolist()
    return []


def decode_raw(record: bytes, image_size: int = DEFAULT_IMAGE_SIZE) -> dict:
    """Decodes one raw `lgg_mri` record (tf.train.Example bytes) without protobuf.

    Returns {"image": uint8 [S, S, 3], "mask": uint8 [S, S], "patient": bytes,
    "institution": bytes, "slice_number": int, "has_tumor": bool}; the arrays
    are read-only views into `record`.
    """
    buf = memoryview(record)
    out = {}
    for f, _, features in _fields(buf):
        if f != 1:
            continue
        for g, _, entry in _fields(features):
            if g != 1:
                continue
            key = value = None
            for h, _, v in _fields(entry):
                if h == 1:
                    key = bytes(v).decode()
                elif h == 2:
                    value = _feature_value(v)
            out[key] = value
    s = image_size
    return {
        "image": np.frombuffer(out["image"], np.uint8).reshape(s, s, 3),
        "mask": np.frombuffer(out["mask"], np.uint8).reshape(s, s),
        "patient": bytes(out["patient"]),
        "institution": bytes(out["institution"]),
        "slice_number": int(out["slice_number"][0]),
        "has_tumor": bool(out["has_tumor"][0]),
    }


def raw_source(tfds_dir: str | os.PathLike, split: str):
    """Like `data_source`, but items are the raw record bytes (decode with `decode_raw`)."""
    size = built_image_size(tfds_dir)
    return tfds.data_source(NAME, split=split, data_dir=os.fspath(tfds_dir), download=False,
                            builder_kwargs={"image_size": size},
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
