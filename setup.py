"""Build script: the Python package, plus the optional CUDA backward extension compiled by nvcc.

The extension `topd_kernels._cuda_backward` is a plain pybind11 module (no torch headers: it takes raw
addresses, sizes, strides and the CUDA stream as integers), compiled by nvcc with cudart linked
statically, so it builds without a CUDA build of torch and imports on machines without a GPU.

Environment:
    TOPD_CUDA_BUILD   auto (default): build when nvcc is found; when nvcc is missing or the build fails,
                                      print why and install the package without the extension.
                      0 / off:        never build it.
                      1 / force:      build it or fail the installation.
    TOPD_CUDA_ARCHS   target architectures, separated by ';', ',' or spaces. Each entry: "sm_90", "90",
                      "9.0", "sm_90a", "sm_120+PTX" (SASS plus PTX for newer GPUs), "compute_120" (PTX
                      only). Default: sm_80;sm_90;sm_100;sm_120+PTX (Ampere, Hopper, Blackwell, PTX).
    TOPD_NVCC         the nvcc to use; else $CUDA_HOME/bin/nvcc when CUDA_HOME is set; else nvcc on PATH.

No torch import here. Stale build/lib contents are removed before each build so that they never end up
in a wheel.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_EXT = "topd_kernels._cuda_backward"
CU_SOURCES = ["csrc/row_backward.cu"]
CPP_SOURCES = ["csrc/bindings.cpp"]
DEPENDS = ["csrc/row_backward.h", "csrc/row_backward_math.cuh"]
DEFAULT_ARCHS = "sm_80;sm_90;sm_100;sm_120+PTX"


def _say(msg: str) -> None:
    print(f"[topd_kernels setup] {msg}", file=sys.stderr, flush=True)


def build_mode() -> str:
    raw = os.environ.get("TOPD_CUDA_BUILD", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "off", "false", "no", "skip"):
        return "off"
    if raw in ("1", "on", "true", "yes", "force"):
        return "force"
    raise SystemExit(f"TOPD_CUDA_BUILD={raw!r}: expected auto, 0 or 1")


def find_nvcc() -> str | None:
    explicit = os.environ.get("TOPD_NVCC")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        cand = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def parse_archs(spec: str) -> tuple[list[str], list[str]]:
    """'sm_80;sm_90a;sm_120+PTX' -> (nvcc -gencode flags, names such as ['sm_80', 'sm_90a', 'sm_120', 'compute_120'])."""
    flags: list[str] = []
    names: list[str] = []
    for item in filter(None, re.split(r"[;,\s]+", spec.strip())):
        m = re.fullmatch(r"(?i)(sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+ptx)?", item)
        if not m:
            raise SystemExit(f"TOPD_CUDA_ARCHS: cannot parse {item!r} (e.g. 'sm_90', '9.0', 'sm_120+PTX')")
        prefix, major, minor, suffix, ptx = m.groups()
        num = f"{major}{minor}" if minor is not None else major
        arch = num + suffix.lower()
        if prefix and prefix.lower() == "compute_":
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
            names.append(f"compute_{arch}")
            continue
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]")
            names += [f"sm_{arch}", f"compute_{arch}"]
        else:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
            names.append(f"sm_{arch}")
    if not flags:
        raise SystemExit("TOPD_CUDA_ARCHS is empty")
    return flags, names


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _start(cmd: list[str]) -> tuple[list[str], subprocess.Popen]:
    _say(" ".join(cmd))
    return cmd, subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*jobs: tuple[list[str], subprocess.Popen]) -> None:
    """Waits for every job, then raises on the first failure with its output."""
    outputs = [(cmd, proc.communicate()[0], proc.returncode) for cmd, proc in jobs]
    for cmd, out, rc in outputs:
        if rc != 0:
            raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}\n{out}")


def _run(cmd: list[str]) -> None:
    _wait(_start(cmd))


class BuildExt(build_ext):
    """Builds the CUDA extension with nvcc (compile .cu, compile the pybind11 bindings, link with nvcc)."""

    def run(self):
        self._copy_back = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext):
        if ext.name != CUDA_EXT:
            return super().build_extension(ext)
        mode = build_mode()
        if mode == "off":
            return self._skip(ext, "TOPD_CUDA_BUILD=0")
        nvcc = find_nvcc()
        if nvcc is None:
            why = "nvcc not found (set TOPD_NVCC or CUDA_HOME, or put nvcc on PATH)"
            if mode == "force":
                raise RuntimeError(f"TOPD_CUDA_BUILD=1 but {why}")
            return self._skip(ext, why)
        try:
            self._build_cuda(ext, nvcc)
        except Exception as exc:  # noqa: BLE001 - auto mode installs without the extension
            if mode == "force":
                raise
            self._skip(ext, f"the build failed: {type(exc).__name__}: {exc}")

    def _skip(self, ext, why: str) -> None:
        _say(f"CUDA extension {ext.name} NOT built: {why}. The package works without it "
             f"(backends 'torch' and 'triton'); TOPD_CUDA_BUILD=1 makes this an error.")
        target = self.get_ext_fullpath(ext.name)
        if os.path.exists(target):
            os.remove(target)
        if self._copy_back:   # editable / in-place: drop a stale copy in the source tree
            build_py = self.get_finalized_command("build_py")
            inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(inplace_file):
                _say(f"removing stale {inplace_file}")
                os.remove(inplace_file)

    def _build_cuda(self, ext, nvcc: str) -> None:
        import pybind11  # build requirement; imported here so that a missing one is an ordinary skip reason
        import sysconfig

        start = time.time()
        gencode, names = parse_archs(os.environ.get("TOPD_CUDA_ARCHS", DEFAULT_ARCHS))
        version = nvcc_version(nvcc)
        tmp = os.path.abspath(os.path.join(self.build_temp, "topd_cuda"))
        os.makedirs(tmp, exist_ok=True)
        threads = str(max(1, min(len(gencode), os.cpu_count() or 1)))
        with open(os.path.join(tmp, "topd_build_info.h"), "w") as f:   # read by bindings.cpp
            f.write(f'#define TOPD_CUDA_ARCHS "{" ".join(names)}"\n#define TOPD_NVCC_VERSION "{version}"\n')
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]]
        # The bindings (host C++ only) compile while nvcc compiles the kernels.
        jobs, objects = [], []
        for src in CPP_SOURCES:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            jobs.append(_start([nvcc, "-O2", "-std=c++17", "-DNDEBUG", "-Xcompiler", "-fPIC",
                                "-Xcompiler", "-fvisibility=hidden", f"-I{tmp}", "-Icsrc",
                                *[f"-I{d}" for d in dict.fromkeys(includes)], "-c", src, "-o", obj]))
            objects.append(obj)
        for src in CU_SOURCES:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            jobs.append(_start([nvcc, "-O3", "-std=c++17", "-DNDEBUG", "--threads", threads, "-Xcompiler", "-fPIC",
                                "-Xcompiler", "-fvisibility=hidden", "-Icsrc", *gencode, "-c", src, "-o", obj]))
            objects.append(obj)
        _wait(*jobs)
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _run([nvcc, "-shared", "-cudart", "static", *objects, "-o", target])
        _say(f"CUDA extension {ext.name} built for {' '.join(names)} with nvcc {version} "
             f"in {time.time() - start:.1f} s")


class CleanBuild(build):
    """`build` that first removes a stale build/lib*: leftovers there would be packed into the wheel."""

    def run(self):
        for lib in dict.fromkeys(os.path.abspath(d) for d in (self.build_lib, self.build_purelib, self.build_platlib)):
            if os.path.isdir(lib) and lib.startswith(os.path.join(HERE, "build") + os.sep):
                _say(f"removing stale {os.path.relpath(lib, HERE)}")
                shutil.rmtree(lib)
        super().run()


setup(
    ext_modules=[Extension(CUDA_EXT, sources=CU_SOURCES + CPP_SOURCES, depends=DEPENDS, optional=True)],
    cmdclass={"build_ext": BuildExt, "build": CleanBuild},
)
