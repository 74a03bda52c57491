"""``uvtrain plot``: a run's held-out curves and training loss terms from its ``metrics.jsonl``, as one PNG.

One panel per held-out metric (``val`` rows, :mod:`train.validate`): the sampler alone during the sampler stages and
UV_pred in the generator stage, in two colours; the completion errors with one thin line per yaw band beside the
total. Then one wide panel of every training loss term over the steps (log scale). Dashed lines mark where each
stage ends. matplotlib (Agg) is imported here only: ``uvtrain --help`` does not load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.config import HIGHER_IS_BETTER

__all__ = ["plot_run", "read_metrics"]

PANELS = ("l1", "l1_face", "ssim", "seen_mae", "unseen_mae", "all_mae", "id_recon", "id_front")
"""The held-out metrics that get a panel, in order, when the run logged them."""
TITLES = {"l1": "re-render L1 (Table 1)", "l1_face": "re-render L1 on face pixels", "ssim": "re-render SSIM",
          "seen_mae": "seen texels, MAE x255", "unseen_mae": "unseen texels, MAE x255",
          "all_mae": "all face texels, MAE x255", "id_recon": "ID Recon (cosine)", "id_front": "ID Front (cosine)"}
METHOD_COLOURS = {"sampler": "tab:orange", "generator": "tab:blue"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, ``val`` rows) of ``RUN/metrics.jsonl``, in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a `uvtrain fit` run directory, or nothing logged "
                                f"yet)")
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("phase") != "val"], [r for r in rows if r.get("phase") == "val"]


def _stage_ends(train: list[dict]) -> list[tuple[int, str]]:
    """(last step, name) of each stage the training rows cover (a stage logs its last step)."""
    ends: list[tuple[int, str]] = []
    for r in train:
        if ends and ends[-1][1] == r["phase"]:
            ends[-1] = (r["step"], r["phase"])
        else:
            ends.append((r["step"], r["phase"]))
    return ends


def _val_panel(ax, val: list[dict], key: str) -> None:
    labelled = set()
    for method, colour in METHOD_COLOURS.items():
        rows = [r for r in val if r.get("method") == method and f"val/{key}" in r]
        if not rows:
            continue
        ax.plot([r["step"] for r in rows], [r[f"val/{key}"] for r in rows], "o-", color=colour, ms=3, lw=1.5,
                label="sampler alone" if method == "sampler" else "UV_pred")
        for band, style in (("yaw00-30", ":"), ("yaw30-60", "--"), ("yaw60-90", "-.")):
            pts = [(r["step"], r[f"val/{band}/{key}"]) for r in rows if f"val/{band}/{key}" in r]
            if pts:
                label = None if band in labelled else band.replace("yaw", "|yaw| ")
                labelled.add(band)
                ax.plot(*zip(*pts, strict=True), style, color=colour, lw=0.8, alpha=0.7, label=label)
    better = "higher" if key in HIGHER_IS_BETTER else "lower"
    ax.set_title(f"held-out {TITLES[key]} ({better} is better)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _loss_panel(ax, train: list[dict]) -> None:
    import matplotlib

    keys = sorted({k for r in train for k in r if k.startswith("loss")})
    cmap = matplotlib.colormaps["tab20"]
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in train if key in r and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1.8 if key == "loss" else 1.0, color=cmap(i % 20), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss terms (means over each log window)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=max(1, (len(keys) + 7) // 8), loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw ``RUN/metrics.jsonl`` into ``out`` (default ``RUN/curves.png``); returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    keys = [k for k in PANELS if any(f"val/{k}" in r for r in val)]
    cols = 3
    n_rows = (len(keys) + cols - 1) // cols + 1
    fig = plt.figure(figsize=(5.0 * cols, 3.2 * n_rows), layout="constrained")
    grid = fig.add_gridspec(n_rows, cols)
    axes = [fig.add_subplot(grid[i // cols, i % cols]) for i in range(len(keys))]
    for ax, key in zip(axes, keys, strict=True):
        _val_panel(ax, val, key)
    loss_ax = fig.add_subplot(grid[n_rows - 1, :])
    _loss_panel(loss_ax, train)
    ends = _stage_ends(train)
    for ax in [*axes, loss_ax]:
        for step, _ in ends[:-1]:
            ax.axvline(step, color="grey", ls="--", lw=0.8)
        ax.set_xlim(left=0)
    for (step, name), start in zip(ends, [0] + [s for s, _ in ends[:-1]], strict=True):
        loss_ax.text((start + step) / 2, 0.97, name, transform=loss_ax.get_xaxis_transform(), ha="center",
                     va="top", fontsize=8, color="dimgrey")
    title = f"{Path(run_dir).resolve().name}: {len(val)} validations"
    if val:
        title += f" on {val[-1].get('val/samples', '?')} held-out samples"
    fig.suptitle(title if val else f"{title} (train with --val-store for held-out curves)", fontsize=11)
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
