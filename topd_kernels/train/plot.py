"""Accuracy-vs-step plot per method, drawn with matplotlib (the `train` extra: `pip install -e '.[train]'`, which
`make demo` installs). matplotlib is imported when a plot is drawn, so the rest of the package never needs it."""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install -e '.[train]'"


def mean_curves(runs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per method, (step, accuracy averaged over its seeds) at the steps every seed evaluated."""
    curves = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        per_seed = [{e["step"]: e["accuracy"] for e in run["evals"]} for run in runs if run["method"] == method]
        steps = sorted(set.intersection(*(set(evals) for evals in per_seed)))
        curves[method] = [(step, sum(evals[step] for evals in per_seed) / len(per_seed)) for step in steps]
    return curves


def plot_accuracy(runs: list[dict], path: Path) -> str:
    """Write held-out accuracy vs step to `path` (PNG): a thin line per run (`run["evals"]`), a thick line per
    method for its mean over seeds, labelled axes and a legend. Returns a sentence saying what it wrote; without
    matplotlib it writes nothing and the sentence says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: not drawn (matplotlib is not installed; {INSTALL_HINT} installs it)"
    methods = list(dict.fromkeys(run["method"] for run in runs))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        steps = [e["step"] for e in run["evals"]]
        ax.plot(steps, [e["accuracy"] for e in run["evals"]], color=colours[run["method"]], alpha=0.3, linewidth=1)
    seeds = len({run["seed"] for run in runs})
    for method, curve in mean_curves(runs).items():
        if curve:
            ax.plot(*zip(*curve), color=colours[method], linewidth=2.5,
                    label=f"{method} (mean of {seeds} seed{'s' if seeds != 1 else ''})")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (greedy, exact answer)")
    ax.set_title("Student accuracy per distillation method (thin lines: single seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
