"""The reference training loop (topd_kernels.train): task, sampling, teacher cache, every method, CLI; a teacher
that scores rollouts with its top-k log-probabilities only (--teacher-topk)."""
import json
import math
import random

import pytest
import torch

from topd_kernels.train import cli
from topd_kernels.train.loop import DistillConfig, distill
from topd_kernels.train.methods import METHODS, MethodSettings, loss_kwargs
from topd_kernels.train.model import ModelConfig, build_model
from topd_kernels.train.plot import plot_accuracy
from topd_kernels.train.rollout import sample_rollouts, teacher_rewrite
from topd_kernels.train.task import EOS_ID, VOCAB_SIZE, ArithmeticTask, Problem, TaskConfig, decode, parse_answer
from topd_kernels import TopK
from topd_kernels.train.teacher import TeacherConfig, load_or_train_teacher, score_rollouts, top_k_scores

TINY_TASK = TaskConfig(n_ops=2, test_size=16, test_seed=7)


def tiny_model(seed: int, d_model: int = 16) -> torch.nn.Module:
    return build_model(ModelConfig(VOCAB_SIZE, TINY_TASK.seq_len, d_model, 1, 2), seed)


def test_task_solutions_are_correct_and_parse():
    task = ArithmeticTask(TaskConfig(n_ops=3, test_size=8))
    problem = Problem(4, (("+", 7), ("*", 3), ("-", 2)))
    text = problem.solution(random.Random(0))
    assert problem.prompt == "4+7*3-2>"
    assert text[:5] == "4+7=1" and text[6:11] == "1*3=3" and text.endswith("#1.")
    assert parse_answer(text) == problem.answer == 1
    assert parse_answer("4+7=1;#") is None and parse_answer("") is None
    tokens = task.encode_solutions([problem], random.Random(0))
    assert tokens.shape == (1, task.config.seq_len)
    assert task.score([problem], tokens).tolist() == [True]


def test_parity_style_separators_follow_the_result():
    problem = Problem(4, (("+", 7), ("*", 3), ("*", 2)))
    assert problem.solution(random.Random(0), "parity") == "4+7=1,1*3=3,3*2=6;#6."
    with pytest.raises(ValueError, match="separator style"):
        problem.solution(random.Random(0), "fancy")


def test_task_is_deterministic_and_test_set_held_out():
    task = ArithmeticTask(TINY_TASK)
    assert [p.prompt for p in task.test_problems] == [p.prompt for p in ArithmeticTask(TINY_TASK).test_problems]
    draws = task.sample_problems(500, random.Random(3))
    assert draws == task.sample_problems(500, random.Random(3))
    assert not {p.prompt for p in draws} & {p.prompt for p in task.test_problems}


def test_sampling_is_deterministic_under_a_seed():
    task = ArithmeticTask(TINY_TASK)
    model = tiny_model(0)
    prompts = task.encode_prompts(task.test_problems)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_rollouts(model, prompts, TINY_TASK.seq_len, 1.0, generator)

    (tokens_a, mask_a), (tokens_b, mask_b), (tokens_c, _) = draw(5), draw(5), draw(6)
    assert torch.equal(tokens_a, tokens_b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(tokens_a, tokens_c)
    assert torch.equal(tokens_a[:, : TINY_TASK.prompt_len], prompts)
    assert not mask_a[:, : TINY_TASK.prompt_len].any() and mask_a[:, TINY_TASK.prompt_len].all()
    for row, mask in zip(tokens_a, mask_a):
        eos = (row == EOS_ID).nonzero()
        if len(eos):
            assert mask[eos[0, 0]] and not mask[eos[0, 0] + 1 :].any()


def test_teacher_rewrite_keeps_prefix_and_leaves_unflagged_rows():
    task = ArithmeticTask(TINY_TASK)
    student, teacher = tiny_model(1), tiny_model(2)
    prompts = task.encode_prompts(task.test_problems[:4])
    tokens, mask = sample_rollouts(student, prompts, TINY_TASK.seq_len, 1.0, torch.Generator().manual_seed(0))
    divergent = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    fork = TINY_TASK.prompt_len + 1
    divergent[0, fork] = True
    new_tokens, new_mask = teacher_rewrite(teacher, tokens, mask, divergent)
    assert torch.equal(new_tokens[1:], tokens[1:]) and torch.equal(new_mask[1:], mask[1:])
    assert torch.equal(new_tokens[0, : fork + 1], tokens[0, : fork + 1])
    assert new_mask[0, TINY_TASK.prompt_len :].sum() > 0 and not new_mask[0, : TINY_TASK.prompt_len].any()


def test_teacher_cache_round_trip(tmp_path):
    task = ArithmeticTask(TINY_TASK)
    config = TeacherConfig(d_model=16, n_layers=1, n_heads=2, max_steps=3, batch_size=8, eval_every=100)
    first, info = load_or_train_teacher(task, config, torch.device("cpu"), tmp_path, progress=False)
    second, info_again = load_or_train_teacher(task, config, torch.device("cpu"), tmp_path, progress=False)
    assert not info["cached"] and info_again["cached"] and info["path"] == info_again["path"]
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in second.parameters())
    other = TeacherConfig(**{**config.__dict__, "seed": 1})
    _, info_other = load_or_train_teacher(task, other, torch.device("cpu"), tmp_path, progress=False)
    assert not info_other["cached"] and info_other["path"] != info["path"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains(method):
    task = ArithmeticTask(TINY_TASK)
    teacher = tiny_model(10, d_model=32).requires_grad_(False)
    student = tiny_model(11)
    before = [p.detach().clone() for p in student.parameters()]
    config = DistillConfig(steps=3, batch_size=8, eval_every=2, settings=MethodSettings(window=3))
    result = distill(student, teacher, task, method, config, seed=0, device=torch.device("cpu"), progress=False)
    assert len(result["steps"]) == 3 and [e["step"] for e in result["evals"]] == [0, 2, 3]
    for record in result["steps"]:
        assert math.isfinite(record["loss"]) and record["loss"] >= 0 and math.isfinite(record["mean_kl"])
        assert 0.0 <= record["nondivergent_share"] <= 1.0
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in result["evals"])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_runs_are_deterministic_under_a_seed():
    task = ArithmeticTask(TINY_TASK)
    teacher = tiny_model(10, d_model=32).requires_grad_(False)
    config = DistillConfig(steps=2, batch_size=8, eval_every=2)
    runs = [distill(tiny_model(11), teacher, task, "topd", config, 4, torch.device("cpu"), progress=False)
            for _ in range(2)]
    assert [r["loss"] for r in runs[0]["steps"]] == [r["loss"] for r in runs[1]["steps"]]


def test_method_keywords():
    settings = MethodSettings(window=5, guidance_weight=0.7)
    assert loss_kwargs("opd", settings) == {"divergence": "reverse_kl", "window": 1}
    assert loss_kwargs("trd", settings) == {"divergence": "forward_kl", "window": 1}
    assert loss_kwargs("opd-filter", settings)["guidance_weight"] == 0.0
    topd = loss_kwargs("topd", settings)
    assert topd["guidance_weight"] == 0.7 and topd["window"] == 5 and topd["loss_threshold"] is not None
    with pytest.raises(ValueError, match="unknown method"):
        loss_kwargs("sft", settings)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "ppo"], "invalid choice"),
        (["--steps", "0"], "must be > 0"),
        (["--steps", "-3"], "must be > 0"),
        (["--steps", "many"], "expected an integer"),
        (["--compare", "--methods", "opd,sft"], "unknown method"),
        (["--seeds", "a,b"], "comma-separated integers"),
        (["--loss-threshold", "1.5"], "loss_threshold: Quantile: q must be in [0, 1], got 1.5"),
        (["--div-threshold", "x"], "div_threshold: could not convert"),
        (["--gamma", "-0.1"], "gamma: must be in [0, 1], got -0.1"),
        (["--lr", "0"], "lr must be > 0"),
        (["--device", "tpu-ish"], "--device"),
        (["--teacher-topk", "0"], "must be > 0"),
        (["--teacher-topk", "22"], f"--teacher-topk: must be <= {VOCAB_SIZE} (the vocabulary size), got 22"),
        (["--teacher-topk", "4", "--teacher-topk-tail", "drop"], "invalid choice"),
    ],
)
def test_bad_cli_args_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", "unused"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--compare", "--methods", "opd,topd", "--seeds", "0", "--steps", "2", "--batch-size", "8",
            "--eval-every", "1", "--n-ops", "2", "--test-size", "8", "--student-d-model", "16",
            "--student-layers", "1", "--student-sft-steps", "2", "--teacher-d-model", "16",
            "--teacher-layers", "1", "--teacher-steps", "2", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "opd" in printed and "topd" in printed and "seed 0" in printed
    log = json.loads((out / "log.json").read_text())
    assert [run["method"] for run in log["runs"]] == ["opd", "topd"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_plot(tmp_path, monkeypatch):
    """The demo's figure, drawn by matplotlib (the train extra): labelled axes, a thin line per run, a thick line per
    method's mean over seeds, a legend. Without matplotlib nothing is written and the message says what to install."""
    import builtins
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [{"method": method, "seed": seed, "evals": [{"step": 0, "accuracy": 0.2},
                                                       {"step": 10, "accuracy": 0.4 + 0.1 * seed}]}
            for method in ("opd", "topd") for seed in (0, 1)]
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    path = tmp_path / "a.png"
    assert plot_accuracy(runs, path) == f"plot: {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures[0].axes
    assert ax.get_xlabel() == "training step" and "accuracy" in ax.get_ylabel() and ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["opd (mean of 2 seeds)", "topd (mean of 2 seeds)"]
    assert len(ax.lines) == 4 + 2

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    message = plot_accuracy(runs, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists() and "matplotlib is not installed" in message
    assert "pip install -e '.[train]'" in message
    assert decode([1] + [2, 12, 5]) == "0+3"


# ---------------------------------------------------------------------------------------------------
# A top-k teacher (--teacher-topk): the teacher's top-k log-probabilities, as an inference server returns them
# ---------------------------------------------------------------------------------------------------
def test_top_k_scores_are_the_teacher_s_top_k_log_softmax():
    logits = torch.randn(3, 5, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    scores = top_k_scores(logits, 4)
    assert isinstance(scores, TopK) and scores.tail == "bucket" and scores.k == 4
    assert scores.token_ids.dtype == torch.int32 and scores.logprobs.dtype == torch.float32
    assert scores.token_ids.shape == scores.logprobs.shape == (3, 5, 4)
    log_softmax = logits.log_softmax(-1)
    assert torch.equal(scores.logprobs, log_softmax.gather(-1, scores.token_ids.long()))
    assert torch.equal(scores.logprobs, log_softmax.topk(4, dim=-1).values)
    assert top_k_scores(logits, VOCAB_SIZE, "renormalize").tail == "renormalize"
    with pytest.raises(ValueError, match="k must be in"):
        top_k_scores(logits, VOCAB_SIZE + 1)
    with pytest.raises(ValueError, match="tail must be one of"):
        top_k_scores(logits, 4, "drop")
    model = tiny_model(3)
    tokens = torch.randint(0, VOCAB_SIZE, (2, TINY_TASK.seq_len), generator=torch.Generator().manual_seed(1))
    assert torch.equal(score_rollouts(model, tokens), model(tokens[:, :-1]))
    assert score_rollouts(model, tokens, 3).token_ids.shape == (2, TINY_TASK.seq_len - 1, 3)
    with pytest.raises(ValueError, match="teacher_topk must be None or >= 1"):
        DistillConfig(teacher_topk=0)
    with pytest.raises(ValueError, match="teacher_topk_tail must be one of"):
        DistillConfig(teacher_topk=4, teacher_topk_tail="drop")


def _tiny_run(method, teacher_topk=None, steps=3, tail="bucket"):
    task = ArithmeticTask(TINY_TASK)
    teacher = tiny_model(10, d_model=32).requires_grad_(False)
    config = DistillConfig(steps=steps, batch_size=8, eval_every=2, settings=MethodSettings(window=3),
                           teacher_topk=teacher_topk, teacher_topk_tail=tail)
    return distill(tiny_model(11), teacher, task, method, config, seed=0, device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_top_k_teacher_run_differs_from_full_logits_only_where_expected(method):
    """With the teacher's top-4 (tail bucket), a run trains and starts exactly as the full-logits run (same
    student, same first rollouts), and the first divergence the loss sees is smaller: the 4 + 1 categories
    partition the vocabulary, and a KL over a coarser partition is at most the full one (data processing);
    for OPD (mean reverse KL) that is the first loss itself. From the first update on the runs part."""
    full, top4 = _tiny_run(method), _tiny_run(method, teacher_topk=4)
    assert len(top4["steps"]) == 3 and [e["step"] for e in top4["evals"]] == [0, 2, 3]
    for record in top4["steps"]:
        assert math.isfinite(record["loss"]) and record["loss"] >= 0 and math.isfinite(record["mean_kl"])
        assert 0.0 <= record["nondivergent_share"] <= 1.0
    assert top4["evals"][0] == full["evals"][0]
    first, first_full = top4["steps"][0], full["steps"][0]
    assert first["rollout_accuracy"] == first_full["rollout_accuracy"]  # the same rollouts
    assert first["rollout_kl"] < first_full["rollout_kl"]
    if method == "opd":
        assert first["loss"] < first_full["loss"]
        assert first["loss"] == pytest.approx(first["mean_kl"], rel=1e-6)
    assert [r["loss"] for r in top4["steps"]] != [r["loss"] for r in full["steps"]]


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("method", ["topd", "trd"])
def test_top_k_teacher_with_every_id_is_the_full_logits_run(method, tail):
    """K = the vocabulary size: the top-k categories are the whole vocabulary (the tails are empty, floored at
    1e-7 on both sides for "bucket"), so the run is the full-logits run up to float32 rounding."""
    full, every = _tiny_run(method), _tiny_run(method, teacher_topk=VOCAB_SIZE, tail=tail)
    for a, b in zip(every["steps"], full["steps"]):
        for key in ("loss", "mean_kl", "rollout_kl", "weight_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["rollout_accuracy"] == b["rollout_accuracy"]
        assert a["nondivergent_share"] == b["nondivergent_share"]
    assert every["evals"] == full["evals"]


def test_cli_teacher_topk_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--compare", "--methods", "opd,trd", "--seeds", "0", "--steps", "2", "--batch-size", "8",
            "--eval-every", "1", "--n-ops", "2", "--test-size", "8", "--student-d-model", "16",
            "--student-layers", "1", "--student-sft-steps", "2", "--teacher-d-model", "16",
            "--teacher-layers", "1", "--teacher-steps", "2", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--no-progress", "--device", "cpu", "--teacher-topk", "4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher scores seen by the loss: top-4 log-probabilities, tail bucket (TopK)" in printed
    log = json.loads((out / "log.json").read_text())
    assert log["distill"]["teacher_topk"] == 4 and log["distill"]["teacher_topk_tail"] == "bucket"
    assert log["teacher_scores"].startswith("top-4")
    assert [run["method"] for run in log["runs"]] == ["opd", "trd"]
