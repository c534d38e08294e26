"""TOPD in TRL's on-policy `DistillationTrainer` (trl >= 1.16), through `topd_kernels.integrations`
(tiny random Qwen2 models and an in-memory word-level tokenizer, CPU, under a minute). Needs
`pip install 'topd_kernels[integrations]'`.

The student samples completions of the prompts; the mixin replaces TRL's loss by fused_window_kl on them: the
divergence follows TRL's `beta` (0: forward KL, 1: reverse KL, else TRL's generalised JSD; see
`topd_kernels.integrations.from_trl_beta`) and `temperature`, TOPD's window, thresholds and weights come from
`topd_config`, and the loss is divided by TRL's own count of completion tokens over the whole batch. With the
defaults (no thresholds, no guidance) the loss is TRL's. `TOPDGKDTrainer` does the same for
`trl.experimental.gkd.GKDTrainer`, whose batches carry `labels`.
"""
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import DistillationConfig

from topd_kernels import Quantile
from topd_kernels.integrations import TOPDDistillationTrainer

VOCAB = 97


def tiny_qwen(seed: int, layers: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                        initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=1))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """'<pad>' = 0, '<eos>' = 1, 'w2' ... 'w96': one token per word."""
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{i}" for i in torch.randint(2, VOCAB, (int(n),), generator=g).tolist())
               for n in torch.randint(3, 9, (16,), generator=g)]
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.x renames gradient checkpointing
        args = DistillationConfig(output_dir=out, beta=1.0, temperature=1.0, max_completion_length=12,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                                  learning_rate=3e-3, logging_steps=2, report_to=[], use_cpu=True, bf16=False,
                                  save_strategy="no", disable_tqdm=True)
        trainer = TOPDDistillationTrainer(
            model=tiny_qwen(0, layers=1), teacher_model=tiny_qwen(1, layers=2), args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tiny_tokenizer(),
            topd_config=dict(window=4, gamma=0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
                             suppress_weight=0.1, guidance_weight=0.5),
        )
        print("loss keywords:", trainer.topd_loss_keywords)
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}, mean KL {entry['topd/kl']:.4f}, high-loss share "
                  f"{entry['topd/high_loss_share']:.2f}, judged non-divergent {entry['topd/non_divergent_share']:.2f}")


if __name__ == "__main__":
    main()
