"""A teacher known only by its top-k log-probabilities per position, as an inference server (vLLM, SGLang, TGI)
returns them, in `topd_kernels.TopK` (tiny random Qwen2 models, CPU, seconds).

The server scores the student's rollout and sends, per position, k token ids and their log-probabilities
(normalised over the teacher's whole vocabulary). With tail="bucket" (the default) the loss compares the two
models over those k tokens plus one "everything else" category (each side's remaining mass), which keeps a top-k
reverse KL a divergence: the student cannot lower it by moving mass off the teacher's top k. A server that
returns fewer than k entries somewhere pads with logprob -inf (the id is then ignored).
"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import topd_kernels
from topd_kernels import TopK

VOCAB, K = 97, 8


def tiny_qwen(seed: int, layers: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                        initializer_range=0.2))


def server_top_k(input_ids: torch.Tensor, k: int) -> tuple[list, list]:
    """Stands in for the inference server: per sequence and position, k (token id, logprob) pairs, as lists."""
    teacher = tiny_qwen(1, layers=2).eval()
    with torch.no_grad():
        logprobs = teacher(input_ids=input_ids, use_cache=False).logits.log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids.tolist(), values.tolist()


def main() -> None:
    student = tiny_qwen(0, layers=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (4, 20))
    labels = input_ids.clone()
    labels[:, :6] = -100  # the prompt is not scored

    ids, logprobs = server_top_k(input_ids, K)                  # what comes back over the network
    ids, logprobs = torch.tensor(ids), torch.tensor(logprobs)  # (B, T, K) int64 and float32
    logprobs[0, 10, K // 2:] = float("-inf")                   # a position where the server sent only K/2 entries
    teacher = TopK(ids, logprobs, tail="bucket")

    for step in range(15):
        logits = student(input_ids=input_ids, use_cache=False).logits
        loss, stats = topd_kernels.fused_window_kl(logits, teacher, labels=labels, window=4,
                                                   loss_threshold=topd_kernels.Quantile(0.8), suppress_weight=0.1,
                                                   guidance_weight=0.5, return_stats=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == 14:
            print(f"step {step:2d}  top-{K} reverse KL with a tail bucket: loss {loss.item():.4f}, "
                  f"high-loss positions {stats.high_loss.sum().item()}")

    # With k = V the top-k teacher is the whole teacher: the loss is the full-vocabulary one.
    ids_all, logprobs_all = server_top_k(input_ids, VOCAB)
    with torch.no_grad():
        logits = student(input_ids=input_ids, use_cache=False).logits
        teacher_logits = tiny_qwen(1, layers=2).eval()(input_ids=input_ids, use_cache=False).logits
        full = topd_kernels.fused_window_kl(logits, teacher_logits, labels=labels)
        top_all = topd_kernels.fused_window_kl(logits, TopK(torch.tensor(ids_all), torch.tensor(logprobs_all)),
                                               labels=labels)
    print(f"k = V: top-k loss {top_all.item():.6f}, full-vocabulary loss {full.item():.6f}")


if __name__ == "__main__":
    main()
