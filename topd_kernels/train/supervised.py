"""Supervised training on correct worked solutions (the teacher's training, the student's short start)."""
from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F

from .task import ArithmeticTask


def supervised_loss(model: torch.nn.Module, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Mean cross-entropy of the response tokens of sequences (B, L); the prompt is not scored."""
    logits = model(sequences[:, :-1])
    targets = sequences[:, 1:].clone()
    targets[:, : prompt_len - 1] = -100
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def train_supervised(
    model: torch.nn.Module,
    task: ArithmeticTask,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    on_step: Callable[[int, float], bool] | None = None,
    style: str = "random",
) -> int:
    """AdamW with linear warm-up and cosine decay on freshly drawn problems for up to `steps` steps.

    `on_step(step, loss)` is called after every step; returning True stops early. Returns the number of
    steps taken. Deterministic given `seed` (problem draws and solution separators). `style`: the
    solutions' separator style (see `task.py`).
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    prompt_len = task.config.prompt_len
    for step in range(1, steps + 1):
        model.train()
        sequences = task.encode_solutions(task.sample_problems(batch_size, rng), rng, style).to(device)
        loss = supervised_loss(model, sequences, prompt_len)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None and on_step(step, loss.item()):
            return step
    return steps
