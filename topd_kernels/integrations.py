"""The loss inside the trainers people already run: Hugging Face `transformers.Trainer` and TRL's distillation
trainers (`trl.DistillationTrainer`, `trl.experimental.gkd.GKDTrainer`).

    from transformers import Trainer
    from topd_kernels.integrations import TOPDDistillationMixin

    class MyTrainer(TOPDDistillationMixin, Trainer):
        pass

    trainer = MyTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                        data_collator=collator, topd_config=dict(window=8, loss_threshold=Quantile(0.8), ...))

or `TOPDTrainer` (that class), `TOPDDistillationTrainer` (trl.DistillationTrainer with the mixin) and
`TOPDGKDTrainer` (trl.experimental.gkd.GKDTrainer with the mixin).

Needs the `integrations` extra (`pip install 'topd_kernels[integrations]'`: transformers, and trl for TRL's
trainers). `from_trl_beta` / `to_trl_beta` map TRL's generalised-JSD `beta` to this package's keywords and back.

What the mixin's `compute_loss` does, per micro-batch:
- runs the student, and the teacher (eval mode, no grad), on the batch's model inputs with `use_cache=False`;
- passes the unshifted logits with the batch's `labels` (`ignore_index=-100`): position t counts when
  `labels[t + 1] != -100` within its sequence, so no logits are copied and no mask is built by hand. A packed
  batch ((1, N) inputs) takes its sequence boundaries from `cu_seq_lens_q` when the collator gives them
  (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`), else from `position_ids` (read on the host);
- divides by `num_items_in_batch` (the Trainer's count of valid tokens over the whole accumulated batch; a
  tensor, never read on the host), divided by the number of data-parallel processes when
  `average_tokens_across_devices` is on (the count is then global and DDP averages the gradients), exactly as
  `Trainer.compute_loss` scales a model's own loss; it makes the Trainer count items whatever the model's
  `forward` accepts, and tells `training_step` whether the loss is already scaled for gradient accumulation;
- with `quantile_group="world"`, takes `Quantile` thresholds over the valid tokens of every data-parallel process
  (micro-batches of one accumulated batch still take their own);
- accumulates the statistics (mean divergence over valid tokens, share of high-loss tokens, share of those
  judged non-divergent, the student's entropy when the loss returns it) on the device and logs them through the
  trainer's `log` under `topd/...` keys (one reduction over processes per logging step).
Under TRL's `DistillationTrainer` it takes the generated batch (prompt and completion ids, completion mask, the
trainer's own global token count) and, under both TRL trainers, the divergence from the trainer's `beta`
(`from_trl_beta`) unless the config names one (and `DistillationTrainer`'s `temperature`, which TRL applies to
the divergence; `GKDTrainer` does not apply its temperature to the loss, so neither does the mixin).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Any, Mapping, Optional, Union

_EXTRA = "pip install 'topd_kernels[integrations]'"
try:
    import transformers
except ImportError as error:  # exercised by a subprocess test
    raise ImportError("topd_kernels.integrations needs transformers (and trl for TRL's trainers); install the "
                      f"extra: {_EXTRA}") from error
from packaging.version import Version

if Version(transformers.__version__) < Version("5.19"):  # Trainer.loss_is_scaled_for_ga, read by training_step
    raise ImportError(f"topd_kernels.integrations needs transformers >= 5.19, found {transformers.__version__}: "
                      f"{_EXTRA}")

import torch

from .config import KNOBS, LossConfig, Quantile
from .functional import fused_window_kl
from .layout import cu_seqlens_from_position_ids

# Also TOPDDistillationTrainer and TOPDGKDTrainer (TRL's trainers with the mixin), made on first access (they need trl).
__all__ = ["TOPDDistillationMixin", "TOPDTrainer", "from_trl_beta", "to_trl_beta", "loss_keywords"]

IGNORE_INDEX = -100  # the Trainer counts num_items_in_batch with this ignore index
# Keys of a batch that are never a model input (labels are the loss's, the rest TRL collators' bookkeeping).
_NOT_MODEL_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch", "prompts", "prompt_attention_mask"})
# Packed-sequence keyword arguments of HF attention (DataCollatorWithFlattening), passed to a forward with **kwargs.
_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_EXTRA_KEYS = ("backend",)  # keywords of the loss a config may hold besides LossConfig's knobs


# ---------------------------------------------------------------------------------------------------------
# TRL's beta
# ---------------------------------------------------------------------------------------------------------
def from_trl_beta(beta: float) -> dict:
    """This package's `divergence` and `beta` for TRL's generalised-JSD `beta` (GKDTrainer, DistillationTrainer).

    TRL (`GKDTrainer.generalized_jsd_loss`, `trl/kernels/chunked_divergence.py`): beta = 0 is the forward KL
    KL(teacher || student), beta = 1 the reverse KL KL(student || teacher), and 0 < beta < 1 the generalised JSD
    `beta KL(p_t || m) + (1 - beta) KL(p_s || m)` with `m = (1 - beta) p_s + beta p_t`, which is this package's
    `jsd` with the same beta (docs/SPEC.md). The returned beta is TRL's (ignored by the two KLs), so
    `to_trl_beta(**from_trl_beta(b)) == b`.

        >>> from_trl_beta(0.0)
        {'divergence': 'forward_kl', 'beta': 0.0}
        >>> from_trl_beta(1.0)
        {'divergence': 'reverse_kl', 'beta': 1.0}
        >>> from_trl_beta(0.5)
        {'divergence': 'jsd', 'beta': 0.5}
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"from_trl_beta: beta must be a number in [0, 1], got {type(beta).__name__}")
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"from_trl_beta: beta must be in [0, 1], got {beta}")
    beta = float(beta)
    if beta == 0.0:
        return {"divergence": "forward_kl", "beta": beta}
    if beta == 1.0:
        return {"divergence": "reverse_kl", "beta": beta}
    return {"divergence": "jsd", "beta": beta}


def to_trl_beta(divergence: str, beta: Optional[float] = None) -> float:
    """TRL's generalised-JSD beta for this package's `divergence` (and `beta`, for jsd): the inverse of
    `from_trl_beta`."""
    if divergence == "forward_kl":
        return 0.0
    if divergence == "reverse_kl":
        return 1.0
    if divergence == "jsd":
        LossConfig(divergence="jsd", beta=0.5 if beta is None else beta)  # validates beta in (0, 1)
        if beta is None:
            raise ValueError("to_trl_beta: jsd needs its beta")
        return float(beta)
    raise ValueError(f"to_trl_beta: unknown divergence {divergence!r}; expected 'forward_kl', 'reverse_kl' or 'jsd'")


# ---------------------------------------------------------------------------------------------------------
# The loss's keywords from a config
# ---------------------------------------------------------------------------------------------------------
def loss_keywords(config: Union[None, Mapping[str, Any], LossConfig] = None, *, trl_beta: Optional[float] = None,
                  trl_temperature: Optional[float] = None) -> dict:
    """The keywords the mixin passes to `fused_window_kl`, from a config: None, a dict of `LossConfig` knobs (and
    `backend`), or a `LossConfig`. Validated here (a ValueError / TypeError naming the argument).

    trl_beta / trl_temperature: a TRL trainer's `beta` and divergence temperature; they fill `divergence` and
    `beta` (through `from_trl_beta`) and `temperature` when the config does not set them (a `LossConfig` sets
    every knob). `num_items` comes from the trainer, and the reduction must be "mean": a config that sets them
    otherwise is refused.
    """
    if config is None:
        given = {}
    elif isinstance(config, LossConfig):
        given = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        given = dict(config)
    else:
        raise TypeError(f"topd_config: expected None, a dict or a topd_kernels.LossConfig, got {type(config).__name__}")
    unknown = sorted(set(given) - set(KNOBS) - set(_EXTRA_KEYS))
    if unknown:
        raise TypeError(f"topd_config: unknown key(s) {unknown}; expected LossConfig's knobs {list(KNOBS)} or "
                        f"{list(_EXTRA_KEYS)}")
    if given.get("num_items") is not None:
        raise ValueError("topd_config: num_items comes from the trainer (num_items_in_batch); do not set it")
    given.pop("num_items", None)
    if given.get("reduction", "mean") != "mean":
        raise ValueError(f"topd_config: reduction must be 'mean' inside a trainer (it divides by "
                         f"num_items_in_batch), got {given['reduction']!r}")
    keywords = {}
    if trl_beta is not None and "divergence" not in given:
        keywords.update(from_trl_beta(trl_beta))
    if trl_temperature is not None and "temperature" not in given:
        keywords["temperature"] = float(trl_temperature)
    keywords.update(given)
    LossConfig(**{k: v for k, v in keywords.items() if k in KNOBS})  # validate now, not at the first step
    if "backend" in keywords and not isinstance(keywords["backend"], str):
        raise TypeError(f"topd_config: backend must be a string, got {type(keywords['backend']).__name__}")
    return keywords


def _valid_from_labels(labels: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """The positions the loss counts for `labels` (SPEC "Inputs"): labels[t + 1] != -100 within t's sequence."""
    valid = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    valid[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    if cu_seqlens is not None:  # the last position of each packed sequence predicts nothing of its own
        ends = torch.as_tensor(cu_seqlens, device=labels.device)[1:-1] - 1
        valid.view(-1)[ends] = False  # an empty first sequence gives -1: the last position, already False
    return valid


def _with_quantile_group(keywords: dict, quantile_group) -> dict:
    """keywords with each Quantile(q) threshold (no group) taken over `quantile_group` ("world": the default process
    group when torch.distributed runs several processes)."""
    import torch.distributed as dist

    if quantile_group is None:
        return keywords
    if isinstance(quantile_group, str):
        if quantile_group != "world":
            raise ValueError(f"quantile_group: expected None, 'world' or a process group, got {quantile_group!r}")
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return keywords  # one process: its quantile is the world's
        quantile_group = dist.group.WORLD
    elif not (dist.is_available() and isinstance(quantile_group, dist.ProcessGroup)):
        raise TypeError(f"quantile_group: expected None, 'world' or a torch.distributed process group, got "
                        f"{type(quantile_group).__name__}")
    out = dict(keywords)
    for name in ("loss_threshold", "div_threshold"):
        threshold = out.get(name)
        if isinstance(threshold, Quantile) and threshold.group is None:
            out[name] = Quantile(threshold.q, group=quantile_group)
    return out


def _trl_kind(trainer) -> Optional[str]:
    """"distillation" / "gkd" when the trainer is (a subclass of) TRL's DistillationTrainer / GKDTrainer, found by
    name in the MRO (so trl is never imported here)."""
    for cls in type(trainer).__mro__:
        if cls.__module__.startswith("trl."):
            if cls.__name__ == "DistillationTrainer":
                return "distillation"
            if cls.__name__ == "GKDTrainer":
                return "gkd"
    return None


def _forward_keys(model) -> tuple[frozenset, bool, bool]:
    """(named parameters of model.forward, whether it takes **kwargs, whether it takes logits_to_keep)."""
    params = inspect.signature(model.forward).parameters
    named = frozenset(k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values()), "logits_to_keep" in named


class TOPDDistillationMixin:
    """Mixin for `transformers.Trainer` subclasses (and TRL's `DistillationTrainer` / `GKDTrainer`) whose
    `compute_loss` is `fused_window_kl` between the student and a frozen teacher. Put it first:
    `class MyTrainer(TOPDDistillationMixin, Trainer)`.

    Keyword arguments on top of the trainer's:
        teacher_model: the teacher (an nn.Module returning `.logits`). Required with a plain Trainer; TRL's
            trainers take and prepare their own (`teacher_model` is passed through to them).
        topd_config: the loss's keywords: a dict of `topd_kernels.LossConfig` knobs (and `backend`) or a
            `LossConfig` (see `loss_keywords`); None = plain OPD (mean reverse KL), or, under a TRL trainer,
            TRL's divergence for its `beta`.
        quantile_group: None (default: a `Quantile` threshold is each process's own), "world" (the thresholds
            given as `Quantile(q)` are taken over the valid tokens of every process, so that all data-parallel
            ranks use the same ones; nothing changes in a single process) or a torch.distributed process group.
            Gradient-accumulation micro-batches still take their own quantiles.

    Batches hold the model inputs and `labels` (-100 = ignored; position t's logits are scored against
    `labels[t + 1]`, as a causal LM's own loss does). Statistics go to the trainer's logs as `topd/kl` (mean
    divergence d over valid tokens, nats), `topd/high_loss_share`, `topd/non_divergent_share` (high-loss tokens
    judged non-divergent, i.e. suppressed, over high-loss tokens) and `topd/entropy` when the loss returns the
    student's entropy.
    """

    def __init__(self, *args, teacher_model=None, topd_config=None, quantile_group=None, **kwargs):
        takes_teacher = "teacher_model" in inspect.signature(super().__init__).parameters  # TRL's trainers
        if takes_teacher and teacher_model is not None:
            kwargs["teacher_model"] = teacher_model
        elif not takes_teacher and teacher_model is None:
            raise ValueError(f"{type(self).__name__}: teacher_model is required")
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__}: nn.DataParallel (several GPUs in one process) is not supported; launch with "
                "torchrun / accelerate launch (DDP), or make one GPU visible with CUDA_VISIBLE_DEVICES")
        self._topd_kind = _trl_kind(self)
        if not takes_teacher:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        elif getattr(self, "teacher_model", None) is None:
            raise ValueError(f"{type(self).__name__}: teacher_model is required")
        trl_beta = getattr(self.args, "beta", None) if self._topd_kind else None
        trl_temperature = getattr(self.args, "temperature", None) if self._topd_kind == "distillation" else None
        self.topd_loss_keywords = _with_quantile_group(
            loss_keywords(topd_config, trl_beta=trl_beta, trl_temperature=trl_temperature), quantile_group)
        if trl_beta is not None and topd_config is not None:
            mapped = from_trl_beta(trl_beta)
            ours = {k: self.topd_loss_keywords.get(k, getattr(LossConfig, k)) for k in mapped}
            if ours["divergence"] != mapped["divergence"] or (
                    ours["divergence"] == "jsd" and ours["beta"] != mapped["beta"]):
                warnings.warn(f"{type(self).__name__}: topd_config's divergence {ours} overrides the trainer's "
                              f"beta={trl_beta} ({mapped})", stacklevel=2)
        # Our compute_loss divides by num_items_in_batch itself, so the Trainer must count it whatever the model's
        # forward accepts (it counts only for models that take loss kwargs), over labels[..., 1:] (the shift).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._topd_scaled = True
        self._topd_metrics = {"train": None, "eval": None}
        self._topd_has_entropy = False

    # Trainer.training_step reads this after compute_loss: True when the loss was divided by num_items_in_batch
    # (normalised over the whole accumulated batch), False for a per-micro-batch mean (the Trainer then divides it
    # by the accumulation steps).
    @property
    def loss_is_scaled_for_ga(self) -> bool:
        return self._topd_scaled

    # -----------------------------------------------------------------------------------------------------
    def _topd_num_items(self, num_items_in_batch):
        """num_items for the loss: num_items_in_batch (clamped to >= 1, a tensor stays one), divided by the
        data-parallel processes when the count is global (`average_tokens_across_devices`), which is
        `Trainer.compute_loss`'s `loss *= num_processes // tp_size`."""
        if num_items_in_batch is None:
            return None
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items = num_items_in_batch.clamp(min=1)
        else:
            num_items = max(num_items_in_batch, 1)
        if getattr(self.args, "average_tokens_across_devices", False):
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            processes = self.accelerator.num_processes // tp_size
            if processes > 1:
                num_items = num_items / processes
        return num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._topd_kind == "distillation" and "completion_ids" in inputs:
            return self._topd_completion_loss(model, inputs, return_outputs, num_items_in_batch)
        if "labels" not in inputs:
            raise ValueError(f"{type(self).__name__}: the batch has no 'labels' (token ids with -100 where a position "
                             f"is not scored); got keys {sorted(inputs)}")
        labels = inputs["labels"]
        unwrapped = self.accelerator.unwrap_model(model)
        named, var_kw, _ = _forward_keys(unwrapped)
        model_inputs = {k: v for k, v in inputs.items()
                        if k not in _NOT_MODEL_INPUTS and (k in named or (var_kw and k in _FLASH_KWARGS))}
        if "use_cache" in named:
            model_inputs["use_cache"] = False  # no cache in training; and HF only detects packing without one
        cu_seqlens = self._topd_cu_seqlens(inputs, labels)

        student = model(**model_inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self.teacher_model(**model_inputs)
        num_items = self._topd_num_items(num_items_in_batch)
        loss = self._topd_loss(student.logits, teacher.logits, labels=labels, cu_seqlens=cu_seqlens,
                               num_items=num_items)
        return (loss, student) if return_outputs else loss

    @staticmethod
    def _topd_cu_seqlens(inputs, labels):
        """Sequence boundaries of a packed (1, N) batch: the collator's cu_seq_lens_q (a tensor, no host read),
        else from position_ids (restarting at their first value; read on the host); None for a padded batch."""
        if labels.dim() != 2 or labels.shape[0] != 1:
            return None
        if inputs.get("cu_seq_lens_q") is not None:
            return inputs["cu_seq_lens_q"].to(labels.device)
        position_ids = inputs.get("position_ids")
        if position_ids is None:
            return None
        position_ids = position_ids.reshape(1, -1)
        return cu_seqlens_from_position_ids(position_ids - position_ids[:, :1]).to(labels.device)

    def _topd_completion_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """TRL DistillationTrainer's generated batch: prompt_ids | completion_ids, scored on the completion (times
        tool_mask), divided by the trainer's own global count of completion tokens over the processes, as
        `DistillationTrainer.compute_loss` does."""
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        else:
            num_items = self._topd_num_items(num_items_in_batch)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        kept = inputs["completion_ids"].shape[1]
        multimodal = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                      "token_type_ids", "mm_token_type_ids", "image_position_ids")
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                        **{k: inputs[k] for k in multimodal if k in inputs}}

        def logits_of(net):
            named, _, takes_keep = _forward_keys(self.accelerator.unwrap_model(net))
            extra = {"logits_to_keep": kept + 1} if takes_keep else {}
            if "use_cache" in named:
                extra["use_cache"] = False
            out = net(**model_inputs, **extra)
            return out, out.logits[:, -(kept + 1):-1]  # a view: the logits that predict the completion tokens

        student, student_logits = logits_of(model)
        self.teacher_model.eval()
        with torch.no_grad():
            _, teacher_logits = logits_of(self.teacher_model)
        loss = self._topd_loss(student_logits, teacher_logits, mask=loss_mask, num_items=num_items, scaled=True)
        return (loss, student) if return_outputs else loss

    def _topd_loss(self, student_logits, teacher_logits, *, labels=None, mask=None, cu_seqlens=None, num_items=None,
                   scaled=None):
        loss, stats = fused_window_kl(student_logits, teacher_logits, labels=labels, mask=mask, cu_seqlens=cu_seqlens,
                                      num_items=num_items, return_stats=True, **self.topd_loss_keywords)
        self._topd_scaled = (num_items is not None) if scaled is None else scaled
        valid = (mask != 0) if mask is not None else _valid_from_labels(labels, cu_seqlens)
        self._topd_record(stats, valid)
        return loss

    def _topd_record(self, stats, valid: torch.Tensor) -> None:
        """Add this micro-batch's sums to the running metrics (on the device: no host synchronisation)."""
        kl = stats.kl.float()
        entropy = getattr(stats, "entropy", None)
        self._topd_has_entropy = entropy is not None
        suppressed = stats.high_loss & ~stats.divergent
        row = torch.stack([kl.sum(), valid.sum().to(kl.dtype), stats.high_loss.sum().to(kl.dtype),
                           suppressed.sum().to(kl.dtype),
                           entropy.float().sum() if entropy is not None else kl.new_zeros(())])
        mode = "train" if self.model.training else "eval"
        current = self._topd_metrics[mode]
        self._topd_metrics[mode] = row if current is None else current + row

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._topd_metrics.get(mode)
        if sums is not None:
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            kl_sum, valid, high, suppressed, entropy_sum = sums.tolist()
            prefix = "eval_" if mode == "eval" else ""
            logs[f"{prefix}topd/kl"] = kl_sum / max(valid, 1.0)
            logs[f"{prefix}topd/high_loss_share"] = high / max(valid, 1.0)
            logs[f"{prefix}topd/non_divergent_share"] = suppressed / high if high > 0 else 0.0
            if self._topd_has_entropy:
                logs[f"{prefix}topd/entropy"] = entropy_sum / max(valid, 1.0)
                if self._topd_kind:  # the key TRL's own loss logs the student's entropy under
                    logs[f"{prefix}entropy"] = logs[f"{prefix}topd/entropy"]
            self._topd_metrics[mode] = None
        super().log(logs, start_time)


class TOPDTrainer(TOPDDistillationMixin, transformers.Trainer):
    """`transformers.Trainer` whose loss is `fused_window_kl` against `teacher_model` (see TOPDDistillationMixin)."""


def __getattr__(name: str):
    """TOPDDistillationTrainer (trl.DistillationTrainer) and TOPDGKDTrainer (trl.experimental.gkd.GKDTrainer),
    made on first use so that this module imports without trl."""
    if name not in ("TOPDDistillationTrainer", "TOPDGKDTrainer"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        if name == "TOPDDistillationTrainer":
            from trl import DistillationTrainer as base
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from trl.experimental.gkd import GKDTrainer as base
    except ImportError as error:
        raise ImportError(f"topd_kernels.integrations.{name} needs trl; install the extra: {_EXTRA}") from error
    cls = type(name, (TOPDDistillationMixin, base), {
        "__doc__": f"trl's {base.__name__} whose loss is fused_window_kl (see TOPDDistillationMixin).",
        "__module__": __name__})
    globals()[name] = cls
    return cls
