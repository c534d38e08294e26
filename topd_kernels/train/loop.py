"""The on-policy distillation loop: sample, score with the teacher, `fused_window_kl`, optimiser step.

The teacher scores each rollout with its full logits, or (`DistillConfig.teacher_topk`) with its top-k
log-probabilities only, as an inference server returns them: both the divergence test and the loss then
see a `topd_kernels.TopK` teacher (`teacher.score_rollouts`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import random
import time
from typing import Optional

import torch

from topd_kernels import fused_window_kl

from .evaluate import accuracy
from .methods import MethodSettings, detection_kwargs, loss_kwargs, masked_mean, nondivergent_share, rewrites_rollouts
from .progress import Progress
from .rollout import sample_rollouts, teacher_rewrite
from .task import ArithmeticTask
from .teacher import TOPK_TAILS, score_rollouts


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run's hyperparameters (the method is passed separately)."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    sample_temperature: float = 1.0
    eval_every: int = 50
    settings: MethodSettings = field(default_factory=MethodSettings)
    teacher_topk: Optional[int] = None  # None: the teacher's full logits; K: its top-K log-probabilities only
    teacher_topk_tail: str = "bucket"   # the TopK tail with teacher_topk: "bucket" or "renormalize"

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.teacher_topk is not None and (isinstance(self.teacher_topk, bool) or self.teacher_topk < 1):
            raise ValueError(f"teacher_topk must be None or >= 1, got {self.teacher_topk}")
        if self.teacher_topk_tail not in TOPK_TAILS:
            raise ValueError(f"teacher_topk_tail must be one of {TOPK_TAILS}, got {self.teacher_topk_tail!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.sample_temperature <= 0:
            raise ValueError(f"sample_temperature must be > 0, got {self.sample_temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def distill_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    task: ArithmeticTask,
    method: str,
    config: DistillConfig,
    rng: random.Random,
    generator: torch.Generator,
    device: torch.device,
    backend: str,
) -> dict:
    """One on-policy step on a fresh batch of problems; returns its log record.

    Shapes: rollouts (B, L); logits (B, L - 1, V) where position t predicts token t + 1; the loss mask
    (B, L - 1) marks the positions that predict a response token. With `config.teacher_topk` K the
    teacher's side is a TopK of (B, L - 1, K) tensors instead of its logits, for the test and the loss.
    """
    problems = task.sample_problems(config.batch_size, rng)
    prompts = task.encode_prompts(problems).to(device)
    tokens, response_mask = sample_rollouts(student, prompts, task.config.seq_len, config.sample_temperature, generator)
    rollout_correct = task.score(problems, tokens.cpu()).float().mean().item()

    def score(rollouts):
        return score_rollouts(teacher, rollouts, config.teacher_topk, config.teacher_topk_tail)

    with torch.no_grad():
        student.eval()
        teacher_scores = score(tokens)
        student_logits = student(tokens[:, :-1])
        rollout_mask = response_mask[:, 1:]
        _, detection = fused_window_kl(
            student_logits, teacher_scores, mask=rollout_mask, return_stats=True, backend=backend,
            **detection_kwargs(config.settings),
        )
        if rewrites_rollouts(method):
            # the teacher decodes the rewrite itself (greedy: its top-1, which a top-k server returns too)
            tokens, response_mask = teacher_rewrite(teacher, tokens, response_mask, detection.divergent)
            teacher_scores = score(tokens)

    student.train()
    loss_mask = response_mask[:, 1:]
    loss, stats = fused_window_kl(
        student(tokens[:, :-1]), teacher_scores, mask=loss_mask, return_stats=True, backend=backend,
        **loss_kwargs(method, config.settings),
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    return {
        "loss": loss.item(),
        "mean_kl": masked_mean(stats.kl, loss_mask),
        "rollout_kl": masked_mean(detection.kl, rollout_mask),
        "nondivergent_share": nondivergent_share(detection),
        "weight_mean": masked_mean(stats.weight, loss_mask),
        "rollout_accuracy": rollout_correct,
    }


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    task: ArithmeticTask,
    method: str,
    config: DistillConfig,
    seed: int,
    device: torch.device,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Train `student` in place for `config.steps` on-policy steps of `method`.

    Evaluates held-out greedy accuracy at step 0, every `eval_every` steps and at the end. Returns
    {"method", "seed", "steps": [per-step records], "evals": [{"step", "accuracy"}], "final_accuracy",
    "seconds"}. Deterministic given `seed` and the starting weights (on one device and backend).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    evals = [{"step": 0, "accuracy": accuracy(student, task, device)}]
    records = []
    bar = Progress(config.steps, f"{method} seed {seed}", enabled=progress)
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        record = distill_step(student, teacher, optimizer, task, method, config, rng, generator, device, backend)
        records.append(dict(step=step, **record))
        if step % config.eval_every == 0 or step == config.steps:
            evals.append({"step": step, "accuracy": accuracy(student, task, device)})
        bar.update(loss=record["loss"], kl=record["mean_kl"], acc=evals[-1]["accuracy"])
    bar.close()
    return {
        "method": method,
        "seed": seed,
        "steps": records,
        "evals": evals,
        "final_accuracy": evals[-1]["accuracy"],
        "seconds": time.perf_counter() - started,
    }
