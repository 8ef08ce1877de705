"""Index, validate and read the LGG segmentation dataset in its download layout.

Layout (the Kaggle "kaggle_3m" folder, as users download it)::

    DATA_DIR/
      data.csv                                   optional, one row per patient
      TCGA_<inst>_<patient>_<date>/              one folder per patient
        TCGA_<inst>_<patient>_<date>_<n>.tif       image, (H, W, 3) uint8
        TCGA_<inst>_<patient>_<date>_<n>_mask.tif  mask,  (H, W) uint8 in {0, 255}

Image channels are (pre-contrast, FLAIR, post-contrast); the paper's grayscale
input is FLAIR, channel 1. The patient id is ``TCGA_<inst>_<patient>`` (the key
used by data.csv) and the institution is ``<inst>``.

`scan` reads every TIFF once so that a bad file is reported before anything is
written downstream; with ``skip_bad=True`` bad slices are dropped and listed in
``index.skipped`` instead of raising.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tifffile

from dlvae_jax.errors import DataError

CHANNEL_NAMES = ("pre-contrast", "FLAIR", "post-contrast")
FLAIR_CHANNEL = 1
CHANNEL_CHOICES = ("flair", "all")

_PATIENT_DIR_RE = re.compile(r"^TCGA_([A-Za-z0-9]+)_([A-Za-z0-9]+)_(\d{8})$")
# TFDS stores the slice number as int32; the download numbers slices from 1.
MAX_SLICE_NUMBER = 2**31 - 1


class DataWarning(UserWarning):
    """A dataset oddity that does not stop reading (e.g. a gap in slice numbers)."""


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """One axial slice: an image TIFF and its mask TIFF."""

    path: Path
    mask_path: Path
    patient: str          # "TCGA_<inst>_<patient>", the data.csv key
    institution: str      # "<inst>", e.g. "CS", "DU"
    slice_number: int     # the <n> of the file name, 1-based in the download
    has_tumor: bool       # mask has at least one nonzero pixel


@dataclasses.dataclass
class LggIndex:
    """All valid slices of a dataset folder, ordered by (patient, slice_number).

    ``image_shape`` is the (H, W, 3) shape shared by every image; ``warnings``
    holds non-fatal findings; ``skipped`` holds (path, fault) of every file
    dropped under ``skip_bad=True``; ``missing_sequences`` the patients whose
    pre- or post-contrast channel is a copy of FLAIR.
    """

    root: Path
    records: tuple[SliceRecord, ...]
    image_shape: tuple[int, int, int]
    warnings: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # patient -> sequences ("pre-contrast", "post-contrast") its slices carry as a copy of FLAIR, the
    # dataset's mark of a sequence not acquired; found when the images are read (scan(validate=True))
    missing_sequences: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SliceRecord]:
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient for r in self.records})

    @property
    def institutions(self) -> dict[str, int]:
        """Institution -> number of patients."""
        out: dict[str, set[str]] = {}
        for r in self.records:
            out.setdefault(r.institution, set()).add(r.patient)
        return {k: len(v) for k, v in sorted(out.items())}

    @property
    def n_tumor_slices(self) -> int:
        return sum(r.has_tumor for r in self.records)

    def patient_info(self) -> dict[str, dict]:
        """Patient -> {institution, slices, tumor_slices}."""
        info: dict[str, dict] = {}
        for r in self.records:
            d = info.setdefault(r.patient, {"institution": r.institution, "slices": 0, "tumor_slices": 0})
            d["slices"] += 1
            d["tumor_slices"] += int(r.has_tumor)
        return dict(sorted(info.items()))

    def for_patients(self, patients: Iterable[str]) -> list[SliceRecord]:
        keep = set(patients)
        return [r for r in self.records if r.patient in keep]


# ----------------------------------------------------------------------------- reading


def _read_tiff(path: Path) -> np.ndarray:
    """Reads a TIFF or raises DataError naming the file; catches every decoder fault."""
    try:
        return tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for corrupt files
        raise DataError(f"{path}: unreadable or truncated TIFF ({type(err).__name__}: {err})") from None


def _check_image(path: Path, image: np.ndarray) -> None:
    if image.dtype != np.uint8:
        raise DataError(f"{path}: image dtype is {image.dtype}, expected uint8")
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{path}: image shape is {image.shape}, expected (H, W, 3)")


def _check_mask(path: Path, mask: np.ndarray) -> bool:
    """Validates a mask; returns whether it marks any tumor pixel."""
    if mask.dtype != np.uint8:
        raise DataError(f"{path}: mask dtype is {mask.dtype}, expected uint8")
    if mask.ndim != 2:
        raise DataError(f"{path}: mask shape is {mask.shape}, expected (H, W)")
    counts = np.bincount(mask.ravel(), minlength=256)
    values = np.flatnonzero(counts)
    extra = set(values.tolist()) - {0, 1, 255}
    if extra or (counts[1] and counts[255]):
        raise DataError(
            f"{path}: mask values {values.tolist()[:8]} are not binary, expected {{0, 255}} or {{0, 1}}"
        )
    return bool(values.size > 1 or values[0] != 0)


def flair_copies(image: np.ndarray) -> tuple[bool, bool] | None:
    """For a (H, W, 3) slice: whether its pre-contrast and its post-contrast
    channels equal its FLAIR channel, the dataset's mark of a sequence that
    was not acquired; None for a slice whose FLAIR is blank (all channels of
    an empty slice are equal, whatever was acquired)."""
    flair = image[:, :, FLAIR_CHANNEL]
    if not flair.any():
        return None
    return bool(np.array_equal(image[:, :, 0], flair)), bool(np.array_equal(image[:, :, 2], flair))


def _validate_pair(image_path: Path, mask_path: Path) -> tuple[tuple[int, ...], bool, tuple[bool, bool] | None]:
    """Reads and checks one slice; returns (image shape, has_tumor, `flair_copies`) or raises DataError."""
    image = _read_tiff(image_path)
    _check_image(image_path, image)
    mask = _read_tiff(mask_path)
    has_tumor = _check_mask(mask_path, mask)
    if mask.shape != image.shape[:2]:
        raise DataError(f"{mask_path}: mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    return image.shape, has_tumor, flair_copies(image)


def load_slice(record: SliceRecord, channels: str = "flair") -> tuple[np.ndarray, np.ndarray]:
    """Loads one slice.

    Returns (image, mask): image uint8 [H, W] for ``channels="flair"`` or
    [H, W, 3] (pre-contrast, FLAIR, post-contrast) for ``"all"``; mask uint8
    [H, W] in {0, 1}.
    """
    if channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be one of {CHANNEL_CHOICES}, got {channels!r}")
    image = _read_tiff(record.path)
    _check_image(record.path, image)
    mask = _read_tiff(record.mask_path)
    _check_mask(record.mask_path, mask)
    if channels == "flair":
        image = np.ascontiguousarray(image[:, :, FLAIR_CHANNEL])
    return image, (mask > 0).astype(np.uint8)


def load_arrays(
    records: Sequence[SliceRecord], channels: str = "flair", num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads many slices into stacked arrays.

    Returns (images_NxHxW or images_NxHxWx3 uint8, masks_NxHxW uint8 in {0, 1}).
    TIFF decoding (zlib) releases the GIL, so a thread pool uses all cores.
    """
    if not records:
        raise DataError("no slices to load")
    workers = num_threads or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        pairs = list(pool.map(lambda r: load_slice(r, channels), records))
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    return images, masks


# ----------------------------------------------------------------------------- scanning


def _read_csv_patients(csv_path: Path, notes: list[str]) -> set[str] | None:
    """Patient ids of data.csv, or None (with a note) when it cannot be used.

    The file is optional, so a fault here is a warning, never an error.
    "utf-8-sig" reads both plain UTF-8 and Excel's "CSV UTF-8" (with a BOM).
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                notes.append(f"{csv_path}: empty, ignored")
                return None
            names = [n.strip() for n in reader.fieldnames]
            if "Patient" not in names:
                notes.append(f"{csv_path}: no 'Patient' column in its header, ignored")
                return None
            column = reader.fieldnames[names.index("Patient")]
            return {row[column].strip() for row in reader if row.get(column)}
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        notes.append(f"{csv_path}: unreadable CSV ({err}), ignored")
        return None


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise DataError(f"{folder}: cannot list folder ({err.strerror or err})") from None


def _gap_note(pid: str, numbers: list[int]) -> str | None:
    """A note on slice numbers missing from 1..max, in time and memory bounded by len(numbers)."""
    numbers = sorted(set(numbers))
    n_missing = numbers[-1] - len(numbers)
    if n_missing <= 0:
        return None
    first, expect = [], 1
    for n in numbers:
        while expect < n and len(first) < 10:
            first.append(expect)
            expect += 1
        if len(first) >= 10:
            break
        expect = n + 1
    return f"{pid}: gap in slice numbers, missing {first}{' ...' if n_missing > len(first) else ''}"


def _pid_of(pdir: Path) -> str:
    m = _PATIENT_DIR_RE.match(pdir.name)
    return f"TCGA_{m.group(1)}_{m.group(2)}"


def scan(
    data_dir: str | os.PathLike,
    skip_bad: bool = False,
    validate: bool = True,
    num_threads: int | None = None,
    progress: bool = False,
) -> LggIndex:
    """Scans a dataset folder in the LGG layout into an `LggIndex`.

    Every image and mask is read and checked (dtype uint8, image (H, W, 3),
    mask (H, W) with values {0, 255} or {0, 1}, one H x W for the whole
    dataset) unless ``validate=False``, in which case ``has_tumor`` is still
    computed from the masks but images are not opened.

    Raises DataError naming the file and the fault for the first bad file; with
    ``skip_bad=True`` bad slices are dropped and recorded in ``index.skipped``.
    An empty folder, a folder without patient folders, or (after skipping) no
    valid slice at all is always an error. Gaps in slice numbers and unknown
    entries are warnings (``DataWarning`` and ``index.warnings``).
    """
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    entries = [p for p in _listdir(root) if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"{root}: empty folder, expected patient folders TCGA_<inst>_<patient>_<date>/")

    notes: list[str] = []
    faults: list[tuple[str, str]] = []  # (path, message), in deterministic order
    patient_dirs = []
    for entry in entries:
        if entry.is_dir() and _PATIENT_DIR_RE.match(entry.name):
            patient_dirs.append(entry)
        elif entry.name != "data.csv":
            notes.append(f"{entry}: not a patient folder (TCGA_<inst>_<patient>_<date>), ignored")
    if not patient_dirs:
        raise DataError(f"{root}: no patient folders named TCGA_<inst>_<patient>_<date>")

    # One patient under two dates would merge two scans into one volume.
    by_pid: dict[str, list[Path]] = {}
    for pdir in patient_dirs:
        m = _PATIENT_DIR_RE.match(pdir.name)
        by_pid.setdefault(f"TCGA_{m.group(1)}_{m.group(2)}", []).append(pdir)
    for pid, dirs in by_pid.items():
        if len(dirs) > 1:
            for extra in dirs[1:]:
                faults.append((str(extra), f"{extra}: patient {pid} also has folder {dirs[0]}; "
                                           "one folder per patient expected"))
            faults.append((str(dirs[0]), f"{dirs[0]}: patient {pid} also has folder {dirs[1]}; "
                                         "one folder per patient expected"))
    patient_dirs = [d for d in patient_dirs if len(by_pid[_pid_of(d)]) == 1]

    # Pair images and masks by slice number inside each patient folder.
    candidates: list[tuple[Path, Path, str, str, int]] = []
    for pdir in patient_dirs:
        m = _PATIENT_DIR_RE.match(pdir.name)
        inst, pid = m.group(1), f"TCGA_{m.group(1)}_{m.group(2)}"
        file_re = re.compile(rf"^{re.escape(pdir.name)}_(\d+)(_mask)?\.(?i:tiff?)$")
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        duplicates: set[int] = set()
        for f in _listdir(pdir):
            if f.name.startswith("."):
                continue
            fm = file_re.match(f.name)
            if not fm or not f.is_file():
                if f.suffix.lower() in (".tif", ".tiff"):
                    expected = f"{pdir.name}_<n>.tif or {pdir.name}_<n>_mask.tif"
                    faults.append((str(f), f"{f}: file name does not match {expected}"))
                else:
                    notes.append(f"{f}: not a slice TIFF, ignored")
                continue
            n = int(fm.group(1))
            if not 1 <= n <= MAX_SLICE_NUMBER:
                faults.append((str(f), f"{f}: slice number {fm.group(1)} is outside 1..{MAX_SLICE_NUMBER}"))
                continue
            # "_01" and "_1", ".tiff" and ".tif": two files for one slice.
            same = masks if fm.group(2) else images
            if n in same:
                faults.append((str(f), f"{f}: same slice as {same[n]} (patient {pid}, slice {n})"))
                duplicates.add(n)
                continue
            same[n] = f
        for n in sorted(duplicates):
            for kept in (images.pop(n, None), masks.pop(n, None)):
                if kept is not None and not any(p == str(kept) for p, _ in faults):
                    faults.append((str(kept), f"{kept}: skipped with its duplicate (patient {pid}, slice {n})"))
        for n in sorted(set(images) | set(masks)):
            if n not in masks:
                faults.append((str(images[n]), f"{images[n]}: image has no mask (expected {pdir.name}_{n}_mask.tif)"))
            elif n not in images:
                faults.append((str(masks[n]), f"{masks[n]}: mask has no image (expected {pdir.name}_{n}.tif)"))
            else:
                candidates.append((images[n], masks[n], pid, inst, n))
        if not images and not masks and not duplicates:
            faults.append((str(pdir), f"{pdir}: patient folder has no slices"))

    # Read everything once (threads: zlib decoding releases the GIL).
    def check(c):
        image_path, mask_path = c[0], c[1]
        try:
            if validate:
                return _validate_pair(image_path, mask_path)
            mask = _read_tiff(mask_path)
            return None, _check_mask(mask_path, mask), None
        except DataError as err:
            return err

    workers = num_threads or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results_iter = pool.map(check, candidates)
        if progress:
            from tqdm import tqdm

            results_iter = tqdm(results_iter, total=len(candidates), desc="checking slices", unit="slice")
        results = list(results_iter)

    # The dataset's shape is the most common one, so a single odd slice is the
    # one reported (and skipped), whatever its position.
    shapes = Counter(res[0] for res in results if not isinstance(res, DataError) and res[0] is not None)
    shape: tuple[int, ...] | None = shapes.most_common(1)[0][0] if shapes else None
    records: list[SliceRecord] = []
    copies: dict[str, list[tuple[bool, bool]]] = {}  # patient -> flair_copies of its non-blank slices
    for c, res in zip(candidates, results):
        if isinstance(res, DataError):
            msg = str(res)
            faults.append((msg.split(": ", 1)[0], msg))
            continue
        img_shape, has_tumor, flair_copy = res
        if img_shape is not None and img_shape != shape:
            faults.append((str(c[0]), f"{c[0]}: image shape {img_shape} differs from the dataset's {shape}"))
            continue
        records.append(SliceRecord(c[0], c[1], c[2], c[3], c[4], has_tumor))
        if flair_copy is not None:
            copies.setdefault(c[2], []).append(flair_copy)

    if faults and not skip_bad:
        more = f" (and {len(faults) - 1} more problems; --skip-bad skips bad slices)" if len(faults) > 1 else ""
        raise DataError(faults[0][1] + more)
    if not records:
        raise DataError(f"{root}: no valid slices")
    if shape is None:  # validate=False: take the shape from one image
        shape = _read_tiff(records[0].path).shape

    records.sort(key=lambda r: (r.patient, r.slice_number))
    by_patient: dict[str, list[int]] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r.slice_number)
    for pid, numbers in by_patient.items():
        # The download numbers slices 1..n; anything absent in between is a gap.
        note = _gap_note(pid, numbers)
        if note:
            notes.append(note)

    csv_path = root / "data.csv"
    if csv_path.is_file():
        listed = _read_csv_patients(csv_path, notes)
        found = set(by_patient)
        if listed is not None and found - listed:
            notes.append(f"{csv_path}: patients with folders but no row: {sorted(found - listed)[:10]}")

    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    return LggIndex(
        root=root,
        records=tuple(records),
        image_shape=tuple(shape),
        warnings=notes,
        skipped=[(p, m) for p, m in faults],
        missing_sequences=_missing_sequences(copies),
    )


def _missing_sequences(copies: dict[str, list[tuple[bool, bool]]]) -> dict[str, list[str]]:
    """Patient -> the sequences every non-blank slice of it carries as a copy of FLAIR."""
    out = {}
    for pid, flags in sorted(copies.items()):
        names = [name for i, name in ((0, CHANNEL_NAMES[0]), (1, CHANNEL_NAMES[2])) if all(f[i] for f in flags)]
        if names:
            out[pid] = names
    return out


def summary_lines(index: LggIndex) -> list[str]:
    """Human-readable summary used by `dlvae-jax data check`."""
    h, w, c = index.image_shape
    info = index.patient_info()
    no_tumor = sum(1 for d in info.values() if d["tumor_slices"] == 0)
    insts = ", ".join(f"{k} ({v})" for k, v in index.institutions.items())
    return [
        f"data dir: {index.root}",
        f"patients: {len(info)} ({no_tumor} without tumor slices)",
        f"slices: {len(index)}",
        f"slices with tumor: {index.n_tumor_slices}",
        f"institutions: {len(index.institutions)}: {insts}",
        f"image: {h}x{w}x{c} uint8, channels: {', '.join(CHANNEL_NAMES)} "
        f"(default input: flair = channel {FLAIR_CHANNEL})",
        f"mask: {h}x{w} uint8, tumor = nonzero",
    ] + ([f"FLAIR in place of a missing sequence: {len(index.missing_sequences)} "
          f"patient{'s' if len(index.missing_sequences) != 1 else ''} ("
          + "; ".join(f"{p}: {', '.join(v)}" for p, v in index.missing_sequences.items()) + ")"]
         if index.missing_sequences else [])
