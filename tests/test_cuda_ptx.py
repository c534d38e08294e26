"""The CUDA kernel's generated code (no GPU needed): every instantiation uses 16-byte loads and stores on its
aligned path and no local memory. Compiles csrc/row_backward.cu for sm_90 with nvcc once (about 10 s), keeping
the PTX, and prints the cubin's SASS with cuobjdump.
Skipped only when TOPD_CUDA_BUILD=0 is set or nvcc is absent, like the host-build tests; the SASS test
also when no cuobjdump is found (next to nvcc, on PATH, or in triton's bundle)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from cuda_helpers import extension_skip_reason, nvcc_path

pytestmark = pytest.mark.skipif(extension_skip_reason() is not None, reason=str(extension_skip_reason()))

CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")
N_KERNELS = 27   # 3 student dtypes x 3 teacher dtypes x 3 divergences
_ITANIUM_TYPES = {"f": 4, "13__nv_bfloat16": 2, "6__half": 2}   # mangled logit type -> bytes


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(PTX text, cubin path): one nvcc run for sm_90 that keeps its intermediate PTX."""
    out = tmp_path_factory.mktemp("nvcc")
    proc = subprocess.run([nvcc_path(), "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-keep", "-keep-dir", str(out),
                           "-I", CSRC, os.path.join(CSRC, "row_backward.cu"), "-o", str(out / "row_backward.cubin")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return (out / "row_backward.ptx").read_text(), out / "row_backward.cubin"


@pytest.fixture(scope="module")
def ptx(compiled):
    return compiled[0]


def _cuobjdump() -> str | None:
    candidates = [os.path.join(os.path.dirname(os.path.realpath(nvcc_path())), "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def sass(compiled):
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (next to nvcc, on PATH or in triton's bundle) to print SASS")
    proc = subprocess.run([cuobjdump, "-sass", str(compiled[1])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _kernels(ptx: str) -> dict[str, str]:
    bodies = {}
    for m in re.finditer(r"\.entry\s+(\S*row_backward_kernel\S*?)\(.*?\n\}", ptx, re.S):
        bodies[m.group(1)] = m.group(0)
    return bodies


def _sass_kernels(sass: str) -> dict[str, str]:
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return {name: body for name, body in zip(parts[1::2], parts[2::2]) if "row_backward_kernel" in name}


def _words_per_step(name: str) -> tuple[int, int]:
    """16-byte words per 8-element vector step of the (student, teacher) types of a mangled kernel name."""
    m = re.search(r"row_backward_kernelI(.+?)Li\d+E", name)
    assert m, name
    types, rest = [], m.group(1)
    while rest:
        if rest.startswith("S2_"):   # substitution: the same type again
            types.append(types[-1])
            rest = rest[3:]
            continue
        token = next((t for t in _ITANIUM_TYPES if rest.startswith(t)), None)
        assert token, f"cannot parse the template types of {name}"
        types.append(token)
        rest = rest[len(token):]
    assert len(types) == 2, name
    return tuple(8 * _ITANIUM_TYPES[t] // 16 for t in types)


def test_every_instantiation_is_vectorised_ptx(ptx):
    kernels = _kernels(ptx)
    assert len(kernels) == N_KERNELS, f"expected {N_KERNELS} kernels, got {len(kernels)}"
    for name, body in kernels.items():
        assert re.search(r"ld\.global\.nc\.v4\.u32", body), f"{name}: no 16-byte loads"
        assert re.search(r"st\.global(\.wb)?\.v4\.(u32|f32|b32)", body), f"{name}: no 16-byte stores"
        assert not re.search(r"st\.global\.v2\.u16", body), f"{name}: a 16-byte store split into 4-byte pieces"
        assert ".local" not in body, f"{name}: uses local memory"


def test_every_instantiation_is_vectorised_sass(sass):
    """In the machine code: per vector step, one 16-byte load per 16-byte word of each input row and one
    16-byte store per word of each output row, and no local-memory traffic (spills)."""
    kernels = _sass_kernels(sass)
    assert len(kernels) == N_KERNELS, f"expected {N_KERNELS} kernels in the SASS, got {len(kernels)}"
    for name, body in kernels.items():
        words = sum(_words_per_step(name))
        loads = len(re.findall(r"\bLDG\.E\.128\b", body))
        stores = len(re.findall(r"\bSTG\.E\.128\b", body))
        assert loads >= words, f"{name}: {loads} 16-byte loads, expected at least {words}"
        assert stores >= words, f"{name}: {stores} 16-byte stores, expected at least {words}"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name}: local memory (spills)"
