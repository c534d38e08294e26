"""The CUDA kernel's generated code (no GPU needed): every instantiation uses 16-byte loads and stores
on its aligned path. Compiles csrc/row_backward.cu to PTX for sm_90 with nvcc (a few seconds).
Skipped only when TOPD_CUDA_BUILD=0 is set or nvcc is absent, like the host-build tests."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from cuda_helpers import extension_skip_reason, nvcc_path

pytestmark = pytest.mark.skipif(extension_skip_reason() is not None, reason=str(extension_skip_reason()))

CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx") / "row_backward.ptx"
    proc = subprocess.run([nvcc_path(), "-O3", "-std=c++17", "-arch=sm_90", "-ptx", "-I", CSRC,
                           os.path.join(CSRC, "row_backward.cu"), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def _kernels(ptx: str) -> dict[str, str]:
    bodies = {}
    for m in re.finditer(r"\.entry\s+(\S*row_backward_kernel\S*?)\(.*?\n\}", ptx, re.S):
        bodies[m.group(1)] = m.group(0)
    return bodies


def test_every_instantiation_is_vectorised(ptx):
    kernels = _kernels(ptx)
    assert len(kernels) == 27, f"expected 3 x 3 dtypes x 3 divergences = 27 kernels, got {len(kernels)}"
    for name, body in kernels.items():
        assert re.search(r"ld\.global\.nc\.v4\.u32", body), f"{name}: no 16-byte loads"
        assert re.search(r"st\.global(\.wb)?\.v4\.(u32|f32|b32)", body), f"{name}: no 16-byte stores"
        assert not re.search(r"st\.global\.v2\.u16", body), f"{name}: a 16-byte store split into 4-byte pieces"
        assert ".local" not in body, f"{name}: uses local memory"
