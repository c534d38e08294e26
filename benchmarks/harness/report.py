"""The report of a bench_kl result: the markdown table (`markdown`, with the top-k teacher against the full
logits: `topk_table`) and the plot (`plot`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

MiB = 1024 ** 2


def _fmt_t(r: dict) -> str:
    return f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"


def _opt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def teacher_label(r: dict) -> str:
    """A row's teacher side in words: "logits" or "top-K"."""
    form = r.get("teacher") or {"form": "logits"}
    return f"top-{form['k']}" if form["form"] == "topk" else "logits"


def topk_table(result: dict) -> list:
    """Markdown lines: per shape with top-k rows, the top-k teacher (fused, and the PyTorch baseline) against
    the full logits (the opd rows: the same loss knobs and student on the teacher's logits). Empty without
    top-k rows."""
    ok = [r for r in result["results"] if r["status"] == "ok"]
    shapes = sorted({(r["N"], r["V"], r["dtype"]) for r in ok if teacher_label(r) != "logits"})
    if not shapes:
        return []
    auto = (result["methods"].get("topd[auto]") or {}).get("backend")
    lines = [
        "", "#### Top-k teacher against full logits",
        "",
        "The same student and loss (mean reverse KL over valid tokens); the teacher as its logits (the opd rows) "
        "or as its top-k log-probabilities with the tail bucket (int32 ids + float32 log-probabilities: k × 8 "
        "bytes per token). topd[...]: fused_window_kl; eager: PyTorch (logits: baselines.eager_window_kl; top-k: "
        "baselines.topk_tail_kl, the frameworks' top-k + tail loss). ×fused full: fwd+bwd time of the fused "
        "full-logits path (" + (f"topd[{auto}]" if auto else "the first topd method") + ", opd rows) / this time; "
        "mem×: this peak / its peak. The loss of a top-k teacher is smaller than the full one (a coarser "
        "partition of the vocabulary).",
        "",
        "| N | V | dtype | teacher | method | teacher B/token | fwd+bwd ms | peak MiB | ×fused full | mem× | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, v, dtype in shapes:
        sel = [r for r in ok if (r["N"], r["V"], r["dtype"]) == (n, v, dtype)
               and (r["config"] == "opd" or teacher_label(r) != "logits")]
        full = [r for r in sel if r["config"] == "opd" and r["method"].startswith("topd[")]
        ref = next((r for r in full if r["method"] == f"topd[{auto}]"), full[0] if full else None)
        for r in sorted(sel, key=lambda r: (teacher_label(r) != "logits", r.get("teacher", {}).get("k", 0),
                                            not r["method"].startswith("topd["), r["method"])):
            speed = mem = None
            if ref is not None:
                speed = ref["fwd_bwd"]["median_ms"] / r["fwd_bwd"]["median_ms"]
                ref_mem = ref["memory"]["peak_step_bytes"]
                mem = r["memory"]["peak_step_bytes"] / ref_mem if ref_mem else None
            lines.append(
                f"| {n} | {v} | {dtype} | {teacher_label(r)} | {r['method']} | {r['teacher_bytes_per_token']} | "
                f"{_fmt_t(r['fwd_bwd'])} | {r['memory']['peak_step_bytes'] / MiB:.1f} | {_opt(speed, '.2f')} | "
                f"{_opt(mem, '.3f')} | {r['loss']:.6f} |")
    if not any(r["config"] == "opd" for r in ok):
        lines += ["", "(No opd rows in this run: run the opd configuration too for the full-logits rows.)"]
    return lines


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
           f"on {env['cpu_count']} cores." if env.get("loadavg_start") and env.get("loadavg_end") else "")
        + (f" torch threads: {env['torch_threads']}." if env.get("torch_threads") else ""),
        "",
        "Times in ms: median (p20–p80). Peak: memory above the inputs during fwd+bwd, the gradient included. "
        "Teacher: its logits, or its top-k (topk<K> configurations: int32 ids + float32 log-probabilities, tail "
        "bucket); B/token: the bytes the teacher side costs per token. "
        "GB/s: minimal traffic of fwd+bwd (read the student and the teacher side twice, write the gradient) / "
        "median time. ×eager: eager time / this time (top-k: eager is the frameworks' PyTorch top-k + tail loss); "
        "mem×: this peak / eager peak. Δloss: |loss − eager's loss| (where eager "
        "did not run: − the loss of the first method that did).",
        "",
        "| N | V | dtype | loss | teacher | B/token | method | fwd ms | bwd ms | fwd+bwd ms | peak MiB | "
        "×eager fwd+bwd | mem× | GB/s (% copy) | Δloss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    not_run = {}
    for r in result["results"]:
        if r["status"] in ("n/a", "alias"):
            # unusable here for every shape: listed once below the table, with the reason
            not_run.setdefault((r["method"], r["status"], r.get("reason", "")), set()).add(r["config"])
            continue
        head = (f"| {r['N']} | {r['V']} | {r['dtype']} | {r['config']} | {teacher_label(r)} | "
                f"{r.get('teacher_bytes_per_token', '')} | {r['method']} |")
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
    lines += topk_table(result)
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
            # solid: topd config, dashed: opd config, dotted: a top-k teacher
            style = {"topd": "-", "opd": "--"}.get(key[0], ":")
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
