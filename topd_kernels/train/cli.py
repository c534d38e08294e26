"""`topd-train`: the reference distillation run (OPD, OPD-filter, TOPD, TRD) on the arithmetic task.

    topd-train --method topd --steps 150 --seed 0 --out runs/topd
    topd-train --compare --seeds 0,1 --out runs/demo      # every method, every seed, then a table
    topd-train --compare --teacher-topk 4 --out runs/topk4  # the teacher's top-4 log-probabilities only

Writes DIR/log.json (configs, per-step records, evaluations, final table) and DIR/accuracy.png.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
import sys
import time

import torch

from topd_kernels import Quantile

from .loop import DistillConfig, distill
from .methods import METHODS, MethodSettings
from .plot import plot_accuracy
from .student import StudentConfig, make_student
from .task import SEPARATOR_STYLES, VOCAB_SIZE, ArithmeticTask, TaskConfig
from .teacher import TOPK_TAILS, TeacherConfig, default_cache_dir, load_or_train_teacher


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _quantile(name: str):
    """argparse type: a quantile level Q -> Quantile(Q), errors in the loss's words."""
    def parse(text: str) -> Quantile:
        try:
            return Quantile(float(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _method_list(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topd-train",
        description="On-policy distillation of a small transformer on chained arithmetic mod 10: "
        "OPD, OPD with suppression only, TOPD and TRD, all through topd_kernels.fused_window_kl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--method", choices=METHODS, default="topd", help="method of a single run")
    run.add_argument("--compare", action="store_true", help="run every method of --methods over --seeds")
    run.add_argument("--methods", type=_method_list, default=list(METHODS), help="methods for --compare")
    run.add_argument("--seed", type=int, default=0, help="seed of a single run")
    run.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="seeds for --compare, e.g. 0,1,2")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    run.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "triton+cuda"),
                     help="fused_window_kl backend")
    run.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    run.add_argument("--cache-dir", type=Path, default=None,
                     help=f"teacher cache (default $TOPD_CACHE_DIR or {default_cache_dir()})")
    run.add_argument("--threads", type=_non_negative_int, default=0, help="CPU threads (0: torch's default)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")

    dist = parser.add_argument_group("distillation")
    dist.add_argument("--steps", type=_positive_int, default=DistillConfig.steps)
    dist.add_argument("--batch-size", type=_positive_int, default=DistillConfig.batch_size)
    dist.add_argument("--lr", type=float, default=DistillConfig.lr)
    dist.add_argument("--temperature", type=float, default=DistillConfig.sample_temperature,
                      help="sampling temperature of the student's rollouts")
    dist.add_argument("--eval-every", type=_positive_int, default=DistillConfig.eval_every)
    dist.add_argument("--window", type=_positive_int, default=MethodSettings.window, help="near-future window k")
    dist.add_argument("--gamma", type=float, default=MethodSettings.gamma, help="window decay")
    dist.add_argument("--loss-threshold", type=_quantile("loss_threshold"),
                      default=MethodSettings.loss_threshold, metavar="Q",
                      help="high-loss threshold: Quantile(Q) of the per-token divergence")
    dist.add_argument("--div-threshold", type=_quantile("div_threshold"), default=MethodSettings.div_threshold,
                      metavar="Q", help="divergent threshold: Quantile(Q) of the window score")
    dist.add_argument("--suppress-weight", type=float, default=MethodSettings.suppress_weight,
                      help="weight of suppressed (high-loss, non-divergent) tokens")
    dist.add_argument("--guidance-weight", type=float, default=MethodSettings.guidance_weight,
                      help="TOPD guidance spread from divergent tokens")
    dist.add_argument("--teacher-topk", type=_positive_int, default=DistillConfig.teacher_topk, metavar="K",
                      help="score rollouts with the teacher's top-K log-probabilities only, as an inference "
                      f"server returns them (a topd_kernels.TopK teacher; K <= {VOCAB_SIZE}, the vocabulary); "
                      "default: its full logits")
    dist.add_argument("--teacher-topk-tail", choices=TOPK_TAILS, default=DistillConfig.teacher_topk_tail,
                      help="TopK tail with --teacher-topk: bucket (the remaining mass of each side is one more "
                      "category) or renormalize (the K ids only, each side renormalised)")

    models = parser.add_argument_group("task and models")
    models.add_argument("--n-ops", type=_positive_int, default=TaskConfig.n_ops, help="operations per problem")
    models.add_argument("--test-size", type=_positive_int, default=TaskConfig.test_size, help="held-out problems")
    models.add_argument("--student-d-model", type=_positive_int, default=StudentConfig.d_model)
    models.add_argument("--student-layers", type=_positive_int, default=StudentConfig.n_layers)
    models.add_argument("--student-sft-steps", type=_non_negative_int, default=StudentConfig.sft_steps,
                        help="supervised steps of the student's start")
    models.add_argument("--teacher-d-model", type=_positive_int, default=TeacherConfig.d_model)
    models.add_argument("--teacher-layers", type=_positive_int, default=TeacherConfig.n_layers)
    models.add_argument("--teacher-style", choices=SEPARATOR_STYLES, default=TeacherConfig.separator_style,
                        help="separator style of the teacher's training solutions (parity: ';' after an even "
                        "result, ',' after an odd one, a confident surface-form preference); the student's "
                        "start always uses random separators")
    models.add_argument("--teacher-steps", type=_positive_int, default=TeacherConfig.max_steps,
                        help="most supervised steps of the teacher (stops early once accurate)")
    return parser


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: CUDA requested but torch.cuda.is_available() is False")
    return device


def configs_from_args(args: argparse.Namespace):
    """(TaskConfig, TeacherConfig, StudentConfig, DistillConfig) from parsed args; ValueError if bad."""
    settings = MethodSettings(args.window, args.gamma, args.loss_threshold, args.div_threshold,
                              args.suppress_weight, args.guidance_weight)
    if args.teacher_topk is not None and args.teacher_topk > VOCAB_SIZE:
        raise ValueError(f"--teacher-topk: must be <= {VOCAB_SIZE} (the vocabulary size), got {args.teacher_topk}")
    distill_config = DistillConfig(args.steps, args.batch_size, args.lr, args.temperature, args.eval_every, settings,
                                   args.teacher_topk, args.teacher_topk_tail)
    task_config = TaskConfig(n_ops=args.n_ops, test_size=args.test_size)
    teacher_config = TeacherConfig(d_model=args.teacher_d_model, n_layers=args.teacher_layers,
                                   max_steps=args.teacher_steps, separator_style=args.teacher_style)
    student_config = StudentConfig(d_model=args.student_d_model, n_layers=args.student_layers,
                                   sft_steps=args.student_sft_steps)
    return task_config, teacher_config, student_config, distill_config


def teacher_scores_label(config: DistillConfig) -> str:
    """What the loss sees of the teacher, in words."""
    if config.teacher_topk is None:
        return "full logits"
    return f"top-{config.teacher_topk} log-probabilities, tail {config.teacher_topk_tail} (TopK)"


def format_table(runs: list[dict], start_accuracy: dict[int, float], teacher_accuracy: float,
                 teacher_scores: str | None = None) -> str:
    """Held-out accuracy per method (rows) and seed (columns), with the mean and the starting points;
    `teacher_scores`, when given, says what the loss saw of the teacher."""
    seeds = sorted({run["seed"] for run in runs})
    methods = list(dict.fromkeys(run["method"] for run in runs))
    final = {(run["method"], run["seed"]): run["final_accuracy"] for run in runs}
    header = f"{'method':<14}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}"
    lines = [header, "-" * len(header)]
    start_row = [start_accuracy[s] for s in seeds]
    lines.append(f"{'(student start)':<14}" + "".join(f"{a:>9.3f}" for a in start_row)
                 + f"{sum(start_row) / len(start_row):>9.3f}")
    for method in methods:
        row = [final[(method, s)] for s in seeds]
        lines.append(f"{method:<14}" + "".join(f"{a:>9.3f}" for a in row) + f"{sum(row) / len(row):>9.3f}")
    lines.append(f"teacher: {teacher_accuracy:.3f} held-out accuracy (greedy, exact final answer)")
    if teacher_scores is not None:
        lines.append(f"teacher scores seen by the loss: {teacher_scores}")
    return "\n".join(lines)


def run(args: argparse.Namespace, configs: tuple, device: torch.device) -> dict:
    """Everything after parsing: teacher, students, runs, log, plot, table. Returns the log dict."""
    task_config, teacher_config, student_config, distill_config = configs
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    methods = args.methods if args.compare else [args.method]
    seeds = args.seeds if args.compare else [args.seed]
    started = time.perf_counter()

    task = ArithmeticTask(task_config)
    teacher, teacher_info = load_or_train_teacher(task, teacher_config, device, args.cache_dir, progress)
    print(f"teacher: {'cached' if teacher_info['cached'] else 'trained'} ({teacher_info['path']}), "
          f"held-out accuracy {teacher_info['test_accuracy']:.3f}", file=sys.stderr)

    runs, start_accuracy = [], {}
    for seed in seeds:
        start = make_student(task, student_config, seed, device, progress)
        for method in methods:
            student = copy.deepcopy(start)
            result = distill(student, teacher, task, method, distill_config, seed, device, args.backend, progress)
            start_accuracy[seed] = result["evals"][0]["accuracy"]
            runs.append(result)

    table = format_table(runs, start_accuracy, teacher_info["test_accuracy"], teacher_scores_label(distill_config))
    log = {
        "task": task_config.to_dict(),
        "teacher": {**teacher_config.__dict__, **teacher_info},
        "student": student_config.to_dict(),
        "distill": distill_config.to_dict(),
        "device": str(device),
        "backend": args.backend,
        "teacher_scores": teacher_scores_label(distill_config),
        "runs": runs,
        "table": table,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log.json").write_text(json.dumps(log, indent=1))
    plot_message = plot_accuracy(runs, args.out / "accuracy.png")
    print(table)
    print(f"log: {args.out / 'log.json'}; {plot_message}; {log['seconds']:.0f}s")
    return log


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    run(args, configs, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
