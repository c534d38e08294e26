"""The reference training loop: on-policy distillation (OPD, OPD-filter, TOPD, TRD) of a small
transformer on a synthetic step-by-step arithmetic task, with the loss from `topd_kernels.fused_window_kl`.

Modules: `task` (problems, tokens, scoring), `model` (decoder-only transformer), `supervised` (SFT),
`teacher` (trained once, cached on disk), `student` (short supervised start), `rollout` (sampling,
greedy decoding, TRD's teacher rewrite), `methods` (each method as `fused_window_kl` keywords),
`loop` (the distillation loop), `evaluate`, `plot`, `progress`, `cli` (`topd-train`).
"""
