"""Reading what users bring to `dlvae-jax predict`: slice images and NIfTI volumes.

A *case* is what becomes one output volume: a NIfTI file (its axial slices,
the third voxel axis), or the slice images of one folder, given as the
folder or as files (sorted by the slice number of ``<name>_<n>`` names,
then by name with numbers in order: slice2 before slice10). Slice images
are TIFF (``.tif``/``.tiff``) or PNG of any name; ``*_mask.*`` files are
masks and never inputs, and a folder's label and output files (``*_seg``,
``*_prob``, ``*_entropy``, ``*_mean``, ``*_overlay``) are skipped. Every
NIfTI volume in a folder is a case of its own.

Intensities (`to_uint8`), the rule written in `predict --help`:

* 8-bit data is used as it is: the dataset's slices are 8-bit.
* Anything else (16-bit TIFF or grayscale PNG, int16 or float NIfTI) is
  mapped linearly so that its minimum goes to 0 and its 99.5th percentile
  to 255, clipped, then rounded; each channel on its own, as the dataset's
  channels were made. A slice file is scaled on its own, a NIfTI volume as a
  whole, so its slices keep their relative brightness.

Channels: a 2-D image (or a 3-D NIfTI) is FLAIR; a 3-channel image (or a
4-D NIfTI of shape (X, Y, Z, 3)) is (pre-contrast, FLAIR, post-contrast),
the dataset's order. A PNG's alpha is dropped; other 2- or 4-channel images
are refused. A run trained on ``data.channels=all`` needs the three channels.

Orientation: slice k of a NIfTI volume is ``data[:, :, k]`` with the first
voxel axis as image rows, the second as columns; a volume written from slice
files stacks them the same way (``data[row, column, k]``, identity affine),
so predicting on that volume gives the slices' own masks. The model saw
Buda et al.'s axial slices; a scanner's volume may need reorienting to match.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dlvae_jax.errors import DlvaeError

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
FLAIR_INDEX = 1  # channel order (pre-contrast, FLAIR, post-contrast)
UPPER_PERCENTILE = 99.5
_NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")
_MASK = re.compile(r"_mask$", re.IGNORECASE)
# Labels and outputs of predict, skipped when a folder is read (a file named on its own is read).
_SKIPPED = re.compile(r"_(mask|seg|prob|entropy|mean|overlay)$", re.IGNORECASE)


def nifti_stem(path: Path) -> str | None:
    """The name without its NIfTI suffix, or None when the file is not NIfTI."""
    low = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def slice_stem(path: Path) -> str | None:
    """The name without its image suffix, or None when the file is not a slice image."""
    return path.stem if path.suffix.lower() in SLICE_SUFFIXES else None


def is_mask_name(stem: str) -> bool:
    return bool(_MASK.search(stem))


def _natural(name: str) -> list:
    """Sort key that orders the numbers in a name by value: slice2 before slice10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _slice_order(path: Path) -> tuple:
    m = _NUMBERED.match(path.stem)
    return (0, int(m["n"]), _natural(path.name)) if m else (1, 0, _natural(path.name))


@dataclasses.dataclass
class Case:
    """One output volume: `name` (its folder and file prefix), `kind` ("nifti" or
    "slices"), the input paths (one NIfTI file, or the slice files in order),
    `source` (the resolved NIfTI file or slice folder) and `n_slices`."""

    name: str
    kind: str
    paths: list[Path]
    source: Path
    n_slices: int = 0

    def slice_stems(self, n: int | None = None) -> list[str]:
        """Output stem of each slice: a slice file's own stem; ``<case>_<k>`` (from 1) for a volume."""
        if self.kind == "nifti":
            return [f"{self.name}_{k + 1}" for k in range(n or 0)]
        return [p.stem for p in self.paths]


def collect_cases(inputs: Sequence[str | os.PathLike]) -> list[Case]:
    """The cases named by the inputs, in input order; see the module docstring.

    In a folder, files named like an output of predict or a label
    (``*_mask``, ``*_seg``, ``*_prob``, ``*_entropy``, ``*_mean``,
    ``*_overlay``) are skipped. Raises DlvaeError naming the first input that
    is missing, a mask, not a slice image or NIfTI volume of a usable shape, or
    a folder with neither; or two cases or slices that would write the same
    output names.
    """
    cases: dict[tuple[str, Path], Case] = {}

    def add(kind: str, source: Path, name: str, paths: list[Path]) -> None:
        case = cases.setdefault((kind, source), Case(name, kind, [], source))
        seen = {p.resolve() for p in case.paths}
        case.paths.extend(p for p in paths if p.resolve() not in seen)

    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file())
            volumes = [f for f in files if nifti_stem(f) and not _SKIPPED.search(nifti_stem(f))]
            slices = [f for f in files if slice_stem(f) and not _SKIPPED.search(f.stem)]
            if not volumes and not slices:
                raise DlvaeError(f"{path}: folder holds no slice images (.tif, .tiff, .png) or NIfTI volumes "
                                 "(.nii, .nii.gz)")
            if slices:
                add("slices", path.resolve(), path.resolve().name, slices)
            for f in volumes:
                add("nifti", f.resolve(), nifti_stem(f), [f])
        elif path.is_file():
            stem = nifti_stem(path) or slice_stem(path)
            if stem is None:
                raise DlvaeError(f"{path}: not a slice image (.tif, .tiff, .png) or NIfTI volume (.nii, .nii.gz)")
            if is_mask_name(stem):
                raise DlvaeError(f"{path}: is a mask (its name ends in _mask); pass the image")
            if nifti_stem(path):
                add("nifti", path.resolve(), stem, [path])
            else:
                add("slices", path.resolve().parent, path.resolve().parent.name, [path])
        elif path.exists():
            raise DlvaeError(f"{path}: not a file or folder")
        else:
            raise DlvaeError(f"{path}: no such file or folder")
    out = list(cases.values())
    names: dict[str, Case] = {}
    for case in out:
        owner = names.setdefault(case.name, case)
        if owner is not case:
            raise DlvaeError(f"{case.paths[0]}: writes the same outputs ({case.name}/) as {owner.paths[0]}; "
                             "rename one")
        if case.kind == "nifti":
            case.n_slices = _nifti_depth(case.paths[0])
            continue
        case.paths.sort(key=_slice_order)
        case.n_slices = len(case.paths)
        stems: dict[str, Path] = {}
        for p in case.paths:
            if p.stem in stems:
                raise DlvaeError(f"{p}: writes the same outputs ({case.name}/{p.stem}) as {stems[p.stem]}; rename one")
            stems[p.stem] = p
    return out


def _nifti_depth(path: Path) -> int:
    """Slices of a NIfTI volume, from its header; raises DlvaeError for a shape predict cannot use."""
    shape = tuple(read_nifti(path).shape)
    usable = len(shape) in (2, 3) or (len(shape) == 4 and shape[3] in (1, 3))
    if usable and min(shape[:2]) >= 2 and (len(shape) == 2 or shape[2] >= 1):
        return 1 if len(shape) == 2 else int(shape[2])
    raise DlvaeError(f"{path}: shape is {shape}, expected (X, Y), (X, Y, Z) or (X, Y, Z, 3)")


def to_uint8(values: np.ndarray, source: str | os.PathLike) -> np.ndarray:
    """8-bit data unchanged; anything else mapped linearly, minimum -> 0 and the
    99.5th percentile -> 255, clipped and rounded (a constant image -> 0)."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if values.dtype == bool or not (np.issubdtype(values.dtype, np.integer)
                                    or np.issubdtype(values.dtype, np.floating)):
        raise DlvaeError(f"{source}: pixel type {values.dtype} is not an intensity image")
    data = values.astype(np.float64)
    if not np.isfinite(data).all():
        raise DlvaeError(f"{source}: holds NaN or infinite values")
    if data.size == 0:
        raise DlvaeError(f"{source}: is empty")
    lo = float(data.min())
    hi = float(np.percentile(data, UPPER_PERCENTILE))
    if hi <= lo:
        hi = float(data.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint((data - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def scale_channels(values: np.ndarray, source) -> np.ndarray:
    """`to_uint8` of each channel (last axis) on its own, as the dataset's channels were made."""
    return np.stack([to_uint8(values[..., c], source) for c in range(values.shape[-1])], axis=-1)


def _png_depth(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
        raise DlvaeError(f"{path}: unreadable PNG (no PNG signature)")
    return head[24], head[25]


def read_image(path: Path) -> np.ndarray:
    """The pixels of a TIFF or PNG slice file: [H, W] or [H, W, C]; a PNG's alpha is dropped."""
    is_png = path.suffix.lower() == ".png"
    if is_png:
        depth, colour = _png_depth(path)
        if depth == 16 and colour != 0:  # Pillow keeps 8 of the 16 bits of colour PNGs
            raise DlvaeError(f"{path}: a 16-bit colour PNG cannot be read without losing bits; save it as a "
                             "16-bit TIFF, or one 16-bit grayscale PNG per channel")
    try:
        if is_png:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                image = np.array(im)
        else:
            import tifffile

            image = tifffile.imread(path)
    except Exception as err:  # the readers raise many types for corrupt files
        raise DlvaeError(f"{path}: unreadable {'PNG' if is_png else 'TIFF'} ({type(err).__name__}: {err})") from None
    if is_png and image.ndim == 3 and image.shape[2] in (2, 4):
        image = image[:, :, :-1]  # LA -> L, RGBA -> RGB
    return image


def split_channels(image: np.ndarray, source, channels: str) -> tuple[np.ndarray, np.ndarray]:
    """(model input, FLAIR) from uint8 pixels [H, W] or [H, W, 3]: the input is
    FLAIR [H, W] for channels "flair", [H, W, 3] for "all"."""
    if image.ndim == 3 and image.shape[2] == 3:
        flair = np.ascontiguousarray(image[:, :, FLAIR_INDEX])
    elif image.ndim == 2:
        flair = image
    else:
        raise DlvaeError(f"{source}: shape is {image.shape}, expected (H, W) or (H, W, 3) "
                         "(pre-contrast, FLAIR, post-contrast)")
    if min(flair.shape) < 2:
        raise DlvaeError(f"{source}: shape is {image.shape}, too small for a slice")
    if channels != "all":
        return np.ascontiguousarray(flair), flair
    if image.ndim != 3:
        raise DlvaeError(f"{source}: has one channel; the model was trained on all three (pre-contrast, FLAIR, "
                         "post-contrast): pass (H, W, 3) images or (X, Y, Z, 3) NIfTI volumes")
    return np.ascontiguousarray(image), flair


def read_slice(path: Path, channels: str = "flair") -> tuple[np.ndarray, np.ndarray]:
    """(model input, FLAIR), uint8, of a slice file; see the module docstring."""
    image = read_image(path)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] != 3 or image.ndim not in (2, 3):
        raise DlvaeError(f"{path}: shape is {image.shape}, expected (H, W) or (H, W, 3) "
                         "(pre-contrast, FLAIR, post-contrast)")
    image = scale_channels(image, path) if image.ndim == 3 else to_uint8(image, path)
    return split_channels(image, path, channels)


def read_nifti(path: Path):
    """The nibabel image of a NIfTI file; raises DlvaeError naming the file."""
    import nibabel

    try:
        img = nibabel.load(str(path))
        if not isinstance(img, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
            raise TypeError(f"a {type(img).__name__}, not NIfTI")
    except Exception as err:
        raise DlvaeError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from None
    return img


def nifti_slices(path: Path, channels: str = "flair"):
    """(nibabel image, model inputs uint8 [Z, X, Y(, 3)], FLAIR uint8 [Z, X, Y]) of
    a NIfTI volume: slice k is ``data[:, :, k]``; see the module docstring."""
    img = read_nifti(path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise DlvaeError(f"{path}: unreadable NIfTI data ({type(err).__name__}: {err})") from None
    shape = data.shape
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        volume = to_uint8(data, path)
        slices = [volume[:, :, k] for k in range(volume.shape[2])]
    elif data.ndim == 4 and data.shape[3] == 3:
        volume = scale_channels(data, path)
        slices = [volume[:, :, k, :] for k in range(volume.shape[2])]
    else:
        raise DlvaeError(f"{path}: shape is {shape}, expected (X, Y, Z) or (X, Y, Z, 3)")
    if not slices:
        raise DlvaeError(f"{path}: holds no slices")
    pairs = [split_channels(s, f"{path} slice {k + 1}", channels) for k, s in enumerate(slices)]
    return img, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def iter_case(case: Case, channels: str) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(input description, output stem, model input, FLAIR) for each slice of a case."""
    if case.kind == "nifti":
        path = case.paths[0]
        _, images, flairs = nifti_slices(path, channels)
        for k, stem in enumerate(case.slice_stems(len(images))):
            yield f"{path}#{k + 1}", stem, images[k], flairs[k]
        return
    for path in case.paths:
        image, flair = read_slice(path, channels)
        yield str(path), path.stem, image, flair


def write_nifti(path: Path, volume: np.ndarray, like=None) -> None:
    """Writes `volume` [X, Y, Z(, C)] as NIfTI with `like`'s class, affine and
    header (a nibabel image), else as NIfTI-1 with the identity affine; the
    data type is the volume's. What the input's header says about its own
    intensities (scaling, display range, intent, description) is cleared."""
    import nibabel

    if like is not None:
        header = like.header.copy()
        header.set_data_dtype(volume.dtype)
        out = type(like)(volume, like.affine, header)  # the header's shape follows the data
        out.header.set_slope_inter(1.0, 0.0)  # the input's intensity scaling must not rescale a mask
        out.header["cal_min"] = out.header["cal_max"] = 0  # nor its display range hide it
        out.header.set_intent("none", (), name="")
        out.header["descrip"] = b"dlvae-jax predict"
    else:
        out = nibabel.Nifti1Image(volume, np.eye(4))
        out.header.set_xyzt_units("mm")
    nibabel.save(out, str(path))
