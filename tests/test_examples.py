"""Every example in examples/ runs (as a user would: `python examples/NAME.py`, a fresh process) and prints what it
says it prints, so none of them can rot. Each takes seconds on the CPU (under a minute on a loaded 2-core machine);
the timeout only guards against a hang. examples/vocab_parallel.py runs under torchrun in test_vocab_parallel.py."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 180
NUMBER = r"[-+0-9.e]+"


def run_example(name: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=env, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(rf"(?<![-\w])loss ({NUMBER})", stdout)]


def test_plain_loop_hf():
    pytest.importorskip("transformers")
    out = run_example("plain_loop_hf.py")
    steps = losses(out)
    assert len(steps) == 5 and steps[-1] < steps[0], out  # the student moves toward the teacher
    assert "mean KL" in out and "divergent" in out


def test_hf_trainer():
    pytest.importorskip("transformers")
    out = run_example("hf_trainer.py")
    found = re.findall(rf"step (\d+): loss ({NUMBER}), mean KL ({NUMBER}), high-loss share ({NUMBER}), "
                       rf"judged non-divergent ({NUMBER})", out)
    assert [int(step) for step, *_ in found] == [2, 4, 6], out
    assert float(found[-1][1]) < float(found[0][1]), out
    assert all(0.1 < float(share) < 0.3 for *_, share, _ in found), out  # Quantile(0.8): about a fifth


def test_trl_trainer():
    pytest.importorskip("trl")
    out = run_example("trl_trainer.py")
    assert "'divergence': 'reverse_kl'" in out, out  # TRL's beta = 1.0 is the reverse KL
    found = re.findall(rf"step (\d+): loss ({NUMBER}), mean KL ({NUMBER})", out)
    assert [int(step) for step, *_ in found] == [2, 4], out


def test_topk_teacher():
    pytest.importorskip("transformers")
    out = run_example("topk_teacher.py")
    steps = losses(out)[:4]
    assert steps[-1] < steps[0], out
    found = re.search(rf"k = V: top-k loss ({NUMBER}), full-vocabulary loss ({NUMBER})", out)
    top_all, full = map(float, found.groups())
    assert top_all == pytest.approx(full, rel=1e-5), out
