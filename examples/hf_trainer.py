"""TOPD in a Hugging Face `transformers.Trainer`, through `topd_kernels.integrations.TOPDDistillationMixin`
(tiny random Qwen2 models from a config, CPU, about half a minute). Needs `pip install 'topd_kernels[integrations]'`.

The batches hold `input_ids`, `attention_mask` and `labels` (-100: prompt and padding). The mixin runs the student
and the frozen teacher, scores position t against labels[t + 1] (the loss does the shift: no copy), divides by the
Trainer's `num_items_in_batch` (so gradient accumulation and DDP give the whole batch's gradient) and logs
topd/kl, topd/high_loss_share and topd/non_divergent_share with the loss.
"""
import tempfile

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

from topd_kernels import Quantile
from topd_kernels.integrations import TOPDDistillationMixin


class TOPDTrainer(TOPDDistillationMixin, Trainer):  # (topd_kernels.integrations.TOPDTrainer is this class)
    pass


def tiny_qwen(seed: int, layers: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, initializer_range=0.2))


def rollouts(n: int, prompt: int = 6):
    """Sequences of different lengths (a prompt and a response, as sampled from the student)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 97, (int(torch.randint(12, 25, (), generator=g)),), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch):
    """Right-pads to the longest sequence of the micro-batch (labels with -100)."""
    n = max(len(e["input_ids"]) for e in batch)
    ids, labels = torch.zeros(len(batch), n, dtype=torch.long), torch.full((len(batch), n), -100)
    attention = torch.zeros(len(batch), n, dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], attention[i, :k] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_steps=6, learning_rate=3e-3, logging_steps=2, report_to=[], use_cpu=True,
                                 save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
        trainer = TOPDTrainer(
            model=tiny_qwen(0, layers=1), teacher_model=tiny_qwen(1, layers=2), args=args,
            train_dataset=rollouts(48), data_collator=collate,
            topd_config=dict(window=4, gamma=0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
                             suppress_weight=0.1, guidance_weight=0.5),
            quantile_group="world",  # under DDP every rank uses the same thresholds (no-op in one process)
        )
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}, mean KL {entry['topd/kl']:.4f}, high-loss share "
                  f"{entry['topd/high_loss_share']:.2f}, judged non-divergent {entry['topd/non_divergent_share']:.2f}")


if __name__ == "__main__":
    main()
