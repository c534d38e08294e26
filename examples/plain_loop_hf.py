"""On-policy distillation in a plain PyTorch loop with Hugging Face models (tiny random Qwen2s here, CPU, seconds).

The batch's `labels` say which tokens are scored (-100: prompt and padding); the logits at position t predict token
t + 1, and `fused_window_kl(..., labels=labels)` does that shift itself: pass the unshifted logits, nothing is copied.
"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import topd_kernels
from topd_kernels import Quantile


def tiny_qwen(seed: int, layers: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, initializer_range=0.2))


student, teacher = tiny_qwen(0, layers=1), tiny_qwen(1, layers=2).eval().requires_grad_(False)
optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
TOPD = dict(window=4, gamma=0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
            suppress_weight=0.1, guidance_weight=0.5)

torch.manual_seed(2)
input_ids = torch.randint(0, 97, (4, 24))           # prompt (8 tokens) + a sampled response, right-padded
attention_mask = torch.ones_like(input_ids)
attention_mask[1, 18:] = attention_mask[3, 12:] = 0
labels = input_ids.masked_fill(attention_mask == 0, -100)
labels[:, :8] = -100                                  # the prompt is not scored

for step in range(20):
    logits = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    loss, stats = topd_kernels.fused_window_kl(logits, teacher_logits, labels=labels, return_stats=True, **TOPD)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == 19:
        valid = labels[:, 1:] != -100
        print(f"step {step:2d}  loss {loss.item():.4f}  mean KL {stats.kl.sum().item() / valid.sum().item():.4f}  "
              f"high-loss {stats.high_loss.sum().item()}  divergent {stats.divergent.sum().item()}")
