"""Benchmark harness checks (CPU, fast). Speed is measured by the benchmarks, never asserted here.

- a pytest-benchmark suite over a few small CPU shapes (torch backend and plain eager), no assertions on time;
- the harness of benchmarks/bench_kl.py on its smallest configuration: the JSON has the expected keys and
  finite numbers, unusable methods are listed with a reason, and every method computes the same loss;
- the memory trackers of benchmarks/memtrack.py measure known allocations correctly.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_kl  # noqa: E402
import memtrack  # noqa: E402
import topd_kernels  # noqa: E402

MB4 = 1 << 22  # 4 MiB


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark: fwd+bwd on small CPU shapes (recorded, not asserted)
# ---------------------------------------------------------------------------------------------------
SHAPES = [(64, 4096, torch.float32), (64, 4096, torch.bfloat16)]
CFGS = bench_kl.make_configs(bench_kl.parse_args([]))


def _method(name, cfg_name):
    cfg = CFGS[cfg_name]
    if name == "topd[torch]":
        kw = bench_kl.topd_kwargs(cfg)
        return lambda s, t: topd_kernels.fused_window_kl(s, t, backend="torch", **kw)
    return lambda s, t: bench_kl.eager_window_kl(s, t, **cfg)


@pytest.mark.parametrize("cfg_name", ["topd", "opd"])
@pytest.mark.parametrize("method", ["topd[torch]", "eager"])
@pytest.mark.parametrize("n,v,dtype", SHAPES, ids=lambda x: str(x).replace("torch.", ""))
def test_bench_fwd_bwd(benchmark, n, v, dtype, method, cfg_name):
    s, t = bench_kl.make_inputs(n, v, dtype, torch.device("cpu"), seed=0)
    s.requires_grad_(True)
    fn = _method(method, cfg_name)

    def setup():
        s.grad = None

    def step():
        fn(s, t).backward()

    benchmark.extra_info.update(N=n, V=v, dtype=str(dtype), method=method, config=cfg_name)
    benchmark.pedantic(step, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()


# ---------------------------------------------------------------------------------------------------
# The harness, smallest configuration
# ---------------------------------------------------------------------------------------------------
def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_bench_kl_harness_smallest(tmp_path):
    out = tmp_path / "bench.json"
    # torch.compile is left out: compiling takes minutes on a 2-core CI machine (it runs in --quick)
    methods = "topd[auto],topd[triton+cuda],topd[triton],topd[torch],eager,liger"
    result = bench_kl.main(["--quick", "--device", "cpu", "--N", "32,64", "--V", "1000", "--dtype", "fp32,bf16",
                            "--methods", methods, "--cpu-min-reps", "2", "--cpu-max-reps", "2",
                            "--copy-bytes", str(1 << 22), "--out", str(out), "--plot", str(tmp_path / "b.png")])
    data = json.loads(out.read_text())
    assert (tmp_path / "bench.md").exists()
    for key in ("schema", "env", "settings", "shapes", "configs", "methods", "copy_bandwidth", "results",
                "loss_check"):
        assert key in data, key
    for key in ("device_name", "driver", "torch", "triton", "liger_kernel", "git_commit", "timestamp_utc"):
        assert key in data["env"], key
    assert data["env"]["device_type"] == "cpu" and data["env"]["device_name"].startswith("CPU")
    assert set(data["configs"]) == {"topd", "opd"}
    assert data["configs"]["topd"]["window"] == 8 and data["configs"]["topd"]["loss_q"] is not None

    rows = data["results"]
    assert len(rows) == 2 * 2 * 2 * 6  # N x dtype x config x method: nothing dropped
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
        for key in ("N", "V", "dtype", "config", "method", "status"):
            assert key in r
    # on the CPU: triton, triton+cuda and liger are listed with a reason; auto is torch here
    for r in rows:
        if r["method"] in ("topd[triton]", "topd[triton+cuda]", "liger"):
            assert r["status"] == "n/a" and r["reason"], r
        if r["method"] == "topd[auto]":
            assert r["status"] == "alias" and "torch" in r["reason"]
    ok = by_status["ok"]
    assert {r["method"] for r in ok} == {"topd[torch]", "eager"}
    assert len(ok) == 2 * 2 * 2 * 2
    for r in ok:
        for phase in ("fwd", "bwd", "fwd_bwd"):
            for q in ("median_ms", "p20_ms", "p80_ms"):
                assert math.isfinite(r[phase][q]) and r[phase][q] > 0
            assert r[phase]["p20_ms"] <= r[phase]["median_ms"] <= r[phase]["p80_ms"]
            assert math.isfinite(r["bytes_per_s"][phase]) and r["bytes_per_s"][phase] > 0
            assert math.isfinite(r["pct_of_copy_bw"][phase])
            assert math.isfinite(r["speedup_vs_eager"][phase])
        mem = r["memory"]
        assert mem["peak_step_bytes"] >= r["grad_bytes"]  # the gradient is allocated during the step
        assert mem["kept_after_step_bytes"] >= r["grad_bytes"]
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["loss_abs_diff_vs_eager"] <= 1e-4 * max(1.0, abs(r["loss"]))
    for path, x in _numbers(data):
        assert math.isfinite(x), path
    assert data["loss_check"]["compared"] == 2 * 2 * 2
    assert data["loss_check"]["max_abs_diff"] <= 1e-4
    # memory: the fused torch backend keeps O(N) for backward, eager keeps N x V float32 tensors
    for r in ok:
        if r["method"] == "eager":
            assert r["memory"]["saved_bytes"] >= r["N"] * r["V"] * 4
    assert len(result["results"]) == len(rows)


def test_eager_baseline_matches_topd_reference():
    """The self-contained eager baseline computes the library's loss (float64 reference, window 8, TOPD)."""
    s, t = bench_kl.make_inputs(48, 300, torch.float32, torch.device("cpu"), seed=1)
    for cfg in CFGS.values():
        eager = bench_kl.eager_window_kl(s.double(), t.double(), **cfg)
        ours = topd_kernels.fused_window_kl(s, t, backend="torch", **bench_kl.topd_kwargs(cfg))
        assert abs(float(eager) - float(ours)) <= 1e-5 * max(1.0, abs(float(eager)))


# ---------------------------------------------------------------------------------------------------
# The memory trackers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tracker", ["dispatch", "profiler"])
def test_tracker_known_allocations(tracker):
    kept = []
    base = torch.randn(1 << 20)  # 4 MiB allocated before the region: never counted

    def fn():
        kept.append(torch.empty(1 << 20))           # 4 MiB, kept
        tmp = torch.ones(1 << 20)                   # 4 MiB, freed at return
        view = tmp.view(1024, 1024)                 # a view: no new memory
        base.add_(1.0)                              # in place on a pre-existing tensor: no new memory
        return (view.sum(), base[:10])              # a scalar and a view of the input

    m = memtrack.measure_peak(fn, torch.device("cpu"), tracker)
    assert m["peak_bytes"] >= 2 * MB4
    assert m["peak_bytes"] <= 2 * MB4 + 64 * 1024
    assert MB4 <= m["live_bytes"] <= MB4 + 1024
    kept.clear()


def test_storage_tracker_counts_autograd_and_frees():
    """The backward's allocations are seen (CPU autograd runs on the calling thread) and frees are
    subtracted: peak of a 4 MiB-per-tensor eager chain, and only the gradient left alive."""
    x = torch.randn(1 << 20, requires_grad=True)
    with memtrack.StorageTracker() as tr:
        y = (x * 2).exp()        # two 4 MiB tensors (exp keeps its result for backward)
        y.sum().backward()
        del y
    assert tr.peak_bytes >= 2 * MB4
    assert MB4 <= tr.live_bytes <= MB4 + 1024  # x.grad
    assert x.grad is not None


def test_liger_method_computes_the_opd_loss():
    """bench_kl's Liger method (LigerJSD, beta=1, on fp32 log_softmax) is the opd loss of eager, value and
    gradient. On the CPU it runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
    pytest.importorskip("liger_kernel")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, t = bench_kl.make_inputs(8, 1000, torch.float32, device, seed=2)
    s.requires_grad_(True)
    try:
        liger = bench_kl.liger_loss_fn()(s, t)
    except Exception as exc:  # a Liger release whose kernels do not run in the interpreter
        if device.type == "cpu":
            pytest.skip(f"Liger does not run under the Triton interpreter here: {type(exc).__name__}: {exc}")
        raise
    liger.backward()
    g_liger, s.grad = s.grad.clone(), None
    eager = bench_kl.eager_window_kl(s, t, **CFGS["opd"])
    eager.backward()
    assert abs(float(liger.detach()) - float(eager.detach())) <= 1e-5
    torch.testing.assert_close(g_liger, s.grad, rtol=1e-4, atol=1e-7)


def test_cuda_timing_path_replays_graphs(monkeypatch):
    """The CUDA branch of the timer (do_bench over rotated copies; backward alone by replaying kept graphs
    with retain_graph) run on the CPU with do_bench replaced by a plain loop: every figure is produced,
    each call sees the gradients cleared, and no gradient is left behind."""
    from types import SimpleNamespace

    calls = []

    def fake_cuda(self, fn, grad_to_none):
        for _ in range(3):
            for x in grad_to_none or []:
                x.grad = None
            fn()
        calls.append(len(grad_to_none or []))
        return {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "reps": None}

    monkeypatch.setattr(bench_kl.Timer, "_cuda", fake_cuda)
    args = bench_kl.parse_args([])
    timer = bench_kl.Timer(SimpleNamespace(type="cuda"), args)
    copies = []
    for i in range(3):
        s, t = bench_kl.make_inputs(16, 200, torch.float32, torch.device("cpu"), seed=i)
        copies.append((s.requires_grad_(True), t))
    for name in ("topd[torch]", "eager"):
        fn = _method(name, "topd")
        res = timer.time_all(fn, copies)
        assert set(res) == {"fwd", "bwd", "fwd_bwd"}
        assert res["bwd"]["method"].startswith("do_bench")
        assert all(s.grad is None for s, _ in copies)
    assert calls == [0, 3, 3, 0, 3, 3]


def test_oom_is_reported_not_dropped(tmp_path, monkeypatch):
    """A method that runs out of memory gets an "OOM" row (table and JSON) and the others go on; the loss
    check then compares with the first method that ran."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (simulated)")

    monkeypatch.setattr(bench_kl, "eager_window_kl", oom)
    out = tmp_path / "oom.json"
    result = bench_kl.main(["--device", "cpu", "--N", "32", "--V", "500", "--dtype", "fp32",
                            "--methods", "topd[torch],eager", "--configs", "opd", "--cpu-min-reps", "1",
                            "--cpu-max-reps", "1", "--copy-bytes", str(1 << 20), "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["eager"]["status"] == "OOM" and "out of memory" in rows["eager"]["reason"]
    assert rows["topd[torch]"]["status"] == "ok"
    assert rows["topd[torch]"]["loss_reference"] == "topd[torch]"
    assert rows["topd[torch]"]["speedup_vs_eager"] is None
    assert "| eager | OOM |" in (tmp_path / "oom.md").read_text()
    assert len(result["results"]) == 2


def test_gpu_timing_reports_quantiles_and_copy_bandwidth(monkeypatch):
    """The shared GPU timing (bench_kl, profile_rows, profile_cuda_backward) with do_bench stood in for on
    the CPU: quantiles passed through in order, the copy yardstick counts read + write of the buffer."""
    import triton.testing

    import gpu_timing

    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None):
        fn()
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert gpu_timing.bench_gpu(lambda: None, warmup_ms=7, rep_ms=11) == {
        "median_ms": 2.0, "p20_ms": 1.5, "p80_ms": 3.0}
    assert seen == {"warmup": 7, "rep": 11, "quantiles": [0.5, 0.2, 0.8]}
    copy = gpu_timing.copy_bandwidth_gpu(4 << 20, warmup_ms=1, rep_ms=1, device="cpu")
    assert copy["bytes"] == 4 << 20
    assert copy["bytes_per_s"] == 2 * (4 << 20) / 2e-3
