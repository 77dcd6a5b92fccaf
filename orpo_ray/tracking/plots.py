"""Training-curve, sweep and evidence plots (matplotlib's object API + Agg canvas: no pyplot, no global backend).

Pure: reads histories and result rows, writes PNGs. No MLflow; the trackers log the files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from orpo_ray.results import finite_float, logp_margin

CHOSEN, REJECTED = "tab:green", "tab:red"




def new_figure(figsize: tuple[float, float] = (7.0, 4.5)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps: list[int] = []
    values: list[float] = []
    for row in history:
        if key not in row or "step" not in row:
            continue
        value = finite_float(row[key])
        steps.append(int(row["step"]))
        values.append(float("nan") if value is None else value)
    order = sorted(range(len(steps)), key=steps.__getitem__)
    return [steps[i] for i in order], [values[i] for i in order]


def _plot_keys(
    history: Sequence[Mapping[str, Any]],
    lines: Iterable[tuple[str, str, str]],
    title: str,
    ylabel: str,
    out_path: Path,
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path | None:
    """lines: (metric key, legend label, colour). Train keys solid, eval_ keys dashed."""
    drawn = []
    for key, label, color in lines:
        steps, values = series(history, key)
        if any(not math.isnan(v) for v in values):
            drawn.append((key, label, color, steps, values))
    if not drawn:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    for key, label, color, steps, values in drawn:
        is_eval = key.startswith("eval_")
        ax.plot(
            steps,
            values,
            color=color,
            linestyle="--" if is_eval else "-",
            marker="o" if is_eval or len(steps) < 30 else None,
            markersize=4,
            linewidth=1.6,
            label=label,
        )
    if hline is not None:
        ax.axhline(hline, color="grey", linewidth=0.8, linestyle=":")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path


def plot_training_curves(
    history: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write PNG training curves from ``history`` rows ``{"step": int, **metrics}``.

    Train metrics use TRL's plain names, eval metrics the ``eval_`` prefix; rows may hold
    either or both. Writes (when the data exists): ``logps.png`` (chosen vs rejected
    mean log-probs), ``reward_margins.png``, ``reward_accuracies.png`` and ``loss.png``.
    Returns the paths written.
    """
    out = Path(out_dir)
    chosen, rejected = "tab:green", "tab:red"
    specs = [
        (
            "logps.png",
            [
                ("logps/chosen", "chosen (train)", chosen),
                ("logps/rejected", "rejected (train)", rejected),
                ("eval_logps/chosen", "chosen (eval)", chosen),
                ("eval_logps/rejected", "rejected (eval)", rejected),
            ],
            "Chosen vs rejected log-probabilities",
            "Mean log-prob per response token",
            None,
            None,
        ),
        (
            "reward_margins.png",
            [
                ("rewards/margins", "margin (train)", "tab:blue"),
                ("eval_rewards/margins", "margin (eval)", "tab:orange"),
            ],
            "Reward margin (chosen - rejected)",
            "Reward margin",
            0.0,
            None,
        ),
        (
            "reward_accuracies.png",
            [
                ("rewards/accuracies", "accuracy (train)", "tab:blue"),
                ("eval_rewards/accuracies", "accuracy (eval)", "tab:orange"),
            ],
            "Reward accuracy (share of pairs with chosen > rejected)",
            "Reward accuracy",
            0.5,
            (-0.02, 1.02),
        ),
        (
            "loss.png",
            [
                ("loss", "ORPO loss (train)", "tab:blue"),
                ("nll_loss", "NLL loss (train)", "tab:purple"),
                ("eval_loss", "ORPO loss (eval)", "tab:orange"),
                ("eval_nll_loss", "NLL loss (eval)", "tab:brown"),
            ],
            "Training loss",
            "Loss",
            None,
            None,
        ),
    ]
    written = []
    for name, lines, title, ylabel, hline, ylim in specs:
        path = _plot_keys(history, lines, title, ylabel, out / name, hline, ylim)
        if path is not None:
            written.append(path)
    return written


def _tick_label(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
            mantissa, exp = f"{v:.1e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exp)}"
        return f"{v:g}"
    return str(value)


def plot_heatmap(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    value_key: str,
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
    x_label: str | None = None,
    y_label: str | None = None,
    fmt: str = "{:.3f}",
) -> Path:
    """Heatmap of ``value_key`` over a grid of ``x_key`` × ``y_key`` (e.g. lr × λ).

    Axis values are sorted; numbers are labelled compactly in scientific notation
    (``1e-4``, ``3e-5``) as a log-scale sweep is. Several rows in one cell (seeds) are
    averaged and annotated with ``n=``; empty cells show ``n/a``.
    """
    import numpy as np

    def sort_key(v: Any) -> tuple[int, Any]:
        return (0, float(v)) if isinstance(v, (int, float)) else (1, str(v))

    xs = sorted({r[x_key] for r in rows if x_key in r}, key=sort_key)
    ys = sorted({r[y_key] for r in rows if y_key in r}, key=sort_key)
    cells: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if x_key not in r or y_key not in r:
            continue
        value = finite_float(r.get(value_key))
        if value is None:
            continue
        cells.setdefault((ys.index(r[y_key]), xs.index(r[x_key])), []).append(value)
    grid = np.full((max(len(ys), 1), max(len(xs), 1)), np.nan)
    for (i, j), vals in cells.items():
        grid[i, j] = sum(vals) / len(vals)

    fig = new_figure((1.6 + 1.3 * max(len(xs), 1), 1.4 + 0.9 * max(len(ys), 1)))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    cmap = __import__("matplotlib").colormaps["viridis"].with_extremes(bad="#dddddd")
    finite = grid[np.isfinite(grid)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax == vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [_tick_label(x) for x in xs])
    ax.set_yticks(range(len(ys)), [_tick_label(y) for y in ys])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if np.isfinite(v):
                n = len(cells[(i, j)])
                text = fmt.format(v) + (f"\nn={n}" if n > 1 else "")
                light = (v - vmin) / (vmax - vmin) < 0.6
                color = "white" if light else "black"
            else:
                text, color = "n/a", "dimgray"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xlabel(x_label or x_key)
    ax.set_ylabel(y_label or y_key)
    ax.set_title(title or f"{value_key} by {y_label or y_key} and {x_label or x_key}")
    fig.colorbar(im, ax=ax, label=value_key)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out




# ----------------------------------------------------------------------------------------------- plots
def plot_logps_by_arm(histories: Mapping[str, tuple[float, Sequence[Mapping]]], out_path: str | Path,
                      title: str = "") -> Path:
    """Figure 3 style: per arm, chosen vs rejected mean log-probs over steps (train solid, held-out dashed)."""
    fig = new_figure((5.0 * len(histories), 4.2))
    axes = fig.subplots(1, len(histories), sharey=True, squeeze=False)[0]
    for ax, (name, (beta, history)) in zip(axes, histories.items()):
        for key, label, color, style in (("logps/chosen", "chosen (train)", CHOSEN, "-"),
                                         ("logps/rejected", "rejected (train)", REJECTED, "-"),
                                         ("eval_logps/chosen", "chosen (held-out)", CHOSEN, "--"),
                                         ("eval_logps/rejected", "rejected (held-out)", REJECTED, "--")):
            steps, values = series(history, key)
            ax.plot(steps, values, style, color=color, label=label, linewidth=1.6 if style == "-" else 1.4,
                    marker="o" if style == "--" else None, markersize=3.5, alpha=0.55 if style == "-" else 1.0)
        final = [r for r in history if "eval_rewards/accuracies" in r][-1:]
        note = (f"\nheld-out accuracy {final[0]['eval_rewards/accuracies']:.2f}, "
                f"margin {logp_margin(final[0]):.2f}") if final else ""
        ax.set_title(f"{'SFT' if beta == 0 else 'ORPO'} (λ = {beta:g}){note}", fontsize=10)
        ax.set_xlabel("Optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Mean log-prob per response token")
    axes[-1].legend(loc="lower right", fontsize="small")
    return save_figure(fig, out_path, title)


def plot_lambda_sweep(rows: Sequence[Mapping[str, Any]], out_path: str | Path, title: str = "") -> Path:
    """Held-out log-prob margin and accuracy against λ (λ as evenly spaced categories: the grid includes 0)."""
    rows = sorted(rows, key=lambda r: r["beta"])
    xs = range(len(rows))
    fig = new_figure((9.0, 3.8))
    left, right = fig.subplots(1, 2)
    for ax, key, label, color in ((left, "logp_margin", "log-prob margin (chosen - rejected)", "tab:blue"),
                                  (right, "accuracy", "preference accuracy", "tab:orange")):
        values = [r[key] for r in rows]
        ax.plot(xs, values, "o-", color=color)
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xticks(list(xs), [f"{r['beta']:g}" for r in rows])
        ax.set_xlabel("λ (orpo.beta); λ = 0 is SFT")
        ax.set_ylabel(f"held-out {label}")
        ax.grid(True, alpha=0.3)
    right.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    lo = min(r["accuracy"] for r in rows)
    right.set_ylim(min(0.45, lo - 0.05), 1.02)
    return save_figure(fig, out_path, title)


def save_figure(fig, out_path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=11)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


