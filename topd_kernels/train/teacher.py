"""The teacher: trained by supervised learning until accurate, cached on disk keyed by its whole config;
and what the distillation loop receives from it per rollout (`score_rollouts`): its logits, or, as an
inference server returns them, its top-k log-probabilities (`topd_kernels.TopK`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import json
import os
from pathlib import Path
import random

import torch

from topd_kernels import TopK
from topd_kernels.config import TAIL_CODES

from .evaluate import accuracy
from .model import DecoderLM, ModelConfig, build_model
from .progress import Progress
from .supervised import train_supervised
from .task import VOCAB_SIZE, ArithmeticTask

CACHE_FORMAT = 1
TOPK_TAILS = tuple(TAIL_CODES)  # the tails a top-k teacher may have (TopK's `tail`)


def default_cache_dir() -> Path:
    """$TOPD_CACHE_DIR, else ~/.cache/topd_kernels."""
    return Path(os.environ.get("TOPD_CACHE_DIR", Path.home() / ".cache" / "topd_kernels"))


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that decides the teacher's weights: its sizes and its supervised training."""

    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    max_steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    target_accuracy: float = 0.99
    eval_every: int = 100
    seed: int = 0
    separator_style: str = "random"


def teacher_key(task: ArithmeticTask, config: TeacherConfig) -> str:
    """Cache key: a hash of the cache format, the task config and the teacher config."""
    blob = json.dumps(
        {"format": CACHE_FORMAT, "task": task.config.to_dict(), "teacher": asdict(config)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_model_config(task: ArithmeticTask, config: TeacherConfig) -> ModelConfig:
    return ModelConfig(VOCAB_SIZE, task.config.seq_len, config.d_model, config.n_layers, config.n_heads)


def train_teacher(
    task: ArithmeticTask, config: TeacherConfig, device: torch.device, progress: bool = True
) -> tuple[DecoderLM, dict]:
    """Supervised training until validation accuracy reaches `target_accuracy` or `max_steps` run out.

    Returns (model, info) with info = {"steps", "val_accuracy", "test_accuracy"}.
    """
    model = build_model(teacher_model_config(task, config), config.seed).to(device)
    validation = task.sample_problems(256, random.Random(config.seed + 1_000_003))
    bar = Progress(config.max_steps, "teacher", enabled=progress)
    state = {"val_accuracy": 0.0}

    def on_step(step: int, loss: float) -> bool:
        bar.update(loss=round(loss, 4), val_acc=state["val_accuracy"])
        if step % config.eval_every:
            return False
        state["val_accuracy"] = accuracy(model, task, device, validation)
        return state["val_accuracy"] >= config.target_accuracy

    steps = train_supervised(model, task, config.max_steps, config.batch_size, config.lr, config.seed, device,
                             on_step, config.separator_style)
    bar.close()
    model.eval()
    info = {"steps": steps, "val_accuracy": accuracy(model, task, device, validation),
            "test_accuracy": accuracy(model, task, device)}
    return model, info


def load_or_train_teacher(
    task: ArithmeticTask,
    config: TeacherConfig,
    device: torch.device,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[DecoderLM, dict]:
    """The cached teacher for (task, config) if there is one, else a freshly trained one, saved to the cache.

    Returns (model in eval mode with frozen parameters, info) where info also holds "path" and "cached".
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"teacher-{teacher_key(task, config)}.pt"
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=True)
        model = DecoderLM(ModelConfig(**saved["model_config"])).to(device)
        model.load_state_dict(saved["state_dict"])
        info = dict(saved["info"], cached=True)
    else:
        model, info = train_teacher(task, config, device, progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {"model_config": model.config.to_dict(), "state_dict": model.state_dict(), "info": info,
             "task": task.config.to_dict(), "teacher": asdict(config)},
            partial,
        )
        partial.replace(path)
        info = dict(info, cached=False)
    model.eval().requires_grad_(False)
    return model, dict(info, path=str(path))


def top_k_scores(logits: torch.Tensor, k: int, tail: str = "bucket") -> TopK:
    """The teacher's scores of positions as an inference server returns them: its log-softmax (float32, over
    its whole vocabulary, temperature 1) at its k most likely ids, as int32 ids and float32 log-probabilities.

    logits (..., V) -> TopK with tensors (..., k). ValueError unless 1 <= k <= V or if `tail` is unknown.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher top-k: k must be in [1, {vocab}] (the vocabulary size), got {k}")
    if tail not in TOPK_TAILS:
        raise ValueError(f"teacher top-k: tail must be one of {TOPK_TAILS}, got {tail!r}")
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return TopK(ids.to(torch.int32), logprobs, tail=tail)


@torch.no_grad()
def score_rollouts(teacher: torch.nn.Module, tokens: torch.Tensor, top_k: int | None = None,
                   tail: str = "bucket") -> torch.Tensor | TopK:
    """What the loss gets from the teacher for rollouts `tokens` (B, L): its logits (B, L - 1, V) at the
    positions that predict tokens 1..L-1 (top_k None), or their top-`top_k` log-probabilities
    (`top_k_scores`: a TopK of (B, L - 1, top_k) tensors with `tail`)."""
    logits = teacher(tokens[:, :-1])
    return logits if top_k is None else top_k_scores(logits, top_k, tail)
