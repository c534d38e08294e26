"""The student: a smaller transformer given a short supervised start, so that it is imperfect."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .model import DecoderLM, ModelConfig, build_model
from .progress import Progress
from .supervised import train_supervised
from .task import VOCAB_SIZE, ArithmeticTask


@dataclass(frozen=True)
class StudentConfig:
    """The student's sizes and its supervised start."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    sft_steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3

    def __post_init__(self):
        if self.sft_steps < 0:
            raise ValueError(f"student sft_steps must be >= 0, got {self.sft_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_student(
    task: ArithmeticTask, config: StudentConfig, seed: int, device: torch.device, progress: bool = False
) -> DecoderLM:
    """A student initialised from `seed` and trained for `config.sft_steps` supervised steps."""
    model_config = ModelConfig(VOCAB_SIZE, task.config.seq_len, config.d_model, config.n_layers, config.n_heads)
    model = build_model(model_config, seed).to(device)
    if config.sft_steps:
        bar = Progress(config.sft_steps, f"student seed {seed}", enabled=progress)
        train_supervised(model, task, config.sft_steps, config.batch_size, config.lr, seed, device,
                         lambda step, loss: bar.update(loss=round(loss, 4)))
        bar.close()
    return model.eval()
