"""topd_kernels.integrations: the loss inside transformers.Trainer and TRL's distillation trainers, on tiny random
Qwen2 models built from a config (CPU, no downloads).

- Trainer: one step with gradient accumulation 1 vs 2 over the same 4 examples (padding differing per
  micro-batch) gives the gradients of an explicit loop over the whole batch; the statistics reach the logs;
  an eval pass; a model whose forward takes no loss kwargs.
- TRL: the step loss and gradients of GKDTrainer / DistillationTrainer with the mixin equal TRL's own for each beta.
- A packed batch (1, N) with position_ids (or cu_seq_lens_q) equals the padded one.
- from_trl_beta: TRL's convention checked numerically both ways; round trips; bad inputs raise.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never reach the Hub (TRL pings it when a trainer starts)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.x renames in TRL's configs

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import topd_kernels  # noqa: E402
from topd_kernels import LossConfig, Quantile, reference  # noqa: E402
from topd_kernels.integrations import (  # noqa: E402
    TOPDDistillationMixin, TOPDTrainer, from_trl_beta, loss_keywords, to_trl_beta)

VOCAB = 97
PAD, EOS = 0, 1
# Float thresholds (in nats, for these models' divergences of about 0.9-1.6): a Quantile would be taken per micro-batch.
TOPD = dict(window=3, gamma=0.8, loss_threshold=1.2, div_threshold=1.15, suppress_weight=0.2, guidance_weight=0.5)
TOPD_QUANTILES = dict(TOPD, loss_threshold=Quantile(0.7), div_threshold=Quantile(0.5))


def tiny_qwen(seed: int, layers: int = 1):
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
                                      initializer_range=0.2)  # the default 0.02 gives near-uniform distributions
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config)


def examples(lengths=(9, 5, 12, 7), prompt=3, seed=0):
    """Token sequences with their prompt masked in the labels (-100), as a SFT / distillation collator leaves them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad_collate(batch):
    """Right-pads to the longest sequence of this micro-batch."""
    n = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), n), PAD)
    labels = torch.full((len(batch), n), -100)
    attention = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k] = torch.as_tensor(e["input_ids"]), torch.as_tensor(e["labels"])
        attention[i, :k] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def pack_collate(batch, flash_kwargs=False):
    """One (1, N) row, position_ids restarting per sequence, -100 at each sequence's first label (as
    transformers.DataCollatorWithFlattening does)."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    return collator([{"input_ids": list(map(int, e["input_ids"])), "labels": list(map(int, e["labels"]))}
                     for e in batch])


class GradCapture(transformers.TrainerCallback):
    """The gradients just before the optimizer step (clipping is off in these tests)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def training_args(tmp_path, batch, accumulation, cls=transformers.TrainingArguments, **extra):
    return cls(output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
               max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1,
               save_strategy="no", remove_unused_columns=False, seed=0, disable_tqdm=True, **extra)


def trainer_step(tmp_path, accumulation, config=None, collate=pad_collate):
    """One TOPDTrainer step over the 4 examples, 4 // accumulation per micro-batch: (gradients, trainer)."""
    student, teacher = tiny_qwen(1), tiny_qwen(2, layers=2)
    capture = GradCapture()
    trainer = TOPDTrainer(model=student, teacher_model=teacher, topd_config=config,
                          args=training_args(tmp_path, 4 // accumulation, accumulation),
                          train_dataset=examples(), data_collator=collate, callbacks=[capture])
    trainer.train()
    return capture.grads, trainer


def loop_grads(config=None):
    """The explicit loop: the whole batch at once, the loss by hand (plain OPD) or by the float64 reference."""
    student, teacher = tiny_qwen(1), tiny_qwen(2, layers=2)
    batch = pad_collate(examples())
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if config is None:  # by hand: mean reverse KL over positions whose next label counts
        mask = batch["labels"][:, 1:] != -100
        log_ps, log_pt = s[:, :-1].log_softmax(-1), t[:, :-1].log_softmax(-1)
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
    else:
        loss = reference.window_kl_reference(s, t, labels=batch["labels"], **config).float()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters()}


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# transformers.Trainer
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, TOPD], ids=["opd", "topd"])
def test_gradient_accumulation_1_vs_2_matches_an_explicit_loop(tmp_path, config):
    """One optimizer step over the same 4 examples, as one micro-batch of 4 or two of 2 (each padded to its own
    longest sequence): the gradients are the explicit loop's, and the logged loss is the whole batch's. (A plain
    per-micro-batch mean would give twice the gradient with 2 micro-batches: the Trainer treats a loss as already
    scaled when the model takes loss kwargs.)"""
    grads_1, trainer_1 = trainer_step(tmp_path / "ga1", 1, config)
    grads_2, trainer_2 = trainer_step(tmp_path / "ga2", 2, config)
    loss_loop, grads_loop = loop_grads(config)
    assert_grads_close(grads_1, grads_loop)
    assert_grads_close(grads_2, grads_loop)
    for trainer in (trainer_1, trainer_2):
        logged = trainer.state.log_history[0]
        assert logged["loss"] == pytest.approx(loss_loop.item(), rel=1e-5)
        assert trainer.loss_is_scaled_for_ga  # divided by num_items_in_batch: the Trainer must not divide again


def batch_statistics(config=None) -> dict:
    """What the mixin should log for one step over the 4 examples: the statistics of the whole batch."""
    student, teacher = tiny_qwen(1), tiny_qwen(2, layers=2)
    batch = pad_collate(examples())
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _, stats = topd_kernels.fused_window_kl(s, t, labels=batch["labels"], return_stats=True, **(config or {}))
    valid = (batch["labels"][:, 1:] != -100).sum().item()
    high = stats.high_loss.sum().item()
    out = {"topd/kl": stats.kl.sum().item() / valid, "topd/high_loss_share": high / valid,
           "topd/non_divergent_share": (stats.high_loss & ~stats.divergent).sum().item() / high if high else 0.0}
    if hasattr(stats, "entropy"):
        out["topd/entropy"] = stats.entropy.sum().item() / valid
    return out


def test_logged_statistics_are_the_batch_s(tmp_path):
    _, trainer = trainer_step(tmp_path, 2, TOPD)
    expected = batch_statistics(TOPD)
    assert 0 < expected["topd/high_loss_share"] < 1  # the thresholds make a mix, so the shares mean something
    assert 0 < expected["topd/non_divergent_share"] < 1
    logged = trainer.state.log_history[0]
    assert {k for k in logged if k.startswith("topd/")} == set(expected)
    for key in expected:
        assert logged[key] == pytest.approx(expected[key], rel=1e-4), key


class NoLossKwargs(torch.nn.Module):
    """A causal LM whose forward takes no loss kwargs (the Trainer would not count num_items_in_batch for it)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def test_model_without_loss_kwargs_still_gets_the_whole_batch_count(tmp_path):
    """Trainer counts num_items_in_batch only for models that take loss kwargs; the mixin makes it count anyway, so
    micro-batches of different sizes are still weighted by tokens."""
    capture = GradCapture()
    trainer = TOPDTrainer(model=NoLossKwargs(tiny_qwen(1)), teacher_model=tiny_qwen(2, layers=2),
                          args=training_args(tmp_path, 2, 2), train_dataset=examples(), data_collator=pad_collate,
                          callbacks=[capture])
    trainer.train()
    _, grads_loop = loop_grads()
    assert_grads_close({k.removeprefix("inner."): v for k, v in capture.grads.items()}, grads_loop)


def test_eval_logs_the_statistics_with_the_eval_prefix(tmp_path):
    trainer = TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2, layers=2), topd_config=TOPD,
                          args=training_args(tmp_path, 2, 1, per_device_eval_batch_size=4),
                          eval_dataset=examples(), data_collator=pad_collate)
    metrics = trainer.evaluate()
    loss, _ = loop_grads(TOPD)
    assert metrics["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)  # one eval batch: the whole batch's loss
    expected = batch_statistics(TOPD)
    for key in expected:
        assert metrics[f"eval_{key}"] == pytest.approx(expected[key], rel=1e-4), key
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert not trainer.teacher_model.training


# ---------------------------------------------------------------------------------------------------------
# Packed batches
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_batch_equals_the_padded_one(tmp_path, flash_kwargs):
    grads_padded, padded = trainer_step(tmp_path / "padded", 1, TOPD)
    grads_packed, packed = trainer_step(tmp_path / "packed", 1, TOPD,
                                        collate=lambda b: pack_collate(b, flash_kwargs))
    assert packed.state.log_history[0]["loss"] == pytest.approx(padded.state.log_history[0]["loss"], rel=1e-5)
    assert_grads_close(grads_packed, grads_padded)
    for key in ("topd/kl", "topd/high_loss_share", "topd/non_divergent_share"):
        assert packed.state.log_history[0][key] == pytest.approx(padded.state.log_history[0][key], rel=1e-5)


def test_packed_compute_loss_equals_padded_compute_loss(tmp_path):
    trainer = TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2, layers=2), topd_config=TOPD,
                          args=training_args(tmp_path, 4, 1), data_collator=pad_collate)
    batch = examples()
    count = sum(int((e["labels"][1:] != -100).sum()) for e in batch)
    padded = trainer.compute_loss(trainer.model, pad_collate(batch), num_items_in_batch=torch.tensor(count))
    packed_batch = pack_collate(batch)
    assert packed_batch["input_ids"].shape[0] == 1 and "position_ids" in packed_batch
    packed = trainer.compute_loss(trainer.model, packed_batch, num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A word-level tokenizer over VOCAB ids ('<pad>', '<eos>', 'w2' ... 'w96'), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                padding_side="left")


def trl_dataset():
    from datasets import Dataset

    return Dataset.from_list([{k: v.tolist() for k, v in e.items()} for e in examples()])


def gkd_trainer(cls, tmp_path, beta, config=None):
    from trl.experimental.gkd import GKDConfig

    # fp32 (TRL's configs default to bf16 autocast, under which TRL's and our arithmetic round differently)
    args = training_args(tmp_path, 4, 1, cls=GKDConfig, beta=beta, lmbda=0.0, seq_kd=False, max_length=32,
                         bf16=False)
    kwargs = {} if cls.__module__.startswith("trl") else {"topd_config": config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=tiny_qwen(1), teacher_model=tiny_qwen(2, layers=2), args=args, train_dataset=trl_dataset(),
                   data_collator=pad_collate, processing_class=tiny_tokenizer(), **kwargs)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gkd_trainer_step_equals_trl_s_own(tmp_path, beta):
    from trl.experimental.gkd import GKDTrainer
    from topd_kernels.integrations import TOPDGKDTrainer

    batch = pad_collate(examples())
    count = (batch["labels"][:, 1:] != -100).sum()
    results = []
    for cls in (GKDTrainer, TOPDGKDTrainer):
        trainer = gkd_trainer(cls, tmp_path / cls.__name__, beta)
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=count)
        results.append((loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (trl_loss, trl_grads), (our_loss, our_grads) = results
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert_grads_close(our_grads, trl_grads)


def distillation_trainer(cls, tmp_path, beta, temperature=1.0):
    from datasets import Dataset
    from trl import DistillationConfig

    args = training_args(tmp_path, 4, 1, cls=DistillationConfig, beta=beta, temperature=temperature,
                         max_completion_length=6, bf16=False)  # fp32, as in gkd_trainer
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in range(3 + k, 8 + 2 * k)) for k in range(4)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=tiny_qwen(1), teacher_model=tiny_qwen(2, layers=2), args=args, train_dataset=prompts,
                   processing_class=tiny_tokenizer())


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 0.7), (1.0, 1.3)])
def test_distillation_trainer_loss_equals_trl_s_own(tmp_path, beta, temperature):
    from trl import DistillationTrainer
    from topd_kernels.integrations import TOPDDistillationTrainer

    theirs = distillation_trainer(DistillationTrainer, tmp_path / "trl", beta, temperature)
    ours = distillation_trainer(TOPDDistillationTrainer, tmp_path / "ours", beta, temperature)
    assert ours.topd_loss_keywords == {**from_trl_beta(beta), "temperature": temperature}
    theirs.model.train()
    torch.manual_seed(0)
    inputs = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))  # generate the completions once
    assert inputs["completion_mask"].sum() > 4
    results = []
    for trainer in (theirs, ours):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (trl_loss, trl_grads), (our_loss, our_grads) = results
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert_grads_close(our_grads, trl_grads)
    assert ours.loss_is_scaled_for_ga


def test_distillation_trainer_trains_a_step_with_the_mixin(tmp_path):
    from topd_kernels.integrations import TOPDDistillationTrainer

    from trl import DistillationConfig
    from datasets import Dataset

    args = training_args(tmp_path, 2, 2, cls=DistillationConfig, max_completion_length=5)
    prompts = Dataset.from_dict({"prompt": ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11", "w12"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TOPDDistillationTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2, layers=2), args=args,
                                          train_dataset=prompts, processing_class=tiny_tokenizer(), topd_config=TOPD)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logged["loss"])) and "topd/kl" in logged


# ---------------------------------------------------------------------------------------------------------
# from_trl_beta
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0, 1])
def test_from_trl_beta_equals_trl_s_generalized_jsd(beta):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 50, generator=g) * 2, torch.randn(2, 6, 50, generator=g) * 2
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[0, :2] = -100
    theirs = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=labels[:, 1:], beta=beta)
    ours = topd_kernels.fused_window_kl(s, t, labels=labels, **from_trl_beta(beta))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    if 0 < beta < 1 and beta != 0.5:  # the convention is not the mirrored one
        mirrored = topd_kernels.fused_window_kl(s, t, labels=labels, divergence="jsd", beta=1 - beta)
        assert not torch.allclose(mirrored, theirs, rtol=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_from_trl_beta_round_trips(beta):
    keywords = from_trl_beta(beta)
    assert set(keywords) == {"divergence", "beta"}
    assert to_trl_beta(**keywords) == beta
    LossConfig(**keywords)  # valid keywords of the loss
    assert from_trl_beta(to_trl_beta(**keywords)) == keywords
    assert to_trl_beta("forward_kl") == 0.0 and to_trl_beta("reverse_kl") == 1.0


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta,error,message", [
    (-0.1, ValueError, "beta must be in [0, 1]"),
    (1.5, ValueError, "beta must be in [0, 1]"),
    (float("nan"), ValueError, "beta must be in [0, 1]"),
    ("0.5", TypeError, "beta must be a number"),
    (True, TypeError, "beta must be a number"),
])
def test_from_trl_beta_bad_input(beta, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_trl_beta(beta)


@pytest.mark.parametrize("divergence,beta,error,message", [
    ("jsd", None, ValueError, "jsd needs its beta"),
    ("jsd", 1.0, ValueError, "beta"),
    ("kl", None, ValueError, "unknown divergence"),
])
def test_to_trl_beta_bad_input(divergence, beta, error, message):
    with pytest.raises(error, match=message):
        to_trl_beta(divergence, beta)


@pytest.mark.parametrize("config,error,message", [
    ({"num_items": 10}, ValueError, "num_items comes from the trainer"),
    ({"reduction": "sum"}, ValueError, "reduction must be 'mean'"),
    ({"window": 0}, ValueError, "window: must be >= 1"),
    ({"divergence": "jsd", "beta": 1.0}, ValueError, "beta: must be in"),
    ({"windw": 4}, TypeError, "unknown key"),
    ({"backend": 3}, TypeError, "backend must be a string"),
    ([("window", 4)], TypeError, "expected None, a dict or a topd_kernels.LossConfig"),
])
def test_bad_config_is_refused_at_construction(tmp_path, config, error, message):
    with pytest.raises(error, match=message):
        TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2), topd_config=config,
                    args=training_args(tmp_path, 2, 1), data_collator=pad_collate)


@pytest.mark.parametrize("group,error,message", [
    ("wrld", ValueError, "quantile_group: expected None, 'world' or a process group"),
    (3, TypeError, "quantile_group: expected None, 'world' or a torch.distributed process group"),
])
def test_bad_quantile_group_is_refused(tmp_path, group, error, message):
    with pytest.raises(error, match=message):
        TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2), topd_config=TOPD_QUANTILES, quantile_group=group,
                    args=training_args(tmp_path, 2, 1), data_collator=pad_collate)


def test_quantile_group_world_in_one_process_changes_nothing(tmp_path):
    trainer = TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2), topd_config=TOPD_QUANTILES,
                          quantile_group="world", args=training_args(tmp_path, 2, 1), data_collator=pad_collate)
    assert trainer.topd_loss_keywords["loss_threshold"] == Quantile(0.7)


def test_loss_keywords():
    assert loss_keywords() == {}
    assert loss_keywords(LossConfig(window=4))["window"] == 4
    assert loss_keywords(None, trl_beta=0.0) == {"divergence": "forward_kl", "beta": 0.0}
    assert loss_keywords({"divergence": "reverse_kl"}, trl_beta=0.5) == {"divergence": "reverse_kl"}
    assert loss_keywords({"window": 2}, trl_beta=0.5, trl_temperature=0.9) == {
        "divergence": "jsd", "beta": 0.5, "temperature": 0.9, "window": 2}
    assert loss_keywords({"loss_threshold": Quantile(0.8)})["loss_threshold"] == Quantile(0.8)


def test_missing_teacher_and_missing_labels(tmp_path):
    with pytest.raises(ValueError, match="teacher_model is required"):
        TOPDTrainer(model=tiny_qwen(1), args=training_args(tmp_path, 2, 1))
    trainer = TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2), args=training_args(tmp_path, 2, 1))
    batch = pad_collate(examples()[:2])
    del batch["labels"]
    with pytest.raises(ValueError, match="has no 'labels'"):
        trainer.compute_loss(trainer.model, batch)


def test_data_parallel_in_one_process_is_refused(tmp_path):
    args = training_args(tmp_path, 2, 1)
    assert args.n_gpu <= 1
    args._n_gpu = 2  # what TrainingArguments sets with several visible GPUs and no launcher
    with pytest.raises(ValueError, match="nn.DataParallel"):
        TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2), args=args, data_collator=pad_collate)


def test_trainer_with_a_trl_beta_and_a_config_that_disagrees_warns(tmp_path):
    from topd_kernels.integrations import TOPDGKDTrainer
    from trl.experimental.gkd import GKDConfig

    args = training_args(tmp_path, 4, 1, cls=GKDConfig, beta=0.5, lmbda=0.0, max_length=32)
    with pytest.warns(UserWarning, match="overrides the trainer's beta=0.5"):
        TOPDGKDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2), args=args, train_dataset=trl_dataset(),
                       data_collator=pad_collate, processing_class=tiny_tokenizer(),
                       topd_config={"divergence": "reverse_kl"})


def test_package_imports_without_transformers_and_integrations_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import topd_kernels, topd_kernels.train.plot\n"
            "try:\n    import topd_kernels.integrations\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs transformers" in out.stdout and "pip install 'topd_kernels[integrations]'" in out.stdout


def test_integrations_import_without_trl_and_trl_classes_name_the_extra():
    code = ("import sys; sys.modules['trl'] = None\n"
            "from topd_kernels.integrations import TOPDTrainer, from_trl_beta\n"
            "try:\n    from topd_kernels.integrations import TOPDDistillationTrainer\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TOPDDistillationTrainer needs trl" in out.stdout and "topd_kernels[integrations]" in out.stdout


def test_mixin_is_a_mixin():
    assert issubclass(TOPDTrainer, TOPDDistillationMixin) and issubclass(TOPDTrainer, transformers.Trainer)


# ---------------------------------------------------------------------------------------------------------
# Data parallel: two CPU processes over gloo
# ---------------------------------------------------------------------------------------------------------
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}


# (name, config, quantile_group, per-device batch, accumulation steps): 4 examples over 2 ranks
DDP_CASES = [("opd", None, None, 1, 2), ("topd", TOPD, None, 1, 2), ("quantiles", TOPD_QUANTILES, "world", 2, 1)]


def _ddp_worker(out_dir: str) -> None:
    """One rank of `torchrun --nproc-per-node 2 tests/test_integrations.py ddp OUT`: per case of DDP_CASES a Trainer
    step over the 4 examples; rank 0 saves the gradients and the logs."""
    import pathlib

    import torch.distributed as dist

    saved = {}
    for name, config, group, per_device, accumulation in DDP_CASES:
        capture = GradCapture()
        args = training_args(pathlib.Path(out_dir) / name, per_device, accumulation, ddp_backend="gloo")
        trainer = TOPDTrainer(model=tiny_qwen(1), teacher_model=tiny_qwen(2, layers=2), topd_config=config,
                              quantile_group=group, args=args, train_dataset=examples(), data_collator=pad_collate,
                              callbacks=[capture])
        assert trainer.args.world_size == 2 and trainer.args.average_tokens_across_devices
        trainer.train()
        saved[name] = {"grads": capture.grads, "log": trainer.state.log_history[0]}
    if dist.get_rank() == 0:
        torch.save(saved, pathlib.Path(out_dir) / "rank0.pt")


def test_ddp_two_processes_match_the_single_process_loop(tmp_path):
    """Under DDP with average_tokens_across_devices, num_items_in_batch is the count over both ranks and DDP averages
    the gradients: the mixin divides the count by the world size (without it the gradients come out halved), so
    the step is the whole batch's. The logged statistics are reduced over the ranks. With quantile_group="world"
    and one micro-batch per rank, Quantile thresholds are the whole batch's, as in one process."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, "ddp",
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **LOOPBACK})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    saved = torch.load(tmp_path / "rank0.pt")
    for name, config, *_ in DDP_CASES:
        loss, grads = loop_grads(config)
        assert_grads_close(saved[name]["grads"], grads)
        log = saved[name]["log"]
        assert log["loss"] == pytest.approx(loss.item(), rel=1e-5)  # the mean over ranks of their losses
        expected = batch_statistics(config)
        for key in expected:
            assert log[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7), key


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    _ddp_worker(sys.argv[2])
