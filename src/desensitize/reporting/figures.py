"""PNG figures for people: heatmaps, masks and sample grids, confusion matrices, the attacker's
data-scaling curves, and panels of points with error bars (the sweep's frontier). Uses matplotlib's
Figure (no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.storage import atomic_path


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def heatmap(array: np.ndarray, path: Path, title: str, cmap: str = "magma", colorbar: bool = True) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3.6))
    ax = fig.subplots()
    image = ax.imshow(array, cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def image_grid(rows: Sequence[tuple[str, np.ndarray]], path: Path, title: str) -> None:
    """One row per (label, uint8 images (K, C, H, W)), K columns."""
    from matplotlib.figure import Figure

    columns = len(rows[0][1])
    fig = Figure(figsize=(1.1 * columns + 1.2, 1.15 * len(rows) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            image = images[c].transpose(1, 2, 0)
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Rows: true class, columns: predicted class; counts in the cells."""
    from matplotlib.figure import Figure

    k = len(class_names)
    fig = Figure(figsize=(0.45 * k + 2, 0.45 * k + 1.6))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if count > matrix.max() / 2 else "black",
            )
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def scaling_curves(scaling: dict, limits: dict[str, float], path: Path) -> None:
    """The learned attacker's gated scores against its training images (log scale), the log-linear fit
    out to the assumed attacker budget, and each threshold."""
    from matplotlib.figure import Figure

    points = scaling["points"]
    counts = np.array([p["images"] for p in points], dtype=float)
    budget = scaling["assumed_attacker_images"]
    fig = Figure(figsize=(4 * len(limits), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(limits)))
    for ax, (score, limit) in zip(axes, limits.items(), strict=True):
        ax.plot(counts, [p["scores"][score] for p in points], "o-", label="measured")
        fit = scaling["fits"].get(score)
        if fit:
            xs = np.geomspace(counts.min(), max(budget, counts.max()), 50)
            slope = fit["slope_per_doubling"] / np.log(2)
            ax.plot(xs, fit["intercept"] + slope * np.log(xs), "--", color="gray", label="log-linear fit")
        ax.axhline(limit, color="tab:red", lw=1, label="threshold")
        ax.axvline(budget, color="black", lw=0.8, ls=":", label="assumed attacker budget")
        ax.set_xscale("log")
        ax.set_xlabel("attacker training images", fontsize=8)
        ax.set_title(score, fontsize=9)
    axes[0].legend(fontsize=6)
    _save(fig, path)


@dataclass(frozen=True)
class Series:
    """Points of one series with their error bars; `color` indexes matplotlib's cycle, `filled` markers
    are circles, hollow ones triangles, `large` ones stand out."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    xerr: Sequence[float]
    yerr: Sequence[float]
    color: int = 0
    filled: bool = True
    large: bool = False


@dataclass(frozen=True)
class Panel:
    series: list[Series]
    xlabel: str
    ylabel: str
    limits: Sequence[float] = ()  # drawn at their mean as a dashed vertical line, "gate limit"


def errorbar_panels(panels: Sequence[Panel], path: Path, title: str) -> None:
    """Panels side by side, one legend (the first panel's) at the right."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(panels), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels, strict=True):
        for s in panel.series:
            color = f"C{s.color % 10}"
            ax.errorbar(
                np.asarray(s.x),
                np.asarray(s.y),
                xerr=np.asarray(s.xerr),
                yerr=np.asarray(s.yerr),
                fmt="o" if s.filled else "^",
                color=color,
                mfc=color if s.filled else "none",
                markersize=7 if s.large else 4,
                elinewidth=0.6,
                capsize=1.5,
                alpha=0.85,
                label=s.label,
            )
        if panel.limits:
            ax.axvline(float(np.mean(panel.limits)), color="gray", linestyle="--", linewidth=1, label="gate limit")
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


@dataclass(frozen=True)
class Scatter:
    """Points of one series; `color` indexes matplotlib's cycle."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    marker: str = "o"
    size: float = 12
    color: int = 0


@dataclass(frozen=True)
class ScatterPanel:
    series: list[Scatter]
    xlabel: str
    ylabel: str
    vlines: dict[str, float] = field(default_factory=dict)  # label -> x, dashed
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y, dotted


def scatter_panels(panels: Sequence[ScatterPanel], path: Path, title: str) -> None:
    """Panels of points side by side (the mask search's trade-off), one legend at the right."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels, strict=True):
        for s in panel.series:
            ax.scatter(s.x, s.y, marker=s.marker, s=s.size, color=f"C{s.color % 10}", alpha=0.75, label=s.label)
        for k, (label, x) in enumerate(panel.vlines.items()):
            ax.axvline(x, color="gray", linestyle="--" if k == 0 else ":", linewidth=1, label=label)
        for k, (label, y) in enumerate(panel.hlines.items()):
            ax.axhline(y, color=f"C{(7 + k) % 10}", linestyle="-.", linewidth=1, label=label)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    handles: dict[str, Any] = {}
    for ax in axes:  # every label once, in the order first drawn
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
