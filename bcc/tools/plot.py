"""Figures for change profiles and schedules (matplotlib, Agg; nothing is shown).

* :func:`plot_change` -- the paper's Fig. 2b: ``L1_rel`` per block against the step.
* :func:`plot_schedule` -- the paper's Fig. 4: each block's cache lifetimes.

Both stay readable from a handful of blocks to 60 (SDXL, PixArt): colours follow
block position, figures grow with the block count, and beyond
:data:`MAX_LINES_PER_AXES` blocks the change curves become small multiples.
Files are written to a temporary name and renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from bcc import ChangeProfile, Schedule  # noqa: E402

__all__ = ["plot_change", "plot_schedule", "lifetimes", "MAX_LINES_PER_AXES"]

MAX_LINES_PER_AXES = 20  # above this, plot_change draws one small panel per block
_CMAP = "viridis"


def _colors(n: int) -> list:
    cmap = plt.get_cmap(_CMAP)
    # Stop short of viridis' pale yellow end, which vanishes on white.
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _describe(profile: ChangeProfile) -> str:
    bits = [f"{profile.num_blocks} blocks", f"{profile.num_runs} run{'s' if profile.num_runs != 1 else ''}",
            f"mode={profile.mode}"]
    if profile.scheduler:
        bits.append(str(profile.scheduler.get("name")))
    if profile.guidance_scale is not None:
        bits.append(f"guidance {profile.guidance_scale:g}")
    return ", ".join(bits)


def plot_change(profile: ChangeProfile, path: str | os.PathLike, *, top: int | None = None) -> Path:
    """Plot each block's relative L1 change against the sampling step (Fig. 2b).

    One line per block, coloured by the block's position in the network (dark = early,
    light = late), with a shaded ±1 std band across calibration runs when the profile
    has ``l1_std``. Step 0 has no previous step and is left out. Up to
    :data:`MAX_LINES_PER_AXES` blocks share one plot with the legend on the right; more
    get one small panel each (shared axes, the median over all blocks in grey).

    Args:
        profile: a :class:`~bcc.ChangeProfile`, e.g. from :func:`bcc.calibrate`.
        path: PNG file to write (parent folders are created).
        top: only the ``top`` blocks with the largest mean change (position order kept).

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> l1 = torch.linspace(0.5, 0.1, 6)[:, None] * torch.linspace(1, 2, 3)
        >>> p = ChangeProfile(l1, ["down.0", "mid.0", "up.0"], l1_std=0.1 * l1)
        >>> plot_change(p, Path(tempfile.mkdtemp()) / "change.png").stat().st_size > 1000
        True
    """
    l1, std = profile.l1_rel, profile.l1_std
    names = list(profile.block_names)
    index = list(range(len(names)))
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    run = profile.steps_run  # an expert's steps (Wan 2.2); its first has no previous step
    steps = list(run[1:] if len(run) > 1 else run)
    if top is not None:
        means = l1[steps].mean(0)
        index = sorted(torch.argsort(means, descending=True)[:top].tolist())
    colors = _colors(len(names))
    title = f"Block change per step: L1_rel  ({_describe(profile)})"
    if top is not None and len(index) < len(names):
        title += f", top {len(index)} by mean change"

    def draw(ax, i, label=True):
        y = l1[steps, i]
        ax.plot(steps, y.tolist(), color=colors[i], lw=1.6, marker="o" if len(steps) <= 30 else None,
                ms=2.5, label=names[i] if label else None)
        if std is not None:
            lo, hi = (y - std[steps, i]).clamp_min(0), y + std[steps, i]
            ax.fill_between(steps, lo.tolist(), hi.tolist(), color=colors[i], alpha=0.15, lw=0)
        _not_run(ax, run, profile.num_steps)

    if len(index) <= MAX_LINES_PER_AXES:
        fig = plt.figure(figsize=(9.5, max(4.0, 1.6 + 0.24 * len(index))), layout="constrained")
        ax = fig.add_subplot()
        for i in index:
            draw(ax, i)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("sampling step (0 = noise)")
        ax.set_ylabel("relative L1 change to previous step")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
        fig.legend(loc="outside right upper", fontsize=8, title="block (network order)", title_fontsize=8)
        return _save(fig, path)

    ncols = min(10, math.ceil(math.sqrt(1.6 * len(index))))
    nrows = math.ceil(len(index) / ncols)
    width, height = 1.9 * ncols + 0.7, 1.45 * nrows + 1.1
    fig, axes = plt.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False, figsize=(width, height))
    # Fixed margins: constrained layout costs seconds with 60 panels.
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.1 / width, bottom=0.6 / height, top=1 - 0.75 / height,
                        wspace=0.1, hspace=0.42)
    median = l1[steps].median(dim=1).values.tolist()
    for k, ax in enumerate(axes.flat):
        if k >= len(index):
            ax.set_visible(False)
            continue
        i = index[k]
        ax.plot(steps, median, color="0.6", lw=0.8)
        draw(ax, i, label=False)
        ax.set_title(f"{i}: {_short(names[i])}", fontsize=7, loc="left")
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.supxlabel("sampling step (0 = noise)", fontsize=9)
    fig.supylabel("relative L1 change to previous step", fontsize=9, x=0.12 / width)
    fig.suptitle(title + "\ngrey: median over all blocks; band: ±1 std over runs", fontsize=10)
    return _save(fig, path)


def _not_run(ax, run: range, num_steps: int) -> None:
    # Steps another denoiser runs (the other Wan 2.2 expert): shaded, so the curve's span reads as part of the trajectory.
    for lo, hi in ((-0.5, run.start - 0.5), (run.stop - 0.5, num_steps - 0.5)):
        if hi > lo:
            ax.axvspan(lo, hi, color="0.88", lw=0, zorder=0)


def lifetimes(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per block, ``(start, length)`` of each cache lifetime: a recompute step up to the next.

    Example:
        >>> lifetimes(torch.tensor([[True], [False], [True], [False]]))
        [[(0, 2), (2, 2)]]
    """
    T, K = mask.shape
    out = []
    for i in range(K):
        starts = [s for s in range(T) if bool(mask[s, i])] + [T]
        out.append([(a, b - a) for a, b in zip(starts, starts[1:])])
    return out


def plot_schedule(schedule: Schedule, path: str | os.PathLike) -> Path:
    """Plot a schedule as cache lifetimes, one row per block (Fig. 4).

    Each bar runs from a step where the block is recomputed up to its next recompute
    (the steps in between reuse that cache, alternate lifetimes are shaded lighter); the
    recompute steps are marked with a dot, and the right margin gives each block's number of recomputes. The title
    gives the compute fraction and the ideal speedup (and the threshold, if recorded).
    A schedule of one expert (``active_steps``) shades the steps it does not run.

    Args:
        schedule: a :class:`~bcc.Schedule`.
        path: PNG file to write (parent folders are created).

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> s = Schedule.every(3, 10, ["down.0", "mid.0", "up.0"])
        >>> plot_schedule(s, Path(tempfile.mkdtemp()) / "schedule.png").stat().st_size > 1000
        True
    """
    T, K = schedule.num_steps, schedule.num_blocks
    names = schedule.block_names
    run = schedule.steps_run
    colors = _colors(K)
    fig = plt.figure(figsize=(max(7.0, 3.5 + 0.28 * T), max(2.6, 1.3 + 0.24 * K)), layout="constrained")
    ax = fig.add_subplot()
    _not_run(ax, run, T)
    for i, spans in enumerate(lifetimes(schedule.mask[run.start:run.stop])):
        spans = [(s + run.start, n) for s, n in spans]
        for k, (s, n) in enumerate(spans):  # alternate shades so neighbouring lifetimes separate
            ax.broken_barh([(s - 0.44, n - 0.12)], (i - 0.36, 0.72), facecolors=colors[i],
                           edgecolor="none", alpha=0.9 if k % 2 == 0 else 0.55)
        ax.plot([s for s, _ in spans], [i] * len(spans), "o", color="black", ms=3.2 if K <= 30 else 2.4)
        ax.text(T - 0.2, i, f"{len(spans)}/{len(run)}", va="center", fontsize=7, color="0.3")
    ax.set_xlim(-0.6, T + 0.9 + 0.02 * T)
    ax.set_ylim(K - 0.5, -0.5)
    ax.set_yticks(range(K), [_short(n, 40) for n in names], fontsize=8 if K <= 30 else 6.5)
    ticks = range(0, T, 1 if T <= 25 else 5 if T <= 100 else 10)
    ax.set_xticks(list(ticks), [str(t) for t in ticks], fontsize=8)
    ax.set_xlabel("sampling step (0 = noise)\nbar = one cache lifetime, dot = recompute, right = recomputes / steps",
                  fontsize=9)
    ax.grid(axis="x", alpha=0.25)
    title = f"Cache schedule, {K} blocks × {T} steps"
    if len(run) < T:
        title += f" (runs at steps {run.start}-{run.stop - 1}; shaded: not run)"
    title += f"\ncompute fraction {schedule.compute_fraction():.3f}, ideal speedup {schedule.ideal_speedup():.2f}x"
    threshold = schedule.meta.get("threshold")
    if threshold is not None:
        title += f", δ = {threshold:.4g}"
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
