"""Where a run's slices come from: arrays in memory, or an array_record cache.

`split_loader(index, splits, split_name, channels, source=..., cache_dir=...,
tfds_dir=...)` returns the loader of one split of a run: `len(loader)`
slices, `loader(index_B)` -> a host batch (the contract in
`dlvae_jax.data.pipeline`), and `loader.records`, the split's `SliceRecord`s
in loader order, which is always `records_for_split(index, splits,
split_name)`: index i of a batch is `loader.records[i]`, whatever the source.
Both loaders go into the same `pipeline.train_dataset` / `eval_dataset`, so
the grain dataset, its iterator state (`get_state` / `set_state`) and every
batch are the same, byte for byte, on both paths.

Sources:

- "memory" (`MemoryLoader`): the split's TIFFs decoded into one array on the
  first batch (`lgg.load_arrays`), then batches are NumPy indexing. Every
  process holds the whole split.
- "array_record" (`ArrayRecordLoader`): records read per batch from an
  `lgg_mri` TFDS build. grain calls the loader only with the indices of this
  process's shard (`train_dataset` shards the permutation before batching and
  mapping; `eval_dataset` builds each process's own index list), so a process
  reads its shard and nothing else, and holds only the batches in flight.
  The build is either
    * a cache made from the run's own splits (`cache_dir`): built once, by
      the first caller, into ``cache_dir/lgg_mri-<key>/lgg_mri/`` (key: data
      folder, patient lists, image size, format), and reused by every later
      call (and run, and process on a shared file system) while the slice
      files are unchanged (their sizes and mtimes are fingerprinted); or
    * a build the user made with `dlvae-jax data build` (`tfds_dir`): used
      as it is, once its splits are checked against the run's.
- "auto": `choose_source` on the slices of all the run's splits.

A cache is staged in a temporary folder and renamed into place complete
(`dlvae_jax.outdir.output_folder`), with `cache.json` (its inputs and the
size of every file) written last before the rename. A cache whose inputs no
longer match, or whose files are missing or of another size (truncated,
half-copied), is built again; builders are serialized by a lock file beside
it, so processes sharing a cache build it once. Only files of the run's
splits are read to build it. TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from dlvae_jax import outdir
from dlvae_jax.data import lgg, pipeline, tfds_lgg
from dlvae_jax.data.lgg import CHANNEL_CHOICES, LggIndex, SliceRecord
from dlvae_jax.data.splits import records_for_split, split_report
from dlvae_jax.errors import DataError, OutputError

SOURCES = ("auto", "memory", "array_record")

# "auto" keeps a run in memory while its slices (image channels + mask, uint8)
# take at most this many bytes on each process: 512 MiB is 4096 slices of
# 256x256 FLAIR (128 KiB a slice with its mask) or 2048 with all three
# channels (256 KiB). The whole public kaggle_3m download (3929 slices, 110
# patients) thus stays in memory for FLAIR. Below this size the in-memory path
# costs little: reading 4096 slices from TIFF takes ~7 s on 2 cores (~600
# slices/s), no more than building the cache would (~180 slices/s), and half
# a GiB per process is small beside a training job's accelerator host memory.
# Above it, every process (several per host on multi-GPU hosts) would hold the
# whole split, and the one-off cache build is repaid on every later run.
MEMORY_BUDGET_BYTES = 512 * 2**20

CACHE_FORMAT = 1  # bump when the cache's layout or contents change
CACHE_COMMAND = "data cache"  # the outdir marker's command of a cache folder
CACHE_FILE = "cache.json"
_LOCK_NAME = f".{tfds_lgg.NAME}.cache-lock"

# Cache builds done by this process (tests check that a cache is reused).
build_count = 0


def slice_bytes(image_size: int, channels: str = "flair") -> int:
    """Bytes one slice takes in memory: uint8 image channels plus its uint8 mask."""
    c = 1 if channels == "flair" else 3
    return int(image_size) ** 2 * (c + 1)


def choose_source(n_slices: int, requested: str = "auto", *,
                  bytes_per_slice: int = slice_bytes(tfds_lgg.DEFAULT_IMAGE_SIZE)) -> str:
    """"memory" or "array_record": `requested` itself unless it is "auto".

    "auto" is "memory" while `n_slices * bytes_per_slice` fits in
    `MEMORY_BUDGET_BYTES` (512 MiB: 4096 slices of 256x256 FLAIR, 2048 with all
    channels; the reasoning is at `MEMORY_BUDGET_BYTES`), "array_record" above.
    """
    if requested not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {requested!r}")
    if requested != "auto":
        return requested
    return "memory" if int(n_slices) * int(bytes_per_slice) <= MEMORY_BUDGET_BYTES else "array_record"


# ----------------------------------------------------------------------------- loaders


class MemoryLoader:
    """Loader of slices held in memory: TIFFs decoded on the first batch (or `load()`).

    `len()` and `records` never read a file. Thread-safe: grain's reader
    threads may call it at once; the split is loaded exactly once.
    """

    kind = "memory"

    def __init__(self, records: Sequence[SliceRecord], channels: str = "flair"):
        if channels not in CHANNEL_CHOICES:
            raise ValueError(f"channels must be one of {CHANNEL_CHOICES}, got {channels!r}")
        self.records = list(records)
        self.channels = channels
        self._arrays: pipeline.ArrayLoader | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def load(self) -> pipeline.ArrayLoader:
        """The split as an `ArrayLoader` (images, masks), loading it on the first call."""
        with self._lock:
            if self._arrays is None:
                images, masks = lgg.load_arrays(self.records, self.channels)
                self._arrays = pipeline.ArrayLoader(images, masks)
        return self._arrays

    def __call__(self, index_B: np.ndarray) -> dict[str, np.ndarray]:
        return self.load()(index_B)


class ArrayRecordLoader(pipeline.BatchLoader):
    """Loader reading the records of each batch from an `lgg_mri` build, nothing more.

    `tfds_dir` is the TFDS data dir (holding `lgg_mri/<version>/`); `built`
    says whether this call built it (a cache made now rather than reused).
    """

    kind = "array_record"

    def __init__(self, tfds_dir: str | os.PathLike, split: str, channels: str,
                 records: Sequence[SliceRecord], built: bool = False):
        super().__init__(tfds_dir, split, channels)
        self.tfds_dir = Path(tfds_dir)
        self.split = split
        self.records = list(records)
        self.built = built
        if len(self.source) != len(self.records):
            raise DataError(f"{self.tfds_dir}: split {split!r} holds {len(self.source)} slices, "
                            f"the run's {split} patients have {len(self.records)}")


Loader = MemoryLoader | ArrayRecordLoader


def split_loader(
    index: LggIndex,
    splits: dict[str, list[str]],
    split_name: str,
    channels: str = "flair",
    *,
    source: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
) -> Loader:
    """The loader of split `split_name` of a run (see the module doc).

    index: the scanned data folder; splits: the run's patient lists
    ({name: [patient ids]}, the workdir's splits.json); channels: "flair" or
    "all". source: "memory", "array_record" or "auto" (`choose_source` on the
    slices of all of `splits`, so every split of a run takes the same path).
    cache_dir: where array_record caches live (needed when the source is
    array_record and no `tfds_dir` is given); tfds_dir: a user's `data build`
    folder to read instead, whose split must hold exactly the run's patients
    (DataError naming the folder otherwise).
    """
    if channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be one of {CHANNEL_CHOICES}, got {channels!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    records = records_for_split(index, splits, split_name)
    if not records:
        raise DataError(f"split {split_name!r} has no slices in {index.root}")
    if tfds_dir is not None:
        if source == "memory":
            raise ValueError("a tfds_dir is read as array_record; pass source='array_record' or 'auto'")
        check_tfds_dir(tfds_dir, index, splits, split_name)
        return ArrayRecordLoader(tfds_dir, split_name, channels, records)
    n_run = len(index.for_patients([p for pids in splits.values() for p in pids]))
    kind = choose_source(n_run, source, bytes_per_slice=slice_bytes(index.image_shape[0], channels))
    if kind == "memory":
        return MemoryLoader(records, channels)
    if cache_dir is None:
        raise ValueError("the array_record source needs a cache_dir (or a built tfds_dir)")
    folder, built = ensure_cache(index, splits, cache_dir)
    return ArrayRecordLoader(folder, split_name, channels, records, built=built)


# ----------------------------------------------------------------------------- a user's TFDS build


def check_tfds_dir(tfds_dir: str | os.PathLike, index: LggIndex, splits: dict[str, list[str]],
                   split_name: str) -> None:
    """Raises DataError naming `tfds_dir` unless its split `split_name` is the run's, slice for slice.

    Checked: the build's splits.json lists exactly the run's patients for the
    split, its image size is the data folder's, it holds as many slices as the
    data folder has for those patients, and the (patient, slice number) of up
    to 16 records spread over the split (first and last included) are the
    data folder's at the same positions.
    """
    from dlvae_jax.data.splits import read_splits

    shown = Path(tfds_dir)
    theirs = read_splits(shown)
    ours = sorted(splits[split_name])
    got = sorted(theirs.get(split_name, ()))
    if got != ours:
        extra, missing = sorted(set(got) - set(ours)), sorted(set(ours) - set(got))
        what = "; ".join(x for x in (
            f"{len(extra)} patients not in the run's (e.g. {extra[0]})" if extra else "",
            f"lacks {len(missing)} of the run's (e.g. {missing[0]})" if missing else "") if x)
        raise DataError(f"{shown}: its {split_name!r} split is not the run's ({what}); build it from the "
                        "same data and split seed as the run, or train without a TFDS dir")
    size = tfds_lgg.built_image_size(shown)
    if size != index.image_shape[0]:
        raise DataError(f"{shown}: built with {size}x{size} slices, the data folder {index.root} has "
                        f"{index.image_shape[0]}x{index.image_shape[1]}")
    records = records_for_split(index, splits, split_name)
    raw = tfds_lgg.raw_source(shown, split_name)
    if len(raw) != len(records):
        raise DataError(f"{shown}: its {split_name!r} split holds {len(raw)} slices, the data folder "
                        f"{index.root} has {len(records)} for the same patients; rebuild it from this folder")
    positions = np.unique(np.linspace(0, len(records) - 1, min(len(records), 16)).round().astype(int)).tolist()
    for i, rec in zip(positions, raw.__getitems__(positions)):
        ex = tfds_lgg.decode_raw(rec, size)
        key, want = (ex["patient"].decode(), ex["slice_number"]), (records[i].patient, records[i].slice_number)
        if key != want:
            raise DataError(f"{shown}: record {i} of its {split_name!r} split is {key[0]} slice {key[1]}, "
                            f"the data folder's is {want[0]} slice {want[1]}; rebuild it from this folder")


# ----------------------------------------------------------------------------- the cache


def cache_inputs(index: LggIndex, splits: dict[str, list[str]]) -> dict:
    """What a cache is built from: compared with its cache.json on every use.

    {"format", "builder_version", "data_dir" (resolved), "image_size",
    "splits" (sorted patient lists), "fingerprint"}: the fingerprint is a
    SHA-256 over each slice of the run's splits (split, image and mask paths
    relative to the data folder, their sizes and mtimes in ns, slice number,
    has_tumor), so a changed, added or removed slice file means a rebuild.
    """
    root = Path(index.root)
    h = hashlib.sha256()
    for name in sorted(splits):
        for r in index.for_patients(splits[name]):
            parts = [name, str(r.slice_number), str(int(r.has_tumor))]
            for path in (r.path, r.mask_path):
                try:
                    st = os.stat(path)
                except OSError as err:
                    raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
                parts += [os.path.relpath(path, root), str(st.st_size), str(st.st_mtime_ns)]
            h.update(("\t".join(parts) + "\n").encode())
    return {
        "format": CACHE_FORMAT,
        "builder_version": str(tfds_lgg.LggMri.VERSION),
        "data_dir": os.path.realpath(root),
        "image_size": int(index.image_shape[0]),
        "splits": {name: sorted(pids) for name, pids in sorted(splits.items())},
        "fingerprint": h.hexdigest(),
    }


def cache_folder(cache_dir: str | os.PathLike, inputs: dict) -> Path:
    """The TFDS data dir of the cache for `inputs`: ``cache_dir/lgg_mri-<key>``.

    The key hashes everything but the file fingerprint, so runs with other
    splits or data folders get caches of their own (one never replaces
    another in use), while changed files rebuild the same cache.
    """
    keyed = {k: v for k, v in inputs.items() if k != "fingerprint"}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{tfds_lgg.NAME}-{key}"


def cache_problem(final: Path, inputs: dict) -> str | None:
    """Why the cache at `final` (an `lgg_mri/` folder) cannot be used as it is, or None if it can."""
    from dlvae_jax.outdir import read_marker

    if not final.is_dir():
        return "not built yet"
    marker = read_marker(final)
    if marker is None or marker["command"] != CACHE_COMMAND:
        return "not a cache folder"
    try:
        manifest = json.loads((final / CACHE_FILE).read_text())
        recorded, files = manifest["inputs"], manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"no readable {CACHE_FILE} ({type(err).__name__})"
    if recorded != inputs:
        changed = sorted(k for k in set(recorded) | set(inputs) if recorded.get(k) != inputs.get(k))
        return f"inputs changed: {', '.join(changed)}"
    for rel, size in files.items():
        try:
            actual = (final / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive, blocking `flock` on `path` (kept: deleting it would race other waiters)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise OutputError(f"{path.parent}: cannot create the cache's lock file ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_cache(index: LggIndex, splits: dict[str, list[str]], cache_dir: str | os.PathLike) -> tuple[Path, bool]:
    """The TFDS data dir of the run's array_record cache, and whether this call built it.

    Reuses a cache whose cache.json matches `cache_inputs(index, splits)` and
    whose files are all there at their written sizes; otherwise builds it,
    under a lock so that concurrent callers build it once.
    """
    inputs = cache_inputs(index, splits)
    folder = cache_folder(cache_dir, inputs)
    # Before anything is created: a cache inside the data folder (or holding it) would write into the data.
    outdir.check_inputs(f"data.cache_dir {cache_dir}", Path(os.path.realpath(os.path.abspath(folder))), [index.root])
    final = folder / tfds_lgg.NAME
    if cache_problem(final, inputs) is None:
        return folder, False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot be created ({err.strerror or err})") from None
    with _locked(folder / _LOCK_NAME):
        problem = cache_problem(final, inputs)  # another process may have built it meanwhile
        if problem is None:
            return folder, False
        _build(index, splits, final, inputs, problem)
    return folder, True


def _build(index: LggIndex, splits: dict[str, list[str]], final: Path, inputs: dict, why: str) -> None:
    global build_count
    from dlvae_jax.io import write_json
    from dlvae_jax.outdir import output_folder

    size = inputs["image_size"]
    expected = {name: [(r.patient, r.slice_number) for r in index.for_patients(pids)]
                for name, pids in splits.items()}

    def verify(builder):
        # TFDS keeps the generator's order when shuffling is disabled; the
        # loaders' `records` rely on it, so it is checked, not assumed.
        for name, keys in expected.items():
            if not keys:
                continue  # TFDS writes no empty split
            src = builder.as_data_source(name, deserialize_method=tfds_lgg.tfds.decode.DeserializeMethod.RAW_BYTES)
            got = []
            for start in range(0, len(src), 256):
                for rec in src.__getitems__(list(range(start, min(start + 256, len(src))))):
                    ex = tfds_lgg.decode_raw(rec, size)
                    got.append((ex["patient"].decode(), ex["slice_number"]))
            if got != keys:
                raise DataError(f"{final}: the {name!r} split was stored out of order; not used")

    print(f"dlvae-jax: building the array_record cache {final} ({why})", file=sys.stderr)
    with output_folder(final, CACHE_COMMAND, overwrite=True, inputs=[index.root]) as tmp:
        tfds_lgg.prepare_into(tmp, index.root, verify=verify, index=index, image_size=size,
                              splits={k: list(v) for k, v in splits.items()})
        write_json(tmp / "splits.json", {"splits": splits, "counts": split_report(index, splits)})
        version = tmp / str(tfds_lgg.LggMri.VERSION)
        files = {os.path.relpath(p, tmp): p.stat().st_size for p in sorted(version.rglob("*")) if p.is_file()}
        counts = {name: len(keys) for name, keys in expected.items()}
        write_json(tmp / CACHE_FILE, {"inputs": inputs, "counts": counts, "files": files})
    build_count += 1
