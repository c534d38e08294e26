"""Held-out evaluation: greedy decoding and exact final answers."""
from __future__ import annotations

import torch

from .rollout import greedy_rollouts
from .task import ArithmeticTask, Problem


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    task: ArithmeticTask,
    device: torch.device,
    problems: list[Problem] | None = None,
    batch_size: int = 256,
) -> float:
    """Share in [0, 1] of `problems` (default: the task's test set) answered exactly under greedy decoding."""
    problems = task.test_problems if problems is None else problems
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        tokens, _ = greedy_rollouts(model, task.encode_prompts(chunk).to(device), task.config.seq_len)
        correct += int(task.score(chunk, tokens.cpu()).sum())
    return correct / max(len(problems), 1)
