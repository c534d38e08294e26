"""Decoding: student rollouts (sampled or greedy) and the teacher's rewrite of a rollout (TRD).

All prompts of a batch have the same length P (see `task.py`), so rollouts share absolute positions.
A rollout is `tokens` (B, L) long, the prompt then the response, PAD after the response's EOS, and
`response_mask` (B, L) bool, True on generated tokens up to and including EOS.
"""
from __future__ import annotations

import torch

from .task import EOS_ID, PAD_ID


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    start: torch.Tensor,
    total_len: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each row of `tokens` from its own position `start` (B,) up to `total_len` tokens.

    tokens (B, L0) long with L0 >= max(start); entries at and after a row's start are overwritten.
    temperature 0 decodes greedily, > 0 samples from softmax(logits / temperature) with `generator`.
    A row stops after it emits EOS; later positions hold PAD. Returns (tokens (B, total_len),
    response_mask (B, total_len) True from position `start` through the EOS, or to the end).
    """
    batch, first = tokens.shape[0], int(start.min())
    out = torch.full((batch, total_len), PAD_ID, dtype=torch.long, device=tokens.device)
    width = min(tokens.shape[1], total_len)
    out[:, :width] = tokens[:, :width]
    positions = torch.arange(total_len, device=tokens.device)
    out[positions[None, :] >= start[:, None]] = PAD_ID
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    response_mask = torch.zeros(batch, total_len, dtype=torch.bool, device=tokens.device)
    model.eval()
    cache = model.new_cache()
    logits = model(out[:, :first], cache)[:, -1].float()
    for pos in range(first, total_len):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        writing = (pos >= start) & ~finished
        out[:, pos] = torch.where(writing, next_token, out[:, pos])
        response_mask[:, pos] = writing
        finished |= writing & (next_token == EOS_ID)
        if bool(finished.all()) or pos + 1 == total_len:
            break
        logits = model(out[:, pos : pos + 1], cache)[:, -1].float()
    return out, response_mask


def sample_rollouts(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    total_len: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student rollouts from prompts (B, P): (tokens (B, total_len), response_mask (B, total_len))."""
    start = torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.long, device=prompts.device)
    return generate(model, prompts, start, total_len, temperature, generator)


def greedy_rollouts(model: torch.nn.Module, prompts: torch.Tensor, total_len: int):
    """Greedy decoding from prompts (B, P); same outputs as `sample_rollouts`."""
    return sample_rollouts(model, prompts, total_len, temperature=0.0)


def teacher_rewrite(
    teacher: torch.nn.Module,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    divergent: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRD's refinement: the teacher rewrites each rollout from its first divergent prefix.

    divergent (B, L - 1) bool, over logit positions: position t judges the prediction of token t + 1.
    For a row whose first divergent position is t, tokens up to t are kept and the teacher greedily
    decodes from token t + 1 on; rows with no divergent position are returned unchanged.
    Returns (tokens (B, L), response_mask (B, L)) of the refined rollouts.
    """
    batch, length = tokens.shape
    has_fork = divergent.any(dim=1)
    if not bool(has_fork.any()):
        return tokens, response_mask
    first_fork = divergent.float().argmax(dim=1) + 1
    start = torch.where(has_fork, first_fork, torch.full_like(first_fork, length))
    rewritten, rewritten_mask = generate(teacher, tokens, start, length, temperature=0.0)
    prompt_start = response_mask.float().argmax(dim=1)
    positions = torch.arange(length, device=tokens.device)
    kept = (positions[None, :] >= prompt_start[:, None]) & (positions[None, :] < start[:, None])
    return rewritten, (rewritten_mask | kept) & (rewritten != PAD_ID)
