"""`dlvae-jax evaluate`: a trained model's predictions on LGG slices, scored against the masks.

Decision rule (shared with `dlvae-jax predict`, see `dlvae_jax.metrics.decide`): a slice's
mask is the pixels with ``prob >= 0.5`` (components under ``eval.min_component``
pixels removed; with ``eval.min_volume_share`` > 0, the patient's slices are
stacked in order and its 3D components under that share of its largest are
removed too). With ``eval.presence = "class"`` a slice is called "tumor"
when the class head's probability ``tumor_prob >= 0.5``, and the mask of a
slice called "no tumor" is emptied: the class head decides presence, the
pixel map extent. With ``"mask"`` a slice is "tumor" when its mask is not
empty. Either way slice labels and masks never contradict each other in the
"no tumor" direction.

Metrics are computed at the data's resolution (the predictor returns
probabilities at its input's size) with `dlvae_jax.metrics` (empty-mask
rules in its docstring). Outputs, all inside the workdir W and each written
atomically:

* ``W/metrics_<split>.json``: the report of that split (keys of
  `dlvae_jax.metrics.segmentation_report` plus ``data_dir``, ``split``,
  ``checkpoint``, ``checkpoint_step``, ``threshold``, ``n_patients_in_train``);
  NaN (e.g. HD95 with nothing to measure) is written as null;
* ``W/metrics.json``: the same content for the latest evaluation, whatever
  its split, so one place always holds the most recent figures;
* ``W/per_patient_<split>.csv``: one row per patient, its last column the
  sequences the data carries as a copy of FLAIR (``missing_sequences``,
  e.g. ``pre-contrast+post-contrast``; empty when all were acquired);
* ``W/eval_<split>/``: ``dice_per_patient.png``, ``confusion.png`` and
  ``overlays/<patient>.png`` (per patient: the tumor slices of best, median
  and worst Dice and the largest false positive, FLAIR with the truth
  outline in green, the prediction's in red, both yellow; `n_overlays`
  patients spread over the ranking by Dice per volume), replaced as a whole
  on each run.

`split` is a name from ``W/splits.json`` (``val`` is accepted for
``validation``) or ``all``: every patient of the data folder, which may be a
folder training never saw.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dlvae_jax import metrics
from dlvae_jax import report as figures
from dlvae_jax.data import lgg, shift
from dlvae_jax.data.splits import SPLITS_FILE, read_splits
from dlvae_jax.errors import DlvaeError, print_warning
from dlvae_jax.eval import inference
from dlvae_jax.eval.uncertainty import ALL_FLIPS, CalibrationAccumulator, predictive_entropy, save_reliability
from dlvae_jax.io import atomic_path, write_json, write_text
from dlvae_jax.metrics import THRESHOLD, decide
from dlvae_jax.outdir import MARKER, WORKDIR_COMMANDS, read_marker
from dlvae_jax.train.step import PROBES

SPLIT_CHOICES = ("train", "val", "validation", "test", "all")
_SPLIT_ALIASES = {"val": "validation"}

# Rao et al., Tables I-IV, in percent. The paper states neither whether these
# are per slice or per pixel nor any Dice, and its F1 (99.99) exceeds the
# harmonic mean of its own precision and recall (99.44).
PAPER_MODELS = ("DL-VAE-CNN", "CNN", "VGG16-CNN", "DCNN")
PAPER_PERCENT = {
    "accuracy": {"DL-VAE-CNN": 99.91, "CNN": 95.44, "VGG16-CNN": 93.74, "DCNN": 98.51},
    "precision": {"DL-VAE-CNN": 99.90, "CNN": 91.0, "VGG16-CNN": 92.0, "DCNN": 99.18},
    "recall": {"DL-VAE-CNN": 98.99, "CNN": 95.0, "VGG16-CNN": 92.1, "DCNN": 97.90},
    "f1": {"DL-VAE-CNN": 99.99, "CNN": 93.0, "VGG16-CNN": 67.08, "DCNN": 98.53},
}

PER_PATIENT_COLUMNS = ("patient", "n_slices", "n_tumor_slices", "n_pred_tumor_slices", "dice", "iou", "hd95", "hd95_n",
                       "hd95_penalized", "hd95_volume", "missing_sequences")






def _check_workdir(workdir: Path) -> None:
    if not workdir.is_dir():
        raise DlvaeError(f"{workdir}: no such training folder")
    marker = read_marker(workdir)
    if marker is None or marker["command"] not in WORKDIR_COMMANDS:
        made_by = f"no {MARKER} marker" if marker is None else f"made by `dlvae-jax {marker['command']}`"
        raise DlvaeError(f"{workdir}: not a dlvae-jax training folder ({made_by})")
    if not (workdir / "config.json").is_file():
        raise DlvaeError(f"{workdir}: not a trained run (no config.json); train first")


def _check_writable(workdir: Path) -> None:
    """Fails up front, before any work, when the results could not be written."""
    try:
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as err:
        raise DlvaeError(f"{workdir}: cannot write the results there ({err.strerror or err}); "
                         "evaluate a writable copy of the run") from None


def _run_identity(workdir: Path) -> tuple:
    """What tells one training run in `workdir` from another that replaced it:
    the folder itself (a replaced run is a new folder renamed into place), its
    marker and its config."""
    def read(name: str) -> bytes:
        try:
            return (workdir / name).read_bytes()
        except OSError:
            return b""

    st = workdir.stat()
    return st.st_dev, st.st_ino, read(".dlvae-jax"), read("config.json")


def _config_value(config: Any, section: str, name: str) -> Any:
    try:
        return getattr(getattr(config, section), name)
    except (AttributeError, KeyError):
        return None


def default_data_dir(config: Any, workdir: Path) -> Path:
    """The data the run trained on: config.data.data_dir, or the synthetic phantoms training wrote to W/data."""
    value = _config_value(config, "data", "data_dir")
    if value:
        return Path(str(value)).expanduser()
    if (workdir / "data").is_dir():
        return workdir / "data"
    raise DlvaeError(f"{workdir}: the training config names no data.data_dir and there is no {workdir / 'data'}; "
                     "pass --data-dir")


def model_channels(config: Any) -> str:
    """"flair" or "all": the channels the run was trained on (config.data.channels, default "flair")."""
    try:
        return "all" if config.data.channels == "all" else "flair"
    except (AttributeError, KeyError):
        return "flair"


def select_records(index, workdir: Path, split: str, max_patients: int | None = None):
    """Slice records of `split` in `index`, and how many of their patients are training patients.

    split: a name in W/splits.json or "all". max_patients: keep only that
    many of the split's patients, spread evenly over their sorted ids. Raises
    DlvaeError when a named split's patients are (partly) absent from the
    data folder: its figures would silently describe another set of patients.
    """
    records, train = _split_records(index, workdir, split)
    patients = sorted({r.patient for r in records})
    if max_patients is not None and 0 < max_patients < len(patients):
        patients = [patients[i] for i in np.linspace(0, len(patients) - 1, max_patients).round().astype(int)]
        records = index.for_patients(patients)
    return records, len(set(patients) & train)


def _split_records(index, workdir: Path, split: str):
    """(records of `split`, the run's training patients)."""
    splits_path = workdir / SPLITS_FILE
    present = set(index.patients)
    if split == "all":
        train = set(read_splits(splits_path).get("train", ())) if splits_path.is_file() else set()
        return list(index.records), train
    splits = read_splits(splits_path)
    if split not in splits:
        raise DlvaeError(f"{splits_path}: no split named {split!r}; have {sorted(splits)} (or use --split all)")
    wanted = splits[split]
    if not wanted:
        raise DlvaeError(f"{splits_path}: the {split} split has no patients (the run's data.fractions gave it "
                         "none); score another split, or --split all on a folder of patients it never saw")
    missing = [p for p in wanted if p not in present]
    if missing:
        which = "none" if len(missing) == len(wanted) else f"{len(missing)} of {len(wanted)}"
        raise DlvaeError(
            f"{index.root}: {which} of the {split} patients in {splits_path} are in this data folder "
            f"(e.g. {missing[0]}); pass the data folder used for training, or --split all to score every patient here"
        )
    return index.for_patients(wanted), set(splits.get("train", ()))


# ----------------------------------------------------------------------------- report


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, NumPy scalars and arrays -> Python: strict JSON for any reader."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def per_patient_csv(rows: list[dict]) -> str:
    """The per-patient rows as CSV text (empty cell for a NaN HD95)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_PATIENT_COLUMNS)
    for r in rows:
        cells = [r.get(c) for c in PER_PATIENT_COLUMNS]
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in cells])
    return buf.getvalue()


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(report: dict) -> str:
    """Our Eqs. 13-16 (per slice and per pixel) beside the paper's Tables I-IV, then Dice/IoU/HD95."""
    head = f"{'metric':<20}{'slice':>8}{'pixel':>8}  |" + "".join(f"{m:>12}" for m in PAPER_MODELS)
    lines = [
        f"split {report['split']}: {report['n_patients']} patients, {report['n_slices']} slices "
        f"({report['n_tumor_slices']} with tumor), checkpoint step {report['checkpoint_step']}",
        "",
        f"{'':<20}{'this model (%)':>16}  |  Rao et al., Tables I-IV (%)",
        head,
        "-" * len(head),
    ]
    for key, name in (("accuracy", "accuracy (Eq. 13)"), ("precision", "precision (Eq. 14)"),
                      ("recall", "recall (Eq. 15)"), ("f1", "F1 (Eq. 16)")):
        lines.append(
            f"{name:<20}{_pct(report[f'slice_{key}']):>8}{_pct(report[f'pixel_{key}']):>8}  |"
            + "".join(f"{PAPER_PERCENT[key][m]:>12.2f}" for m in PAPER_MODELS)
        )
    lines += [
        "",
        "The paper states no Dice, IoU or HD95, nor whether its figures are per slice or per pixel;",
        "its DL-VAE-CNN F1 (99.99) exceeds the 99.44 that its own precision and recall give.",
        "",
        f"{'Dice per volume':<28}mean {_num(report['dice_volume_mean'])}   median {_num(report['dice_volume_median'])}"
        f"   (n = {report.get('dice_volume_n', report['n_patients'])} patients"
        f"{'; empty/empty left out' if report.get('empty_convention') == 'exclude' else ''})",
        f"{'Dice, tumor slices':<28}mean {_num(report['dice_tumor_slices_mean'])}   (n = {report['n_tumor_slices']} slices)",
        f"{'IoU per volume':<28}mean {_num(report['iou_mean'])}   (n = {report.get('dice_volume_n', report['n_patients'])})",
        f"{'HD95 (pixels)':<28}mean {_num(report['hd95_mean'], 2)}   median {_num(report['hd95_median'], 2)}"
        f"   (n = {report['hd95_n']} slices with both masks non-empty)",
    ]
    if "hd95_penalized_mean" in report:
        lines.append(f"{'HD95, one-empty penalized':<28}mean {_num(report['hd95_penalized_mean'], 2)}   "
                     f"(n = {report['hd95_penalized_n']} slices; {report['hd95_one_empty_n']} with one mask empty "
                     "scored the image diagonal)")
    if "hd95_volume_mean" in report:
        lines.append(f"{'HD95 per volume (3D)':<28}mean {_num(report['hd95_volume_mean'], 2)}   "
                     f"(n = {report['hd95_volume_n']} patients); one-empty penalized "
                     f"{_num(report['hd95_volume_penalized_mean'], 2)} (n = {report['hd95_volume_penalized_n']})")
    if "uncertainty" in report:
        u = report["uncertainty"]
        lines += ["", f"{'uncertainty':<28}{u['method']}: AUROC of entropy for pixel errors {_num(u['auroc_error'])}, "
                      f"ECE {u['ece']:.4f}, Brier {u['brier']:.4f} ({u['n_pixels']} pixels, {u['n_errors']} wrong)"]
    if "latent" in report:
        lat, probe = report["latent"], report["probe"]
        lines += [
            "",
            f"{'VAE latent (label-free)':<28}KL {lat['kl_nats']:.2f} nats, {lat['active_units']} of {lat['n_dims']} "
            f"dimensions active (variance of the posterior mean > {metrics.ACTIVE_VARIANCE:g})",
            f"{'latent probe':<28}Dice per volume / slice accuracy with z replaced (drop from "
            f"{probe['dice_volume_mean']:.4f} / {probe['slice_accuracy']:.4f}):",
        ]
        for name in PROBES:
            p = probe[name]
            lines.append(f"{'':<28}{name:<8} {p['dice_volume_mean']:.4f} ({p['dice_drop']:+.4f})   "
                         f"{p['slice_accuracy']:.4f} ({p['accuracy_drop']:+.4f})")
    return "\n".join(lines)


class _OverlaySheets:
    """Per patient, the slices `figures.overlay_picks` chooses (best, median and
    worst Dice among tumor slices, and the largest false positive), kept as the
    slices stream by; `write` draws one sheet per patient for `n` patients
    spread evenly over the ranking by Dice per volume, best first."""

    def __init__(self, records):
        self.left: dict[str, int] = {}
        for r in records:
            self.left[r.patient] = self.left.get(r.patient, 0) + 1
        self.pending: dict[str, list[tuple]] = {}
        self.picked: dict[str, list[tuple]] = {}

    def add(self, batch, flair, truth, masks, dice) -> None:
        for j, record in enumerate(batch):
            fp = int((masks[j] & ~truth[j]).sum())
            self.pending.setdefault(record.patient, []).append(
                (record, flair[j], truth[j], masks[j], float(dice[j]), fp))
            self.left[record.patient] -= 1
            if self.left[record.patient] == 0:
                rows = self.pending.pop(record.patient)
                picks = figures.overlay_picks([r[4] for r in rows], [bool(r[2].any()) for r in rows],
                                              [r[5] for r in rows])
                # Copies: a view into the batch would keep the whole batch alive.
                self.picked[record.patient] = [
                    (label, rows[i][0], *(np.array(a) for a in rows[i][1:4]), *rows[i][4:]) for i, label in picks]

    def write(self, folder: Path, per_patient: list[dict], n: int, step: int) -> None:
        dice = {r["patient"]: r["dice"] for r in per_patient}
        for patient in figures.overlay_patients({p: dice.get(p) for p in self.picked if self.picked[p]}, n):
            panels = []
            for label, record, f, t, m, d, fp in self.picked[patient]:
                detail = f"Dice {d:.2f}" + (f", {fp} px false positive" if "false positive" in label else "")
                panels.append((f, t, m, f"{label}: slice {record.slice_number}\n{detail}"))
            vol = dice.get(patient)
            figures.save_overlay_sheet(
                folder / f"{patient}.png", panels,
                title=f"{patient}: Dice per volume {'n/a' if vol is None else f'{vol:.2f}'} (step {step})")


class _ByPatient:
    """Regroups the batches of a record list sorted by patient into whole
    patients, so each patient's slices are decided as one volume: `add`
    returns the patients its batch completed, as (records, arrays cut alike)."""

    def __init__(self, records):
        self.left: dict[str, int] = {}
        for r in records:
            self.left[r.patient] = self.left.get(r.patient, 0) + 1
        runs = sum(a.patient != b.patient for a, b in zip(records, records[1:])) + bool(records)
        if runs != len(self.left):
            raise AssertionError("records are not grouped by patient")
        self.records: list = []
        self.arrays: dict[str, np.ndarray] | None = None

    def add(self, batch, arrays: dict[str, np.ndarray]) -> list[tuple[list, dict[str, np.ndarray]]]:
        self.records += list(batch)
        self.arrays = arrays if self.arrays is None else {
            k: np.concatenate([self.arrays[k], v]) for k, v in arrays.items()}
        for r in batch:
            self.left[r.patient] -= 1
        groups, start = [], 0
        for i in range(1, len(self.records) + 1):
            if i == len(self.records) or self.records[i].patient != self.records[start].patient:
                if self.left[self.records[start].patient]:
                    break  # the last patient of the buffer is not complete yet
                groups.append((self.records[start:i], {k: v[start:i] for k, v in self.arrays.items()}))
                start = i
        self.records = self.records[start:]
        self.arrays = {k: v[start:] for k, v in self.arrays.items()}
        return groups


def evaluate(
    workdir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    checkpoint: str = "best",
    batch_size: int | None = None,
    n_overlays: int | None = None,
    progress: bool = False,
    empty: str = "one",
    samples: int = 0,
    tta: bool | None = None,
    min_component: int | None = None,
    presence: str | None = None,
    min_volume_share: float | None = None,
    seed: int = 0,
    write: bool = True,
    max_patients: int | None = None,
) -> dict:
    """Scores a trained workdir on a split; writes the files of the module docstring; returns the report.

    data_dir: an LGG-layout folder (default: the one training used, see
    `default_data_dir`). split: see the module docstring. checkpoint: "best"
    or "latest". batch_size, n_overlays: default to the config's
    ``eval.batch_size`` and ``eval.overlays`` (else 32 and 8). max_patients:
    score only that many of the split's patients, spread evenly over their
    sorted ids (the report's ``n_patients_in_split`` counts them all).
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    _check_workdir(workdir)
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_CHOICES:
        raise DlvaeError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise DlvaeError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0 <= samples <= 10000:
        raise DlvaeError(f"--samples must be in [0, 10000], got {samples}")
    if write:
        _check_writable(workdir)
    run_id = _run_identity(workdir)
    predictor = inference.load_predictor(workdir, checkpoint)
    model_name = _config_value(predictor.config, "model", "name") or "trained"
    if samples and not getattr(predictor, "can_sample", False):
        raise DlvaeError(f"--samples: the {model_name} model in {workdir} is deterministic (no latent to "
                         "sample); use --tta for test-time-augmentation uncertainty")
    tta, min_component, presence, min_volume_share = inference.prediction_settings(
        predictor, workdir, tta, min_component, presence, min_volume_share)
    flips = getattr(predictor, "tta_flips", ALL_FLIPS)
    score_flips = tta and getattr(predictor, "segments", True)
    calibration = CalibrationAccumulator() if samples or score_flips else None
    used = getattr(predictor, "checkpoint", checkpoint)
    if used != checkpoint and inference.has_validation(workdir):  # without validation, best is the last
        print_warning(f"{workdir}: no readable {checkpoint} checkpoint; scoring the {used} one (step {predictor.step})")
    if batch_size is None:
        batch_size = int(_config_value(predictor.config, "eval", "batch_size") or 32)
    if n_overlays is None:
        configured = _config_value(predictor.config, "eval", "overlays")
        n_overlays = 8 if configured is None else int(configured)
    trained_source = shift.source_kind(_config_value(predictor.config, "data", "data_dir"))
    own = default_data_dir(predictor.config, workdir)
    scored_source = trained_source if data_dir is None or Path(data_dir).resolve() == own.resolve() else "folder"
    if data_dir is None:
        data_dir = own
    index = lgg.scan(data_dir, progress=progress)
    n_in_split = len({r.patient for r in _split_records(index, workdir, split)[0]})
    records, n_in_train = select_records(index, workdir, split, max_patients)
    if split == "all" and n_in_train:
        print(f"note: {n_in_train} of these patients were used for training", file=sys.stderr)

    channels = model_channels(predictor.config)
    sheets = _OverlaySheets(records) if n_overlays > 0 else None
    if empty not in metrics.EMPTY_CONVENTIONS:
        raise DlvaeError(f"--empty must be one of {', '.join(metrics.EMPTY_CONVENTIONS)}, got {empty!r}")
    acc = metrics.SegmentationAccumulator(volumes=True, empty=empty)
    diagnose = getattr(predictor, "latent_sizes", None) is not None
    latent: dict[str, list[np.ndarray]] = {"mean": [], "kl": []}
    probe_parts: dict[str, list[dict]] = {name: [] for name in PROBES}
    base_parts: list[dict] = []
    patients: list[str] = []
    head_means: list[np.ndarray] = []
    head_shares: list[np.ndarray] = []
    bar = tqdm(total=len(records), desc=f"evaluate {split}", unit="slice", disable=not progress, file=sys.stderr)
    by_patient = _ByPatient(records)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images, truth = lgg.load_arrays(batch, channels)
        flair = images[..., lgg.FLAIR_CHANNEL] if channels == "all" else images
        m, sh = shift.slice_means(flair)
        head_means.append(m)
        head_shares.append(sh)
        out = predictor.diagnose(images) if diagnose else predictor(images)
        truth = truth.astype(bool)
        if calibration is not None:
            if samples:
                mean, _ = predictor.sample_stats(images, samples, seed + start)
            else:
                mean = out["prob_BxHxW"]  # the flips' mean
            calibration.add(mean, predictive_entropy(mean), truth)
        if diagnose:
            latent["mean"].append(out["latent_mean_BxD"])
            latent["kl"].append(out["latent_kl_BxD"])
        # Decisions wait for a patient's last slice: the volume rule needs the whole volume.
        decided = {k: np.asarray(v) for k, v in out.items() if k.endswith(("prob_BxHxW", "tumor_prob_B"))}
        for group, arrays in by_patient.add(batch, dict(decided, flair=flair, truth=truth)):
            flair_g, truth_g, n = arrays["flair"], arrays["truth"], len(group)
            masks, labels = decide(arrays, n, flair_g.shape[1:], min_component, presence, min_volume_share)
            part = acc.add(masks, truth_g, [r.patient for r in group], labels, truth_g.any(axis=(1, 2)))
            if diagnose:
                patients.extend(r.patient for r in group)
                single = "single_" if "single_prob_BxHxW" in arrays else ""  # the probe compares single passes
                for name in ("base", *PROBES):
                    key = single if name == "base" else f"probe_{name}_"
                    m, lab = decide({"prob_BxHxW": arrays[f"{key}prob_BxHxW"],
                                     "tumor_prob_B": arrays[f"{key}tumor_prob_B"]},
                                    n, flair_g.shape[1:], min_component, presence, min_volume_share)
                    (base_parts if name == "base" else probe_parts[name]).append(
                        metrics.probe_counts(m, truth_g, lab))
            if sheets is not None:
                sheets.add(group, flair_g, truth_g, masks, part["dice"])
        bar.update(len(batch))
    bar.close()

    report = acc.report()
    for row in report["per_patient"]:  # the dataset's FLAIR copies (`lgg.LggIndex.missing_sequences`)
        row["missing_sequences"] = "+".join(index.missing_sequences.get(row["patient"], []))
    report["n_patients_missing_sequences"] = sum(bool(r["missing_sequences"]) for r in report["per_patient"])
    if diagnose:
        cat = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        report["latent"] = metrics.latent_report(np.concatenate(latent["mean"]), np.concatenate(latent["kl"]),
                                                 predictor.latent_sizes)
        report["probe"] = metrics.probe_report(cat(base_parts), {n: cat(p) for n, p in probe_parts.items()}, patients)
    report["data_profile"] = shift.profile(np.concatenate(head_means), np.concatenate(head_shares), scored_source)
    report["data_shift"] = shift.compare(shift.read_profile(workdir), report["data_profile"])
    if report["data_shift"]:
        print_warning(f"{workdir}: {report['data_shift']}")
    if calibration is not None:
        report["uncertainty"] = dict(calibration.report(), method=f"{samples} latent samples" if samples
                                     else f"test-time augmentation ({len(flips)} views: the slice and "
                                          "the flips the run trained with)")
    report.update({
        "data_dir": str(index.root),
        "split": split,
        "checkpoint": used,
        "checkpoint_step": int(predictor.step),
        "threshold": THRESHOLD,
        "tta": tta,
        "min_component": int(min_component),
        "presence": presence,
        "min_volume_share": float(min_volume_share),
        "n_patients_in_train": int(n_in_train),
        "n_patients_in_split": n_in_split,
    })
    report = json_safe(report)

    if not write:
        return report
    if _run_identity(workdir) != run_id:
        raise DlvaeError(f"{workdir}: the run was replaced (train --overwrite?) while it was being evaluated; "
                         "nothing was written, evaluate again")
    with atomic_path(workdir / f"eval_{split}", replace_dir=True) as tmp:
        (tmp / "overlays").mkdir(parents=True)
        figures.save_dice_plot(tmp / "dice_per_patient.png",  # no Dice (--empty exclude): an empty bar
                               {r["patient"]: math.nan if r["dice"] is None else r["dice"]
                                for r in report["per_patient"]},
                               title=f"{split}: Dice per patient volume (step {report['checkpoint_step']})")
        figures.save_confusion(tmp / "confusion.png", report["slice_counts"],
                               title=f"{split}: slice labels (step {report['checkpoint_step']})")
        if calibration is not None:
            u = report["uncertainty"]
            save_reliability(tmp / "reliability.png", u,
                             f"{split}, {u['method']}\nAUROC of entropy for pixel errors {_num(u['auroc_error'], 3)}")
        if sheets is not None:
            sheets.write(tmp / "overlays", report["per_patient"], n_overlays, report["checkpoint_step"])
    write_text(workdir / f"per_patient_{split}.csv", per_patient_csv(report["per_patient"]))
    write_json(workdir / f"metrics_{split}.json", report)
    write_json(workdir / "metrics.json", report)
    return report
