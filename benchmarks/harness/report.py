"""The report of a bench_kl result: the markdown table (`markdown`) and the plot (`plot`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

MiB = 1024 ** 2


def _fmt_t(r: dict) -> str:
    return f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"


def _opt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    """The table of a bench_kl result, with its header, the methods not run and the loss check."""
    env = result["env"]
    lines = [
        f"### fused_window_kl benchmark — {env['device_name']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, driver {env['driver']}, "
        f"commit {(env['git_commit'] or 'unknown')[:12]}{' (dirty)' if env['git_dirty'] else ''}, "
        f"{env['timestamp_utc']}. Device copy bandwidth (read+write): "
        f"{result['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s."
        + (f" Load average (1 min) at start / end: {env['loadavg_start'][0]:.1f} / {env['loadavg_end'][0]:.1f} "
           f"on {env['cpu_count']} cores." if env.get("loadavg_start") and env.get("loadavg_end") else ""),
        "",
        "Times in ms: median (p20–p80). Peak: memory above the inputs during fwd+bwd, the gradient included. "
        "GB/s: minimal traffic of fwd+bwd (read both logits twice, write the gradient) / median time. "
        "×eager: eager time / this time; mem×: this peak / eager peak. Δloss: |loss − eager's loss| (where eager "
        "did not run: − the loss of the first method that did).",
        "",
        "| N | V | dtype | loss | method | fwd ms | bwd ms | fwd+bwd ms | peak MiB | ×eager fwd+bwd | mem× | "
        "GB/s (% copy) | Δloss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    not_run = {}
    for r in result["results"]:
        if r["status"] in ("n/a", "alias"):
            # unusable here for every shape: listed once below the table, with the reason
            not_run.setdefault((r["method"], r["status"], r.get("reason", "")), set()).add(r["config"])
            continue
        head = f"| {r['N']} | {r['V']} | {r['dtype']} | {r['config']} | {r['method']} |"
        if r["status"] != "ok":
            label = "OOM" if r["status"] == "OOM" else f"{r['status']}: {r.get('reason', '')}"
            lines.append(f"{head} {label} | | | | | | | |")
            continue
        sp = r.get("speedup_vs_eager")
        mr = r.get("memory_ratio_vs_eager")
        dl = r.get("loss_abs_diff_vs_eager")
        lines.append(
            f"{head} {_fmt_t(r['fwd'])} | {_fmt_t(r['bwd'])} | {_fmt_t(r['fwd_bwd'])} | "
            f"{r['memory']['peak_step_bytes'] / MiB:.1f} | "
            f"{_opt(sp and sp['fwd_bwd'], '.2f')} | {_opt(mr, '.3f')} | "
            f"{r['bytes_per_s']['fwd_bwd'] / 1e9:.1f} ({r['pct_of_copy_bw']['fwd_bwd']:.0f}%) | "
            f"{_opt(dl, '.1e')} |")
    if not_run:
        lines += ["", "Not run here (every shape):"]
        for (m, st, why), cfg_set in sorted(not_run.items()):
            lines.append(f"- {m} ({', '.join(sorted(cfg_set))}): {st}: {why}")
    trackers = sorted({r["memory"]["tracker"] + f" ({r['method']})" for r in result["results"]
                       if r["status"] == "ok" and r["method"] == "torch.compile"}
                      | {r["memory"]["tracker"] for r in result["results"]
                         if r["status"] == "ok" and r["method"] != "torch.compile"})
    if trackers:
        lines += ["", "Peak memory measured with: " + ", ".join(trackers) + " (benchmarks/harness/memtrack.py)."]
    compiles = [f"{r['N']}/{r['dtype']}/{r['config']}: {r['first_call_s']:.1f} s" for r in result["results"]
                if r["status"] == "ok" and r["method"] == "torch.compile"]
    if compiles:
        lines += ["", "torch.compile first call (compile included, excluded from the times): " + "; ".join(compiles)]
    lc = result["loss_check"]
    lines += ["", f"Loss check (first repetition, every method vs eager, same config and shape): "
                  f"max |Δloss| = {lc['max_abs_diff']:.3e} over {lc['compared']} method rows."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, methods: tuple) -> Optional[str]:
    """Time and memory against N, a column per (V, dtype), to `path` (PNG); None, or why no plot was written.
    `methods`: every method name, in order (their colours do not change with the methods run)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install matplotlib (or the package's `bench` extra); no plot written"
    rows = [r for r in result["results"] if r["status"] == "ok"]
    vs = sorted({r["V"] for r in rows})
    dts = sorted({r["dtype"] for r in rows})
    if not vs:
        return "no successful rows to plot"
    cols = [(v, d) for v in vs for d in dts]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}  # one colour per method
    fig, axes = plt.subplots(2, len(cols), figsize=(5 * len(cols), 8), squeeze=False)
    for j, (v, d) in enumerate(cols):
        sel = [r for r in rows if r["V"] == v and r["dtype"] == d]
        for key in sorted({(r["config"], r["method"]) for r in sel}):
            pts = sorted((r["N"], r) for r in sel if (r["config"], r["method"]) == key)
            ns = [p[0] for p in pts]
            style = "-" if key[0] == "topd" else "--"  # solid: topd config, dashed: opd config
            label = f"{key[1]} ({key[0]})"
            kw = dict(marker="o", label=label, color=color.get(key[1]))
            axes[0][j].plot(ns, [p[1]["fwd_bwd"]["median_ms"] for p in pts], style, **kw)
            axes[1][j].plot(ns, [p[1]["memory"]["peak_step_bytes"] / MiB for p in pts], style, **kw)
        axes[0][j].set_title(f"V={v} {d}: fwd+bwd time")
        axes[0][j].set_ylabel("ms (median)")
        axes[1][j].set_title(f"V={v} {d}: peak memory above inputs")
        axes[1][j].set_ylabel("MiB")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("N (tokens)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fused_window_kl — {result['env']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
