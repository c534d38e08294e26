"""Structural facts of the row kernels' machine code for sm_90, checked on a machine without a GPU.

Runs `benchmarks/kernel_stats.py --subset quick --no-cuda` (Triton's ahead-of-time compilation for
GPUTarget("cuda", 90, 32) with its bundled ptxas, SASS read with its bundled cuobjdump / nvdisasm) in a
subprocess without TRITON_INTERPRET (the test session interprets the kernels), and asserts, for every
variant compiled (bf16/bf16: forward, backward with and without the teacher gradient and mix with
vocab_size % 16 == 0, and the forward without the hint; the full run also covers fp32/fp16 inputs):
- no register spills (no stack frame, no local memory, no LDL/STL instruction);
- every kernel has a main vocabulary loop, found as the loop closed by a backward branch in the SASS;
- 16-byte global loads (LDG.E.128) and nothing narrower in the main loops of the forward and the backward
  for bf16 inputs when vocab_size % 16 == 0, and in the forward's main loop also without the hint (its fast
  path reads full blocks unmasked).
The instruction counts themselves are reported by the script (benchmarks/results/kernel_stats.md), not
asserted here. Skipped only where this Triton has no bundled NVIDIA tools.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bundled_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / tool).exists() for tool in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.fixture(scope="module")
def kernel_stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_stats")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_stats.py"), "--subset", "quick", "--no-cuda",
         "--out", str(out), "--name", "quick"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "quick.json").read_text())


def _name(k: dict) -> str:
    return (f"{k['backend']} {k['kernel']} {k['divergence']} {'/'.join(k['dtypes'])} hint16={k['hint16']} "
            f"teacher_grad={k.get('teacher_grad')}")


pytestmark = pytest.mark.skipif(not _bundled_tools(), reason="this Triton has no bundled ptxas / cuobjdump / nvdisasm")


def test_subset_compiled(kernel_stats):
    kinds = {(k["kernel"], k["divergence"], tuple(k["dtypes"]), k["hint16"], k.get("teacher_grad"))
             for k in kernel_stats["kernels"]}
    for div in ("reverse_kl", "forward_kl", "jsd"):
        assert ("forward", div, ("bf16", "bf16"), True, None) in kinds
        assert ("forward", div, ("bf16", "bf16"), False, None) in kinds
        for gt in (True, False):
            assert ("backward", div, ("bf16", "bf16"), True, gt) in kinds
    assert ("mix", "jsd", ("bf16", "bf16"), True, None) in kinds
    for k in kernel_stats["kernels"]:
        assert k["hint16_applied"] == k["hint16"], _name(k)  # the launcher's specialisation was reproduced


def test_no_spills(kernel_stats):
    for k in kernel_stats["kernels"]:
        assert k["stack"] == 0 and k["local"] == 0 and k["local_memory_instructions"] == 0, \
            f"register spills in {_name(k)}: STACK {k['stack']} LOCAL {k['local']} LDL/STL {k['local_memory_instructions']}"
        assert 0 < k["registers"] <= 255, _name(k)


def test_main_loops_found(kernel_stats):
    for k in kernel_stats["kernels"]:
        expected = 2 if (k["kernel"], k["divergence"]) == ("forward", "jsd") else 1  # JSD forward: passes 1 and 2
        assert len(k["main"]) == expected, f"{_name(k)}: main loops {[m['source'] for m in k['main']]}"
        for m in k["main"]:
            assert m["check"] == "ok", f"{_name(k)}: {m['check']}"
            assert m["instructions_per_pair"] > 0, _name(k)


def test_16_byte_loads_on_the_main_path(kernel_stats):
    checked = 0
    for k in kernel_stats["kernels"]:
        if k["dtypes"] != ["bf16", "bf16"] or k["kernel"] not in ("forward", "backward"):
            continue
        if k["hint16"]:
            loops = k["main"]
        elif k["kernel"] == "forward":
            # the fast pass (first main loop); JSD's pass 2 (_jsd_mix_pass, masked) needs the hint for 16 bytes
            loops = k["main"][:1]
        else:
            continue
        for m in loops:
            assert set(m["loads"]) == {"16"}, f"{_name(k)}: loads {m['loads']} (bytes: count) in {m['source']}"
        checked += 1
    assert checked == 12, checked  # forward with and without the hint, backward with and without teacher grad
