#!/usr/bin/env python
"""Machine-code statistics of the row kernels for sm_90 (H100), measured on a CPU without a GPU.

    python benchmarks/kernel_stats.py --out benchmarks/results       # every variant (1-2 min on 2 cores)
    python benchmarks/kernel_stats.py --subset quick --no-cuda --out /tmp/ks   # what tests/test_kernel_stats.py runs

What is compiled
----------------
* Every Triton row kernel variant of `topd_kernels/rows/triton_rows.py`, ahead of time for
  GPUTarget("cuda", 90, 32) with Triton's bundled ptxas: the forward per divergence, the backward per
  divergence with and without the teacher gradient, the JSD mix kernel; input dtypes bf16/bf16 and
  fp32/fp16 (student/teacher); vocab_size 151936 (divisible by 16: the launcher passes the
  `tt.divisibility = 16` hint) and 151665 (a real tokenizer size, no hint) over rows padded to 151936
  columns. The argument specialisation is the one Triton's own launcher derives for these argument values
  (its binder runs on stand-in tensors: 16-byte aligned pointers, strides of (B, T, V) = (2, 8192, 151936)
  rows, unit strides of the mask / statistics / coef specialised to the constant 1), and BLOCK_V /
  num_warps come from `triton_rows._launch_options` as the row ops launch them on a GPU (no autotuning).
* The CUDA extension's backward kernels (`csrc/row_backward.cu`, every <student, teacher, divergence>
  template instance) with nvcc: `-O3 -std=c++17 -DNDEBUG -lineinfo -arch=sm_90 -cubin` (setup.py's flags
  for one architecture; -lineinfo only adds the line table); reported for the same dtype pairs.
SASS comes from `cuobjdump -sass`, registers / stack / local memory from `cuobjdump --dump-resource-usage`,
source lines from `nvdisasm -g` (Triton's bundled copies).

Method: instructions per element pair
-------------------------------------
The SASS of each kernel is split into basic blocks (leaders: branch targets and the instruction after a
branch or EXIT) and its control-flow graph is built (a predicated BRA has two successors, an unpredicated
one only its target). Loops are the natural loops of that graph: a back edge u -> h, where h dominates u,
closes a loop with header h -- the backward branch that closes the vocabulary loop. A *vocabulary loop* is
an outermost loop that contains a global load (LDG); each is named by the source line of its closing
branch (the cubin's line table, `nvdisasm -g`: the line of the `for`). A loop whose `for` line carries the
comment `# kernel_stats: rare` runs only for rare inputs (the forward's careful re-do of chunks that met
-inf or a non-finite logit): it is reported apart (`rare_loops`) and is not a main loop. The kernel's
*main loops* are its other vocabulary loops whose main path loads the most bytes (the JSD forward has two:
pass 1 and pass 2, each reading both rows; the CUDA kernel's 16-byte vector loop beats its scalar tail
loop; loops without loads -- zero-filling the padding columns -- are not vocabulary loops).

The *main path* of a loop is one cycle through its header, the instructions one iteration executes:
* Triton: the cheapest cycle (the fewest instructions, following the cheaper side of every branch inside
  the body). The Triton loops have no data-dependent branches inside (selects, not branches), so for them
  this is the whole body; any branch there would be a uniform one to a rare path.
* CUDA: the costliest cycle among those with the fewest (no teacher gradient) or the most (teacher
  gradient) global stores: the loop tests `if (gt)` at run time, and its per-element branches
  (logaddexp's both -inf test, log1pf's argument ranges) send an ordinary finite element down the longer
  side.
Predicated-off instructions still issue, so they are counted. Then

    instructions per pair = instructions on the main path / element pairs one thread handles per iteration

where one iteration of a Triton loop handles BLOCK_V columns per thread block of 32 * num_warps threads,
i.e. BLOCK_V / (32 * num_warps) pairs per thread (the forward: BLOCK_V = 4096 at 16 warps, 8; the
backward: 4096 at 8 warps, 16), cross-checked against the bytes the main path loads (pairs = bytes /
(student element size + teacher element size); a mismatch is reported in the `check` field). For the CUDA
vector loop the pairs come from those bytes (kVec = 8 per thread and iteration). A kernel with several main
loops (JSD forward) reports the sum: every pair passes through each. This is a per-thread count of issued
instructions (a warp issues the same number for 32 threads' worth of pairs): at 4 warp schedulers x 1
instruction/clock per SM, 132 SMs and ~1.75 GHz, an H100 issues ~0.9e12 warp instructions/s, so k
instructions per pair cost about N V k / 32 / 0.9e12 s (N = 16384, V = 151936, k = 20: ~1.7 ms against
~3.3 ms to read 4 N V bytes at ~3.0 TB/s). MUFU (ex2, lg2, rcp) runs at 16 lanes per clock per SM, a limit of
its own: m MUFU per pair take about N V m / 16 / (132 x 1.75e9) s (m = 2.25: ~1.5 ms).

Reported per main loop: instructions per iteration and per pair, the global loads and stores on the main
path by width (LDG.E.128 = 16 bytes, .64 = 8, none = 4, .U16 = 2, .U8 = 1), barriers (BAR) and shuffles
(SHFL) and MUFU (exp2 / log2 / reciprocal) per iteration, and the size of the whole loop (every branch
included). Per kernel: registers, spills (STACK bytes, LOCAL bytes and LDL/STL instructions), shared memory.

This is an ahead-of-time measurement on a CPU: it says what the GPU will be asked to execute, not how long
it takes (no clock was read).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TARGET = ("cuda", 90, 32)
# Rows of 151936 columns (a real padded vocabulary: Qwen2.5); vocab_size with and without the %16 hint.
WIDTH = 151936
VOCABS = {True: 151936, False: 151665}
BATCH, LENGTH = 2, 8192
DTYPE_PAIRS = (("bf16", "bf16"), ("fp32", "fp16"))
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_TYPES = {"fp32": "float", "bf16": "__nv_bfloat16", "fp16": "__half"}


# ---------------------------------------------------------------------------------------------------
# SASS: control-flow graph, natural loops, main path
# ---------------------------------------------------------------------------------------------------
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)


def parse_functions(sass: str) -> dict:
    """{mangled name: [(address, predicate or None, opcode, operands)]} from `cuobjdump -sass` output."""
    parts = _FUNC.split(sass)
    funcs = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        insns = []
        for addr, text in _LINE.findall(body):
            pred = None
            m = re.match(r"(@!?U?P\w+)\s+(.*)", text)
            if m:
                pred, text = m.group(1), m.group(2)
            op, _, operands = text.partition(" ")
            insns.append((int(addr, 16), pred, op, operands.strip()))
        funcs[name] = insns
    return funcs


def _never(pred: Optional[str]) -> bool:
    return pred in ("@!PT", "@!UPT")


def _always(pred: Optional[str]) -> bool:
    return pred is None or pred in ("@PT", "@UPT")


class CFG:
    """Basic blocks and edges of one SASS function."""

    def __init__(self, insns: list):
        self.insns = insns
        index = {a: i for i, (a, *_rest) in enumerate(insns)}
        leaders = {0}
        targets = {}
        for i, (addr, pred, op, operands) in enumerate(insns):
            base = op.split(".")[0]
            if base in ("BRA", "JMP") and not _never(pred):
                m = re.search(r"0x([0-9a-f]+)", operands)
                if m and int(m.group(1), 16) in index:
                    targets[i] = index[int(m.group(1), 16)]
                    leaders.add(targets[i])
                leaders.add(i + 1)
            elif base in ("EXIT", "RET", "BRX", "JMX", "KILL"):
                leaders.add(i + 1)
        starts = sorted(x for x in leaders if x < len(insns))
        self.blocks = [(s, e) for s, e in zip(starts, starts[1:] + [len(insns)])]  # [start, end) insn indices
        block_of = {s: b for b, (s, _e) in enumerate(self.blocks)}
        self.succ = [[] for _ in self.blocks]
        for b, (s, e) in enumerate(self.blocks):
            addr, pred, op, operands = insns[e - 1]
            base = op.split(".")[0]
            falls = True
            if e - 1 in targets:
                self.succ[b].append(block_of[targets[e - 1]])
                falls = not _always(pred)
            elif base in ("BRA", "JMP") and not _never(pred):  # target outside the function: give up on it
                falls = not _always(pred)
            elif base in ("EXIT", "RET", "KILL", "BRX", "JMX"):
                falls = not _always(pred) and base in ("EXIT", "RET", "KILL")
            if falls and b + 1 < len(self.blocks):
                self.succ[b].append(b + 1)
        self.pred = [[] for _ in self.blocks]
        for b, ss in enumerate(self.succ):
            for s in ss:
                self.pred[s].append(b)
        self.dom = self._dominators()

    def size(self, b: int) -> int:
        s, e = self.blocks[b]
        return e - s

    def ops(self, b: int):
        s, e = self.blocks[b]
        return self.insns[s:e]

    def _dominators(self) -> list:
        n = len(self.blocks)
        reach = {0}
        stack = [0]
        while stack:
            for s in self.succ[stack.pop()]:
                if s not in reach:
                    reach.add(s)
                    stack.append(s)
        dom = [set(reach) if b in reach else {b} for b in range(n)]
        dom[0] = {0}
        changed = True
        while changed:
            changed = False
            for b in sorted(reach - {0}):
                preds = [dom[p] for p in self.pred[b] if p in reach]
                new = set.intersection(*preds) | {b} if preds else {b}
                if new != dom[b]:
                    dom[b], changed = new, True
        return dom

    def loops(self) -> list:
        """Natural loops, merged per header: [{"header", "body" (set of blocks), "latches"}]."""
        found = {}
        for u, ss in enumerate(self.succ):
            for h in ss:
                if h in self.dom[u]:  # back edge u -> h
                    loop = found.setdefault(h, {"header": h, "body": {h}, "latches": set()})
                    loop["latches"].add(u)
                    stack = [u]
                    while stack:
                        x = stack.pop()
                        if x not in loop["body"]:
                            loop["body"].add(x)
                            stack.extend(self.pred[x])
        loops = sorted(found.values(), key=lambda lp: self.blocks[lp["header"]][0])
        for lp in loops:
            lp["outermost"] = not any(o is not lp and lp["header"] in o["body"] and lp["body"] < o["body"]
                                      for o in loops)
        return loops

    def cycle(self, loop: dict, cheapest: bool = True, stores: Optional[str] = None) -> list:
        """Blocks of the cheapest (or the most expensive) path header -> ... -> latch -> header that takes no
        back edge; `stores` "min" / "max": only among the paths with the fewest / most STG instructions."""
        body, h = loop["body"], loop["header"]
        inner_headers = {x for x in body if x != h and any(p in body and x in self.dom[p] for p in self.pred[x])}

        def forward(x):  # edges of the body without back edges (of this loop and of inner loops): a DAG
            return [s for s in self.succ[x] if s in body and s != h and not (s in inner_headers and s in self.dom[x])]

        order, seen, stack = [], {h}, [(h, iter(forward(h)))]  # post-order of the DAG (iterative DFS)
        while stack:
            x, it = stack[-1]
            nxt = next((s for s in it if s not in seen), None)
            if nxt is None:
                order.append(x)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(forward(nxt))))
        n_stg = lambda b: sum(1 for _a, _p, op, _o in self.ops(b) if op.startswith("STG"))
        better = (lambda a, b: a < b) if cheapest else (lambda a, b: a > b)
        # best[(block, stores so far)] = (instructions so far, previous state)
        best = {(h, n_stg(h)): (self.size(h), None)}
        for x in reversed(order):  # topological order
            for state in [st for st in best if st[0] == x]:
                cost = best[state][0]
                for s in forward(x):
                    nxt = (s, state[1] + n_stg(s))
                    if nxt not in best or better(cost + self.size(s), best[nxt][0]):
                        best[nxt] = (cost + self.size(s), state)
        ends = [st for st in best if st[0] in loop["latches"]]
        if stores is not None:
            want = (min if stores == "min" else max)(st[1] for st in ends)
            ends = [st for st in ends if st[1] == want]
        state = (min if cheapest else max)(ends, key=lambda st: best[st][0])
        path = []
        while state is not None:
            path.append(state[0])
            state = best[state][1]
        return path[::-1]


def access_width(op: str) -> int:
    """Bytes of one LDG / STG (per thread)."""
    mods = op.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def path_stats(cfg: CFG, path: list) -> dict:
    insns = [i for b in path for i in cfg.ops(b)]
    loads, stores = {}, {}
    for _a, _p, op, _o in insns:
        base = op.split(".")[0]
        if base == "LDG":
            loads[access_width(op)] = loads.get(access_width(op), 0) + 1
        elif base == "STG":
            stores[access_width(op)] = stores.get(access_width(op), 0) + 1
    count = lambda name: sum(1 for _a, _p, op, _o in insns if op.split(".")[0] == name)
    return {
        "instructions": len(insns),
        "loads": {str(k): v for k, v in sorted(loads.items(), reverse=True)},  # bytes per access -> count
        "stores": {str(k): v for k, v in sorted(stores.items(), reverse=True)},
        "load_bytes": sum(k * v for k, v in loads.items()),
        "store_bytes": sum(k * v for k, v in stores.items()),
        "bar": count("BAR"),
        "shfl": count("SHFL"),
        "mufu": count("MUFU"),
    }


def analyze_function(insns: list, pair_bytes: int, pairs_per_thread: Optional[int], cheapest: bool = True,
                     stores: Optional[str] = None, lines: Optional[dict] = None) -> dict:
    """Main loops and their statistics (see the module docstring). The main path of a loop: the cheapest
    cycle (`cheapest`) or the most expensive one, among those with the fewest / most stores (`stores`).
    `lines`: {address: (file, line)}, to name each loop by the source line of its closing branch."""
    cfg = CFG(insns)
    vocab, rare = [], []
    for lp in cfg.loops():
        if not lp["outermost"] or not any(op.startswith("LDG") for b in lp["body"] for _a, _p, op, _o in cfg.ops(b)):
            continue
        stats = path_stats(cfg, cfg.cycle(lp, cheapest=cheapest, stores=stores))
        closing = max(cfg.blocks[u][1] - 1 for u in lp["latches"])  # the backward branch that closes the loop
        stats["source"], is_rare = _source((lines or {}).get(cfg.insns[closing][0]))
        stats["address"] = f"{cfg.insns[cfg.blocks[lp['header']][0]][0]:#06x}"
        stats["whole_loop_instructions"] = sum(cfg.size(b) for b in lp["body"])
        stats["cheapest_path_instructions"] = path_stats(cfg, cfg.cycle(lp, cheapest=True))["instructions"]
        stats["costliest_path_instructions"] = path_stats(cfg, cfg.cycle(lp, cheapest=False))["instructions"]
        stats["branches_in_loop"] = stats["cheapest_path_instructions"] != stats["whole_loop_instructions"]
        (rare if is_rare else vocab).append(stats)
    rare_loops = [{k: s[k] for k in ("source", "instructions", "loads", "bar", "shfl", "mufu")} for s in rare]
    for r, s in zip(rare_loops, rare):
        r["instructions_per_pair"] = round(s["instructions"] / (pairs_per_thread or s["load_bytes"] / pair_bytes), 2)
    spill_ops = sum(1 for _a, _p, op, _o in insns if op.split(".")[0] in ("LDL", "STL"))
    most = max((s["load_bytes"] for s in vocab), default=0)
    main = [s for s in vocab if s["load_bytes"] == most]
    for s in main:
        by_bytes = s["load_bytes"] / pair_bytes
        per_thread = pairs_per_thread if pairs_per_thread is not None else by_bytes
        s["pairs_per_thread"] = int(per_thread) if float(per_thread).is_integer() else per_thread
        s["instructions_per_pair"] = round(s["instructions"] / per_thread, 2)
        s["check"] = "ok" if by_bytes == per_thread else f"loads {s['load_bytes']} B = {by_bytes} pairs per thread"
    return {"main": main, "vocabulary_loops": len(vocab), "rare_loops": rare_loops, "local_memory_instructions": spill_ops,
            "instructions_per_pair": round(sum(s["instructions"] / s["pairs_per_thread"] for s in main), 2)}


def line_info(nvdisasm: str, cubin: str) -> dict:
    """{function: {address: (source file, line)}} from `nvdisasm -g` (the cubin's line table)."""
    out = subprocess.run([nvdisasm, "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
    found, func, where = {}, None, None
    for text in out.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", text) or re.match(r"//-+ \.text\.(\S+) -+", text.strip())
        if m:
            func = found.setdefault(m.group(1), {})
            continue
        m = re.search(r'//## File "(.*?)", line (\d+)', text)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/", text)
        if m and func is not None and where is not None:
            func[int(m.group(1), 16)] = where
    return found


RARE = "kernel_stats: rare"  # on the `for` line of a loop only rare inputs run (see the docstring)


def _source(where) -> tuple:
    """("file.py:123", whether that source line carries the RARE marker)."""
    if not where:
        return None, False
    path, line = where
    try:
        text = Path(path).read_text().splitlines()[line - 1]
    except (OSError, IndexError):
        text = ""
    return f"{Path(path).name}:{line}", RARE in text


def resources(cuobjdump: str, cubin: str) -> dict:
    """{mangled name: {"REG", "STACK", "SHARED", "LOCAL"}} from cuobjdump --dump-resource-usage."""
    out = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for name, line in re.findall(r"Function (\S+):\s*\n\s*(.*)", out):
        found[name] = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return found


# ---------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------
def triton_tools() -> dict:
    """Paths of Triton's bundled ptxas / cuobjdump / nvdisasm (None where absent)."""
    names = ("ptxas", "cuobjdump", "nvdisasm")
    try:
        import triton
    except ImportError:
        return dict.fromkeys(names)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return {t: (str(bin_dir / t) if (bin_dir / t).exists() else None) for t in names}


def find_nvcc() -> Optional[str]:
    for cand in (os.environ.get("TOPD_NVCC"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _tool_version(argv) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return None
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else (out.strip().splitlines() or [None])[-1]


def _git(*argv) -> Optional[str]:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip()
    except Exception:
        return None


def header(tools: dict, nvcc: Optional[str]) -> dict:
    import torch
    import triton
    return {
        "measurement": "CPU, ahead of time: SASS compiled for sm_90 (GPUTarget('cuda', 90, 32)) and read; no GPU, no clock",
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton": triton.__version__,
        "ptxas": _tool_version([tools["ptxas"], "--version"]) if tools["ptxas"] else None,
        "nvcc": _tool_version([nvcc, "--version"]) if nvcc else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION"),
        "rows": f"(B, T, V) = ({BATCH}, {LENGTH}, {WIDTH}); vocab_size {VOCABS[True]} (%16 == 0) or {VOCABS[False]}",
        "command": " ".join(["kernel_stats.py"] + sys.argv[1:]),
    }


# ---------------------------------------------------------------------------------------------------
# Triton variants
# ---------------------------------------------------------------------------------------------------
def triton_variants(subset: str) -> list:
    out = []
    for ds, dt in DTYPE_PAIRS:
        for hint in (True, False):
            for div in DIVERGENCES:
                out.append(dict(kernel="forward", divergence=div, dtypes=(ds, dt), hint16=hint))
            for div in DIVERGENCES:
                for gt in (True, False):
                    out.append(dict(kernel="backward", divergence=div, dtypes=(ds, dt), hint16=hint, teacher_grad=gt))
            out.append(dict(kernel="mix", divergence="jsd", dtypes=(ds, dt), hint16=hint))
    if subset == "quick":  # bf16/bf16: every kernel with the hint, the forward without it
        out = [v for v in out if v["dtypes"] == ("bf16", "bf16") and (v["hint16"] or v["kernel"] == "forward")]
    return out


def _triton_args(kernel_name: str, ds: str, dt: str, vocab_size: int) -> dict:
    import torch
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    s, t = torch.empty(16, dtype=tdt[ds]), torch.empty(16, dtype=tdt[dt])
    f32, u8 = torch.empty(16), torch.empty(16, dtype=torch.uint8)
    n = BATCH * LENGTH
    rows = dict(stride_student_b=LENGTH * WIDTH, stride_student_t=WIDTH, stride_teacher_b=LENGTH * WIDTH,
                stride_teacher_t=WIDTH, length=LENGTH)
    scal = dict(inv_temperature=1.0, beta=0.5, log_one_minus_beta=-0.69, log_beta=-0.69, vocab_size=vocab_size)
    if kernel_name == "forward":
        return dict(p_student=s, p_teacher=t, p_mask=u8, p_stats=f32, **rows, stride_mask=1, stride_stats_k=n,
                    stride_stats_n=1, **scal)
    if kernel_name == "mix":
        return dict(p_student=s, p_teacher=t, p_mask=u8, p_stats=f32, p_mix=f32, **rows, stride_mask=1,
                    stride_stats_k=n, stride_stats_n=1, stride_mix_k=n, stride_mix_n=1, **scal)
    return dict(p_student=s, p_teacher=t, p_stats=f32, p_coef=f32, p_grad_student=s, p_grad_teacher=t, **rows,
                stride_gs_b=LENGTH * WIDTH, stride_gs_t=WIDTH, stride_gt_b=LENGTH * WIDTH, stride_gt_t=WIDTH,
                stride_stats_k=n, stride_stats_n=1, stride_coef=1, width_student=WIDTH, width_teacher=WIDTH, **scal)


def compile_triton(v: dict, tmp: str, tools: dict) -> dict:
    """Compile one variant for sm_90 with the launcher's specialisation; returns its statistics."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from topd_kernels.config import DIVERGENCE_CODES
    from topd_kernels.rows import triton_rows as tr

    fn = {"forward": tr._row_forward_kernel, "backward": tr._row_backward_kernel, "mix": tr._row_mix_kernel}[v["kernel"]]
    vocab_size = VOCABS[v["hint16"]]
    launch = tr._launch_options(fn, vocab_size)  # as row_forward / row_backward / row_mix launch it
    block, warps = launch["BLOCK_V"], launch["num_warps"]
    const = {"BLOCK_V": block}
    if "DIVERGENCE" in fn.arg_names:
        const["DIVERGENCE"] = DIVERGENCE_CODES[v["divergence"]]
    if "HAS_GRAD_TEACHER" in fn.arg_names:
        const["HAS_GRAD_TEACHER"] = v["teacher_grad"]
    if "SOFT_BF16" in fn.arg_names:
        const["SOFT_BF16"] = False  # the GPU path (the hand rounding is for the interpreter)
    backend = make_backend(GPUTarget(*TARGET))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    launch = {"num_warps": warps}
    bound, spec, opts = binder(**_triton_args(v["kernel"], *v["dtypes"], vocab_size), **const, **launch)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch, bound, spec, opts)
    start = time.time()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGET), options=options.__dict__)
    path = os.path.join(tmp, f"triton_{os.getpid()}_{time.monotonic_ns()}.cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([tools["cuobjdump"], "-sass", path], capture_output=True, text=True, check=True).stdout
    funcs = parse_functions(sass)
    (name, insns), = funcs.items()
    res = resources(tools["cuobjdump"], path)[name]
    lines = line_info(tools["nvdisasm"], path).get(name, {}) if tools["nvdisasm"] else {}
    ds, dt = v["dtypes"]
    threads = 32 * warps
    result = dict(backend="triton", **{k2: (list(x) if isinstance(x, tuple) else x) for k2, x in v.items()},
                  vocab_size=vocab_size, hint16_applied=any(a == (fn.arg_names.index("vocab_size"),) and attrs[a]
                                                           for a in attrs),
                  BLOCK_V=block, num_warps=warps, registers=res.get("REG"), stack=res.get("STACK", 0),
                  local=res.get("LOCAL", 0), shared=res.get("SHARED", 0), compile_s=round(time.time() - start, 2))
    result.update(analyze_function(insns, ELEM_BYTES[ds] + ELEM_BYTES[dt], block // threads, lines=lines))
    return result


# ---------------------------------------------------------------------------------------------------
# CUDA extension
# ---------------------------------------------------------------------------------------------------
def start_nvcc(nvcc: str, tmp: str):
    cubin = os.path.join(tmp, "row_backward.cubin")
    cmd = [nvcc, "-O3", "-std=c++17", "-DNDEBUG", "-lineinfo", f"-I{REPO / 'csrc'}", "-arch=sm_90", "-cubin",
           str(REPO / "csrc" / "row_backward.cu"), "-o", cubin]
    return cubin, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cuda_stats(cubin: str, tools: dict, pairs: list) -> list:
    from topd_kernels.config import DIVERGENCE_CODES
    sass = subprocess.run([tools["cuobjdump"], "-sass", cubin], capture_output=True, text=True, check=True).stdout
    funcs = parse_functions(sass)
    res = resources(tools["cuobjdump"], cubin)
    lines = line_info(tools["nvdisasm"], cubin) if tools["nvdisasm"] else {}
    # Itanium mangling of row_backward_kernel<TS, TT, DIV>: template args as in the source.
    mangled = {"float": "f", "__nv_bfloat16": "13__nv_bfloat16", "__half": "6__half"}
    out = []
    for ds, dt in pairs:
        for div in DIVERGENCES:
            div_code = DIVERGENCE_CODES[div]
            ms, mt = mangled[CUDA_TYPES[ds]], mangled[CUDA_TYPES[dt]]
            mt = "S2_" if ds == dt else mt  # the second use of the same type is a substitution
            pattern = f"row_backward_kernelI{ms}{mt}Li{div_code}EEEv"
            names = [n for n in funcs if pattern in n]
            if len(names) != 1:
                raise RuntimeError(f"CUDA kernel {pattern}: found {names}")
            r = res.get(names[0], {})
            for gt in (True, False):
                entry = dict(backend="cuda", kernel="backward", divergence=div, dtypes=[ds, dt], hint16=None,
                             teacher_grad=gt, BLOCK_V=None, num_warps=8, registers=r.get("REG"),
                             stack=r.get("STACK", 0), local=r.get("LOCAL", 0), shared=r.get("SHARED", 0))
                entry.update(analyze_function(funcs[names[0]], ELEM_BYTES[ds] + ELEM_BYTES[dt], None, cheapest=False,
                                              stores="max" if gt else "min", lines=lines.get(names[0], {})))
                out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def _widths(d: dict) -> str:
    return " ".join(f"{v}x{k}B" for k, v in d.items()) or "-"


def markdown(result: dict) -> str:
    h = result["header"]
    lines = [
        "### Row kernels in SASS for sm_90 — instructions per element pair, registers, access widths",
        "",
        f"**{h['measurement']}.** triton {h['triton']}, ptxas {h['ptxas']} (Triton's bundled), "
        f"nvcc {h['nvcc'] or 'absent'}, torch {h['torch']}, commit {(h['git_commit'] or '?')[:12]}"
        f"{' (dirty)' if h['git_dirty'] else ''}, {h['timestamp_utc']}. Rows {h['rows']}.",
        *([f"", f"{h['note']}"] if h.get("note") else []),
        "",
        "instr/pair: SASS instructions on the main path through one iteration of the main vocabulary loop "
        "(Triton: the cheapest cycle, the whole body of these branch-free loops; CUDA: the costliest cycle "
        "with / without the teacher's stores) / element pairs one thread handles per iteration (Triton: "
        "BLOCK_V / (32 num_warps); CUDA: the 8-element vector loop); JSD forward: pass 1 + pass 2. loads / stores: global accesses per iteration and thread on that path, count x bytes. BAR, "
        "SHFL, MUFU: per iteration. loop: instructions of the whole loop body, every branch included. rare loop: "
        "loops only rare inputs run (`# kernel_stats: rare` on their `for` line: the forward's careful re-do of "
        "chunks that met -inf), not in instr/pair. Main loops by source line in the JSON (`source`). "
        "Method: `benchmarks/kernel_stats.py` docstring.",
        "",
        "| backend | kernel | divergence | dtypes s/t | V%16 hint | teacher grad | BLOCK_V / warps | instr/iter | "
        "pairs/thread | **instr/pair** | regs | spills | loads | stores | BAR | SHFL | MUFU | loop | rare loop instr/pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in result["kernels"]:
        main = k["main"]
        spill = k["stack"] + k["local"] + k.get("local_memory_instructions", 0)
        spill_txt = "none" if spill == 0 else f"STACK {k['stack']} LOCAL {k['local']} LDL/STL {k['local_memory_instructions']}"
        join = lambda f: " + ".join(str(f(s)) for s in main) or "-"
        hint = "-" if k["hint16"] is None else ("yes" if k["hint16"] else "no")
        gt = {True: "yes", False: "no"}.get(k.get("teacher_grad"), k.get("teacher_grad") or "-")
        launch = f"{k['BLOCK_V']} / {k['num_warps']}" if k["BLOCK_V"] else f"8/thread / {k['num_warps']}"
        lines.append(
            f"| {k['backend']} | {k['kernel']} | {k['divergence']} | {'/'.join(k['dtypes'])} | {hint} | {gt} | {launch} | "
            f"{join(lambda s: s['instructions'])} | {join(lambda s: s['pairs_per_thread'])} | "
            f"**{k.get('instructions_per_pair', '-')}** | {k['registers']} | {spill_txt} | "
            f"{join(lambda s: _widths(s['loads']))} | {join(lambda s: _widths(s['stores']))} | "
            f"{join(lambda s: s['bar'])} | {join(lambda s: s['shfl'])} | {join(lambda s: s['mufu'])} | "
            f"{join(lambda s: s['whole_loop_instructions'])} | "
            f"{' + '.join(str(r['instructions_per_pair']) for r in k.get('rare_loops', [])) or '-'} |")
    notes = [k for k in result["kernels"] for s in k["main"] if s["check"] != "ok"]
    if notes:
        lines += ["", "Checks that did not match (pairs per thread vs bytes loaded):"]
        lines += [f"- {k['backend']} {k['kernel']} {k['divergence']} {'/'.join(k['dtypes'])}: "
                  + "; ".join(s["check"] for s in k["main"]) for k in notes]
    if result.get("cuda_note"):
        lines += ["", result["cuda_note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for kernel_stats.{json,md}")
    parser.add_argument("--name", default="kernel_stats", help="file stem of the results")
    parser.add_argument("--subset", choices=("all", "quick"), default="all",
                        help="quick: bf16/bf16, every kernel with the vocab_size %% 16 hint, the forward without it")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension (nvcc)")
    parser.add_argument("--note", default=None, help="a sentence for the header (what this run measures)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel Triton compilations")
    args = parser.parse_args(argv)

    tools = triton_tools()
    if not all(tools.values()):
        print(f"kernel_stats: Triton's bundled NVIDIA tools not found: {tools}", file=sys.stderr)
        return 2
    nvcc = None if args.no_cuda else find_nvcc()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        job = start_nvcc(nvcc, tmp) if nvcc else None  # nvcc compiles while Triton does
        variants = triton_variants(args.subset)
        jobs = max(1, min(args.jobs, len(variants)))
        if jobs > 1:  # forked workers, the kernels' modules imported once here; results in the order of `variants`
            import multiprocessing

            import topd_kernels.rows.triton_rows  # noqa: F401
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                kernels = pool.starmap(compile_triton, [(v, tmp, tools) for v in variants])
        else:
            kernels = [compile_triton(v, tmp, tools) for v in variants]
        cuda_note = None
        if job:
            cubin, cmd, proc = job
            log = proc.communicate()[0]
            if proc.returncode == 0:
                kernels += cuda_stats(cubin, tools, list(DTYPE_PAIRS))
                cuda_note = ("CUDA rows: `nvcc -O3 -std=c++17 -DNDEBUG -lineinfo -arch=sm_90 -cubin csrc/row_backward.cu`, one "
                             "kernel per dtype pair and divergence whether or not the teacher gradient is wanted (a "
                             "runtime `if (gt)` in the loop): its two rows are the costliest path through the vector "
                             "loop with and without the teacher's stores (an ordinary finite element takes the longer "
                             "side of the per-element branches).")
            else:
                cuda_note = f"CUDA: nvcc failed: {log[-2000:]}"
        elif not args.no_cuda:
            cuda_note = "CUDA: nvcc not found; the extension's kernels are not in this table."
    head = header(tools, nvcc)
    if args.note:
        head["note"] = args.note
    result = {"header": head, "seconds": round(time.time() - start, 1), "kernels": kernels, "cuda_note": cuda_note}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / (args.name + '.json')} and .md in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):  # the kernels must be real JIT functions: re-run without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    sys.exit(main())
