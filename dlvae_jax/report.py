"""Figures and tables shared by the commands that score segmentations.

`overlay_rgb`: the one overlay renderer, a FLAIR slice with the truth (green)
and predicted (red) outlines, where they agree yellow, pixel-exact;
`save_overlay` puts it in a titled figure after optional other panels
(equalized slice, cluster map, ...), `save_png` writes it at its own size.
`save_dice_plot`: Dice per patient volume as bars. `metrics_table`: a text
table of our figures, with an optional column of the paper's beside them.
matplotlib is imported lazily and always with the Agg backend, so nothing
needs a display.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def outline(mask_HxW: np.ndarray) -> np.ndarray:
    """Boundary pixels of a mask (mask minus its connectivity-1 erosion): bool [H, W]."""
    from scipy import ndimage

    mask = np.asarray(mask_HxW, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))


def overlay_rgb(flair_HxW: np.ndarray, pred_HxW: np.ndarray, truth_HxW: np.ndarray | None = None) -> np.ndarray:
    """FLAIR in gray with outlines: prediction red, truth green, both yellow. uint8 [H, W, 3]."""
    rgb = np.repeat(np.asarray(flair_HxW, np.uint8)[:, :, None], 3, axis=2)
    p = outline(pred_HxW)
    t = outline(truth_HxW) if truth_HxW is not None else np.zeros_like(p)
    rgb[p & ~t] = (255, 0, 0)
    rgb[t & ~p] = (0, 255, 0)
    rgb[p & t] = (255, 255, 0)
    return rgb


def save_png(path: Path, image: np.ndarray, **imsave_kwargs) -> None:
    """Writes an image (uint8 [H, W] or [H, W, 3], or float with cmap/vmin/vmax) as PNG at its own size."""
    import matplotlib.image

    buf = io.BytesIO()
    # metadata without "Software" keeps the bytes free of the matplotlib version.
    matplotlib.image.imsave(buf, image, format="png", metadata={"Software": None}, **imsave_kwargs)
    Path(path).write_bytes(buf.getvalue())


def save_map(path: Path, image_HxW: np.ndarray, *, cmap: str, vmin: float, vmax: float, label: str,
             title: str = "") -> None:
    """Writes a float map as PNG with a colour bar (`label` on it), the image at about its own size."""
    plt = _pyplot()
    h, w = np.shape(image_HxW)
    scale = max(1.0, 256 / max(h, w))  # small maps are drawn larger, so the bar and text stay legible
    fig, ax = plt.subplots(figsize=(w * scale / 100 + 1.3, h * scale / 100 + 0.5))
    shown = ax.imshow(image_HxW, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_overlay(
    path: str | Path,
    flair_HxW: np.ndarray,
    truth_HxW: np.ndarray,
    prediction_HxW: np.ndarray,
    *,
    title: str = "",
    panels: Sequence[tuple[np.ndarray, str, str]] = (),
    overlay_title: str = "truth green, prediction red, both yellow",
    dpi: int = 80,
) -> None:
    """Writes a PNG: each of `panels` (image, name, colormap), then FLAIR with both outlines."""
    plt = _pyplot()
    n = len(panels) + 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3), squeeze=False)
    axes = axes[0]
    for ax, (img, name, cmap) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    ax = axes[-1]
    ax.imshow(overlay_rgb(flair_HxW, prediction_HxW, truth_HxW), interpolation="nearest")
    ax.set_title(overlay_title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


OUTLINE_LEGEND = (("truth outline", (0, 1, 0)), ("prediction outline", (1, 0, 0)), ("both outlines", (1, 1, 0)))


def overlay_picks(dice: Sequence[float], has_tumor: Sequence[bool], fp_pixels: Sequence[int]) -> list[tuple[int, str]]:
    """The slices of one patient worth looking at, as (index, label).

    Among slices with tumor in truth: the best, the median (the lower one of
    an even count) and the worst Dice, ties to the earlier slice; then the
    slice with the most false-positive pixels, when there is any. A slice
    picked twice appears once, its labels joined.
    """
    tumor = [i for i, t in enumerate(has_tumor) if t and not math.isnan(float(dice[i]))]
    by_dice = sorted(tumor, key=lambda i: (float(dice[i]), i))
    picks: list[tuple[int, str]] = []
    if by_dice:
        best = max(tumor, key=lambda i: (float(dice[i]), -i))
        picks += [(best, "best"), (by_dice[(len(by_dice) - 1) // 2], "median"), (by_dice[0], "worst")]
    if len(fp_pixels) and max(fp_pixels) > 0:
        picks.append((int(np.argmax(fp_pixels)), "largest false positive"))
    merged: dict[int, list[str]] = {}
    for i, label in picks:
        if label not in merged.setdefault(i, []):
            merged[i].append(label)
    return [(i, ", ".join(labels)) for i, labels in merged.items()]


def overlay_patients(dice_by_patient: Mapping[str, float | None], n: int) -> list[str]:
    """Up to n patients spread evenly over the ranking by Dice per volume: best
    first (ties by name), those without a Dice (None or NaN) last."""
    def key(p):
        d = dice_by_patient[p]
        missing = d is None or math.isnan(float(d))
        return (missing, 0.0 if missing else -float(d), p)

    return evenly_spaced(sorted(dice_by_patient, key=key), n)


def save_overlay_sheet(
    path: str | Path,
    panels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
    *,
    title: str = "",
    dpi: int = 100,
) -> None:
    """Writes one PNG of FLAIR slices side by side, each with truth and predicted
    outlines and its own title (panels: flair, truth, prediction, title), and
    a legend of the outline colours."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n + 0.2, 3.6), squeeze=False)
    for ax, (flair, truth, pred, name) in zip(axes[0], panels):
        ax.imshow(overlay_rgb(flair, pred, truth), interpolation="nearest")
        ax.set_title(name, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    fig.legend(handles=[Patch(facecolor=c, edgecolor="black", label=name) for name, c in OUTLINE_LEGEND],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.93 if title else 1))
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)


def save_dice_plot(
    path: str | Path, dice_per_patient: Mapping[str, float], *, title: str = "Dice per patient volume"
) -> None:
    """Writes a bar plot of Dice per patient (sorted by name); NaN bars are left empty."""
    plt = _pyplot()
    names = sorted(dice_per_patient)
    values = [float(dice_per_patient[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(names) + 1), 3.2))
    ax.bar(range(len(names)), [0.0 if math.isnan(v) else v for v in values], color="tab:red")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice per volume")
    width_in = fig.get_size_inches()[0]
    ax.set_title(textwrap.fill(title, max(20, int(width_in * 9))), fontsize=9)  # ~9 characters an inch at 9 pt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_confusion(path: str | Path, counts: Mapping[str, int], *, title: str = "slices") -> None:
    """Writes the 2 x 2 confusion matrix of slice labels (counts tp, fp, tn, fn)."""
    plt = _pyplot()
    grid = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="black" if v < grid.max() / 2 else "white")
    ax.set_xticks([0, 1], ["no tumor", "tumor"])
    ax.set_yticks([0, 1], ["no tumor", "tumor"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(value, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'n/a':>{width}}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):>{width}.4f}"
    return f"{str(value):>{width}}"


def metrics_table(
    rows: Sequence[tuple[str, object]],
    *,
    paper: Mapping[str, object] | None = None,
    header: tuple[str, str] = ("metric", "ours"),
    paper_header: str = "paper",
    label_width: int = 28,
    width: int = 8,
) -> str:
    """A fixed-width text table of (label, value) rows.

    Floats print with 4 decimals and None / NaN as "n/a". With `paper`, a
    third column gives the paper's figure for each label ("" where it has none).
    """
    cols = [f"{header[0]:<{label_width}}{header[1]:>{width}}"]
    if paper is not None:
        cols[0] += f"  {paper_header:>{width}}"
    for label, value in rows:
        line = f"{label:<{label_width}}{_cell(value, width)}"
        if paper is not None:
            line += "  " + (_cell(paper[label], width) if label in paper else " " * width)
        cols.append(line.rstrip())
    return "\n".join(cols)


def evenly_spaced(items: Sequence, m: int) -> list:
    """Up to m items spread evenly from the first to the last, in order."""
    if m <= 0 or not items:
        return []
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, min(m, len(items))).round().astype(int))]


def overlay_choice(has_tumor: list[bool], n: int) -> set[int]:
    """Up to n slice indices, half of them with tumor, spread evenly through the records."""
    tumor = [i for i, t in enumerate(has_tumor) if t]
    other = [i for i, t in enumerate(has_tumor) if not t]
    chosen = evenly_spaced(tumor, (n + 1) // 2)
    return set(chosen + evenly_spaced(other, n - len(chosen)))
