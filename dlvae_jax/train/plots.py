"""PNG plots of a run from its log.jsonl: every loss term and the validation
metrics over steps."""

from __future__ import annotations

import json
from pathlib import Path

from dlvae_jax.io import atomic_path


def _read_log(workdir: Path) -> list[dict]:
    path = workdir / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def training_plots(workdir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    rows = _read_log(workdir)
    written = []
    for kind, name, skip in (("train", "losses.png", {"learning_rate", "slices_per_s", "kl_beta"}),
                             ("eval", "validation.png", set())):
        series: dict[str, dict[int, float]] = {}
        for r in rows:
            if r.get("kind") != kind:
                continue
            for k, v in r.items():
                if k in ("kind", "step", "time") or k in skip or not isinstance(v, (int, float)):
                    continue
                series.setdefault(k, {})[int(r["step"])] = float(v)  # a resumed run overwrites its own steps
        if not series:
            continue
        n = len(series)
        cols = min(4, n)
        rows_n = -(-n // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.6 * rows_n), squeeze=False)
        for ax, (k, pts) in zip(axes.ravel(), sorted(series.items())):
            steps = sorted(pts)
            ax.plot(steps, [pts[s] for s in steps], lw=1.2)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.tight_layout()
        with atomic_path(workdir / name) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        written.append(workdir / name)
    return written
