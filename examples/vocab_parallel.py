"""The loss with a vocabulary-parallel (tensor-parallel) output layer, on CPU processes over gloo:

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Each rank holds its slice of the columns of both models' logits, as a Megatron-style column-parallel output
layer leaves them: rank r holds columns [r * width, (r + 1) * width). The vocabulary (1001 tokens) does not
divide evenly, so the last rank's slice is padded and `vocab_size` says how many global columns are real.
Every rank prints the loss it got and the loss of the single-process call on the whole logits (every rank
can compute that one here because every rank draws the same full logits), and how far the gradient of its
columns is from the matching columns of the single-process gradient.
"""
import torch
import torch.distributed as dist

import topd_kernels

VOCAB, BATCH, LENGTH = 1001, 2, 16
TOPD = dict(window=4, gamma=0.9, loss_threshold=topd_kernels.Quantile(0.8),
            div_threshold=topd_kernels.Quantile(0.5), suppress_weight=0.1, guidance_weight=0.5)


def main() -> None:
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    width = -(-VOCAB // ranks)  # columns per rank, the last one padded

    torch.manual_seed(0)  # the same full logits on every rank
    student_full = torch.randn(BATCH, LENGTH, ranks * width) * 3
    teacher_full = 0.6 * torch.randn(BATCH, LENGTH, ranks * width) * 3 + 0.8 * student_full
    columns = slice(rank * width, (rank + 1) * width)

    student = student_full[..., columns].clone().requires_grad_(True)  # this rank's shard
    loss = topd_kernels.fused_window_kl(student, teacher_full[..., columns].clone(), vocab_size=VOCAB,
                                        vocab_parallel_group=dist.group.WORLD, **TOPD)
    loss.backward()

    whole = student_full.clone().requires_grad_(True)
    single = topd_kernels.fused_window_kl(whole, teacher_full, vocab_size=VOCAB, **TOPD)
    single.backward()
    gap = (student.grad - whole.grad[..., columns]).abs().max().item()
    for turn in range(ranks):  # one rank at a time, so that the lines do not interleave
        if turn == rank:
            print(f"rank {rank}/{ranks}: columns [{columns.start}, {columns.stop}), vocab-parallel loss "
                  f"{loss.item():.6f}, single-process loss {single.item():.6f}, largest gradient difference on "
                  f"its columns {gap:.1e}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
