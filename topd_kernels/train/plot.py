"""Accuracy-vs-step plot per method: matplotlib when installed (the `bench` extra), else a small PNG
drawn here (axes, gridlines at 0/0.25/.../1, a faint line per run and a thick one per method's mean
over seeds, a legend in a built-in 3x5 pixel font), so the demo needs no plotting dependency."""
from __future__ import annotations

from pathlib import Path
import struct
import zlib

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]

# 3x5 glyphs, rows top to bottom, '1' = ink.
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "a": "010101111101101", "c": "011100100100011", "d": "110101101101110",
    "e": "111100111100111", "f": "111100110100100", "i": "111010010010111", "l": "100100100100111",
    "o": "010101101101010", "p": "110101110100100", "r": "110101110101101", "s": "011100010001110",
    "t": "111010010010010", "y": "101101010010010", "u": "101101101101111", "x": "101101010101101",
    "n": "110101101101101", "m": "101111111101101", "g": "011100101101011", "h": "101101111101101",
}


def mean_curves(runs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per method, (step, accuracy averaged over its seeds) at the steps every seed evaluated."""
    curves = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        per_seed = [{e["step"]: e["accuracy"] for e in run["evals"]} for run in runs if run["method"] == method]
        steps = sorted(set.intersection(*(set(evals) for evals in per_seed)))
        curves[method] = [(step, sum(evals[step] for evals in per_seed) / len(per_seed)) for step in steps]
    return curves


def plot_accuracy(runs: list[dict], path: Path) -> str:
    """Write held-out accuracy vs step to `path`: a thin line per run (`run["evals"]`), a thick line per
    method for its mean over seeds. Returns a sentence saying what it wrote."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(path, render(runs))
        return f"plot: {path} (built-in renderer; install matplotlib, e.g. pip install -e '.[bench]', for a labelled plot)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(run["method"] for run in runs))
    for run in runs:
        colour = [c / 255 for c in COLOURS[methods.index(run["method"]) % len(COLOURS)]]
        steps = [e["step"] for e in run["evals"]]
        ax.plot(steps, [e["accuracy"] for e in run["evals"]], color=colour, alpha=0.3, linewidth=1)
    seeds = len({run["seed"] for run in runs})
    for method, curve in mean_curves(runs).items():
        colour = [c / 255 for c in COLOURS[methods.index(method) % len(COLOURS)]]
        ax.plot(*zip(*curve), color=colour, linewidth=2.5, label=f"{method} (mean of {seeds} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy, exact answer)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def render(runs: list[dict], width: int = 640, height: int = 400) -> list[bytearray]:
    """RGB rows (height x width*3) of the accuracy plot, drawn without any plotting library."""
    image = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    left, right, top, bottom = 40, width - 150, 20, height - 30
    max_step = max((e["step"] for run in runs for e in run["evals"]), default=1) or 1

    def to_xy(step: float, acc: float) -> tuple[int, int]:
        return (round(left + (right - left) * step / max_step), round(bottom - (bottom - top) * acc))

    def put(x: int, y: int, colour) -> None:
        if 0 <= x < width and 0 <= y < height:
            image[y][3 * x : 3 * x + 3] = bytes(colour)

    def line(p, q, colour, thick: int = 1) -> None:
        n = max(abs(q[0] - p[0]), abs(q[1] - p[1]), 1)
        for i in range(n + 1):
            x, y = p[0] + (q[0] - p[0]) * i / n, p[1] + (q[1] - p[1]) * i / n
            for dx in range(thick):
                for dy in range(thick):
                    put(round(x) + dx, round(y) + dy, colour)

    def text(x: int, y: int, s: str, colour=(0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(s.lower()):
            glyph = FONT.get(ch, FONT[" "])
            for r in range(5):
                for c in range(3):
                    if glyph[3 * r + c] == "1":
                        for dx in range(scale):
                            for dy in range(scale):
                                put(x + (4 * k + c) * scale + dx, y + r * scale + dy, colour)

    for tick in range(5):
        acc = tick / 4
        y = to_xy(0, acc)[1]
        line((left, y), (right, y), (225, 225, 225))
        text(4, y - 5, f"{acc:.2f}")
    line((left, top), (left, bottom), (0, 0, 0))
    line((left, bottom), (right, bottom), (0, 0, 0))
    text(left, bottom + 8, "0")
    text(right - 4 * 2 * len(str(max_step)), bottom + 8, str(max_step))
    text((left + right) // 2 - 16, bottom + 8, "step")
    methods = list(dict.fromkeys(run["method"] for run in runs))
    for run in runs:
        colour = COLOURS[methods.index(run["method"]) % len(COLOURS)]
        faded = tuple(255 - (255 - c) * 2 // 5 for c in colour)
        points = [to_xy(e["step"], e["accuracy"]) for e in run["evals"]]
        for p, q in zip(points, points[1:]):
            line(p, q, faded)
    for method, curve in mean_curves(runs).items():
        colour = COLOURS[methods.index(method) % len(COLOURS)]
        points = [to_xy(step, acc) for step, acc in curve]
        for p, q in zip(points, points[1:]):
            line(p, q, colour, thick=3)
    for i, method in enumerate(methods):
        colour = COLOURS[i % len(COLOURS)]
        y = top + 18 * i
        line((right + 10, y + 4), (right + 30, y + 4), colour, thick=3)
        text(right + 36, y, method)
    return image


def write_png(path: Path, rows: list[bytearray]) -> None:
    """Write 8-bit RGB rows as a PNG file (zlib-compressed, filter type 0 per row)."""
    height, width = len(rows), len(rows[0]) // 3

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
