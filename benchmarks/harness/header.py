"""What every benchmark result file starts with, and how it is written.

`environment(device)`: when, where and with what the numbers were measured (device, driver, versions,
commit, the row backends usable on the device). `write_json`: the result as JSON, non-finite numbers kept
visible. `result_path`: the default file name under benchmarks/results/.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch

import topd_kernels
from topd_kernels.rows import registry

RESULTS = Path(__file__).resolve().parents[1] / "results"
REPO = RESULTS.parents[1]


def _cmd(argv) -> Optional[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip() or None
    except Exception:
        return None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        try:
            return version(module.replace("_", "-"))
        except Exception:
            return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """The header of a result: time, device (name, driver, memory, capability), versions, commit, command
    line, load average, and `backends`: each row backend's availability on `device` (None = usable)."""
    env = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "topd_kernels": getattr(topd_kernels, "__version__", None),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _cmd(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    env.update({module: _version(module) for module in ("triton", "liger_kernel", "numpy")})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_bytes"] = props.total_memory
        env["device_capability"] = f"sm_{props.major}{props.minor}"
        env["device_sms"] = props.multi_processor_count
        env["driver"] = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        env["device_name"] = f"CPU: {_cpu_name()}"
        env["driver"] = "n/a (CPU)"
    env["backends"] = registry.availability(device)
    return env


def finish(env: dict) -> None:
    """Add the load average at the end of the run to a header."""
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())


def _finite(obj):
    """JSON has no NaN / inf: such a number becomes its string ("nan", "inf") so it is visible, not lost."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, result: dict) -> Path:
    """Write `result` as indented JSON (parent folders made; anything else JSON lacks written as str)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=1, allow_nan=False, default=str) + "\n")
    return path


def result_path(prefix: str, env: dict) -> Path:
    """benchmarks/results/<prefix>_<device name>_<UTC time>.json, for scripts that keep every run."""
    tag = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"]).strip("-").lower()
    stamp = env["timestamp_utc"].replace("-", "").replace(":", "").replace("+0000", "Z")
    return RESULTS / f"{prefix}_{tag}_{stamp}.json"
