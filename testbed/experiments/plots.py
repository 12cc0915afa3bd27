"""The report's PNG plots for one setting: accuracy against the clock, time to target, memory, traffic.

matplotlib with the Agg backend (files only, no display).  Every plot has a title, the setting as
its subtitle, units on its axes and a legend or labels naming each method.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from testbed.core.devices import CLASSES  # noqa: E402
from testbed.measure.memory import MIB

if TYPE_CHECKING:
    from testbed.experiments.runs import Group

LINES = ["-", "--", "-.", ":"]


def plot_setting(groups: list[Group], baseline: str, out: Path, prefix: str) -> list[str]:
    """Draw the four plots of one setting into `out`; return their file names."""
    colors = {g.method: f"C{i % 10}" for i, g in enumerate(groups)}
    plots = [("accuracy", "Test accuracy against the clock (mean over seeds, band: ± std)", accuracy),
             ("time-to-target", f"Time to target accuracy (label: speed-up vs {baseline})", time_to_target),
             ("memory", "Peak training memory per device class (counted footprint)", memory),
             ("traffic", f"Traffic per round, all devices (label: change vs {baseline})", traffic)]
    names = []
    for name, title, draw in plots:
        fig, ax = plt.subplots(figsize=(8.5, 5), dpi=110)
        draw(ax, groups, colors, baseline)
        ax.set_title(title + "\n" + textwrap.fill(groups[0].setting, 110), fontsize=10)
        ax.grid(alpha=0.3, axis="y" if name != "accuracy" else "both")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}.png")
        plt.close(fig)
        names.append(f"{prefix}{name}.png")
    return names


def accuracy(ax, groups: list[Group], colors: dict, baseline: str) -> None:
    for n, g in enumerate(groups):
        style = LINES[n % len(LINES)]  # methods with identical curves stay visible
        curves = [([r["clock_s"] for r in run.rows if r["accuracy"] is not None],
                   [r["accuracy"] for r in run.rows if r["accuracy"] is not None]) for run in g.runs]
        lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
        label = f"{g.method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        if hi <= lo:  # no common clock range (e.g. one evaluation each): the points themselves
            for i, (x, y) in enumerate(curves):
                ax.plot(x, y, "o", color=colors[g.method], label=label if i == 0 else None)
            continue
        grid = np.linspace(lo, hi, 200)
        ys = np.array([np.interp(grid, x, y) for x, y in curves])
        mean = ys.mean(axis=0)
        ax.plot(grid, mean, style, color=colors[g.method], lw=2, label=label)
        if len(curves) > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(grid, mean - std, mean + std, color=colors[g.method], alpha=0.18, lw=0)
    s = groups[0].stats
    ax.axhline(s["target_accuracy"], ls="--", color="0.4", lw=1, label=f"target {s['target_accuracy']:g}")
    ax.set_xlabel(f"{s['clock']} clock (s)")
    ax.set_ylabel("test accuracy")
    ax.legend(loc="lower right", fontsize=8)


def time_to_target(ax, groups: list[Group], colors: dict, baseline: str) -> None:
    for i, g in enumerate(groups):
        s, n = g.stats, len(g.stats["seeds"])
        if not s["reached"]:
            ax.text(i, 0, f"not reached\n(0/{n})", ha="center", va="bottom", fontsize=9, color="0.3")
            continue
        err = s["time_to_target_std"] if s["reached"] > 1 else None
        ax.bar(i, s["time_to_target_s"], yerr=err, color=colors[g.method], capsize=4)
        speedup = s["vs_baseline"]["speedup"]
        label = "baseline" if g.method == baseline else "n/a" if speedup is None else f"{speedup:.2f}x"
        if s["reached"] < n:
            label += f"\n{s['reached']}/{n} reached"
        ax.annotate(label, (i, s["time_to_target_s"] + (err or 0)), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9)
    _method_ticks(ax, groups)
    s = groups[0].stats
    ax.set_ylabel(f"time to accuracy {s['target_accuracy']:g} ({s['clock']} clock, s)")
    ax.margins(y=0.15)


def memory(ax, groups: list[Group], colors: dict, baseline: str) -> None:
    classes = sorted({c for g in groups for c in g.stats["peak_train_mem_mb_by_class"]}, key=list(CLASSES).index)
    width = 0.8 / len(groups)
    for j, g in enumerate(groups):
        values = [g.stats["peak_train_mem_mb_by_class"].get(c, np.nan) for c in classes]  # nan: none finished
        ax.bar(np.arange(len(classes)) + (j - (len(groups) - 1) / 2) * width, values, width,
               color=colors[g.method], label=g.method)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_xlabel("device class (largest footprint among its devices)")
    ax.set_ylabel("peak training footprint (MiB)")
    ax.set_ylim(0, 1.3 * ax.get_ylim()[1])  # room for the legend above the bars
    ax.legend(fontsize=8, ncols=min(4, len(groups)), loc="upper center")


def traffic(ax, groups: list[Group], colors: dict, baseline: str) -> None:
    for i, g in enumerate(groups):
        up, down = g.stats["bytes_up_per_round"] / MIB, g.stats["bytes_down_per_round"] / MIB
        ax.bar(i, up, color=colors[g.method])
        ax.bar(i, down, bottom=up, color=colors[g.method], alpha=0.5, hatch="//")
        change = g.stats["vs_baseline"]["per_round_traffic_reduction"]
        label = "baseline" if g.method == baseline else "" if change is None else f"{-100 * change:+.0f} %"
        ax.annotate(label, (i, up + down), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=9)
    _method_ticks(ax, groups)
    ax.set_ylabel("MiB per round")
    ax.legend(handles=[Patch(color="0.55", label="up (devices to server)"),
                       Patch(facecolor="0.55", alpha=0.5, hatch="//", label="down (server to devices)")], fontsize=8)
    ax.margins(y=0.12)


def _method_ticks(ax, groups: list[Group]) -> None:
    ax.set_xlim(-0.6, len(groups) - 0.4)  # a method without a bar keeps its slot
    long = len(groups) > 4 or any(len(g.method) > 14 for g in groups)
    ax.set_xticks(range(len(groups)), [g.method for g in groups], rotation=20 if long else 0,
                  ha="right" if long else "center", fontsize=9)
