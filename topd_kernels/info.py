"""What this installation can run: `python -m topd_kernels.info`.

Prints the versions (package, python, torch, triton, numpy), the devices, which row backends are usable
here, and whether the CUDA backward extension is built (and for which architectures). Never fails for a
missing GPU, triton or extension: it reports them.
"""
from __future__ import annotations

import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown version")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"not available ({type(exc).__name__}: {exc})"


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("topd_kernels")
    except Exception:  # noqa: BLE001
        return _version("topd_kernels")


def _devices(torch) -> tuple[list[str], bool]:
    lines = ["cpu"]
    try:
        has_cuda = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        return lines + [f"cuda: error querying ({type(exc).__name__}: {exc})"], False
    if not has_cuda:
        lines.append(f"cuda: none (torch built with CUDA {torch.version.cuda})" if torch.version.cuda
                     else "cuda: none (CPU-only torch build)")
        return lines, False
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs")
    return lines, True


def _arch_match(archs: str, major: int, minor: int) -> str:
    """How a GPU of compute capability major.minor runs the extension, from its compiled arch list."""
    names = archs.split()
    cc = major * 10 + minor
    if f"sm_{cc}" in names or f"sm_{cc}a" in names:
        return f"native code for sm_{cc}"
    same_major = [n for n in names if n.startswith("sm_") and n[3:].rstrip("af").isdigit()
                  and int(n[3:].rstrip("af")) // 10 == major and int(n[3:].rstrip("af")) <= cc and not n.endswith(("a", "f"))]
    if same_major:
        return f"runs {same_major[-1]} code"
    ptx = [int(n[8:].rstrip("af")) for n in names if n.startswith("compute_") and n[8:].rstrip("af").isdigit()]
    if any(p <= cc for p in ptx):
        return f"JIT from compute_{max(p for p in ptx if p <= cc)} PTX"
    return "NO compatible code in the build (rebuild with TOPD_CUDA_ARCHS including this GPU)"


def report() -> str:
    out = []
    add = out.append
    add(f"topd_kernels {_package_version()}")
    add(f"python       {platform.python_version()} ({sys.executable})")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        add(f"torch        not available ({type(exc).__name__}: {exc})")
        return "\n".join(out)
    add(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    add(f"triton       {_version('triton')}")
    add(f"numpy        {_version('numpy')}")
    devices, has_cuda = _devices(torch)
    add("devices      " + "; ".join(devices))

    from topd_kernels.rows import registry

    add("backends usable here (topd_kernels.rows.registry):")
    for device in ["cpu"] + (["cuda"] if has_cuda else []):
        device = torch.device(device)
        for name, why in registry.availability(device).items():
            add(f"  {name:<12} {device.type:<5} {'yes' if why is None else 'no: ' + why}")
        add(f"  {'auto':<12} {device.type:<5} -> {registry.auto_backend(device)}")

    try:
        from topd_kernels.rows import cuda_rows

        ext_why = cuda_rows.UNAVAILABLE
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        ext_why = f"{type(exc).__name__}: {exc}"
    built = ext_why is None
    if built:
        line = f"CUDA extension: built ({cuda_rows.build_info()})"
        if has_cuda:
            try:
                archs = cuda_rows.EXTENSION.archs
                for i in range(torch.cuda.device_count()):
                    major, minor = torch.cuda.get_device_capability(i)
                    line += f"\n  cuda:{i}: {_arch_match(archs, major, minor)}"
            except Exception as exc:  # noqa: BLE001
                line += f"\n  (could not match architectures: {type(exc).__name__}: {exc})"
        add(line)
    else:
        add(f"CUDA extension: not built: {ext_why}")
    return "\n".join(out)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
