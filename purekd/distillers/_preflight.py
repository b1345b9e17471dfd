"""Nothing trains silently wrong: what the distillers check before training starts, and on the
adaptors' outputs as training runs.

:func:`check_launch` looks at ``train``'s arguments, the optimizer, the devices and the data
before any weight changes. :class:`CheckedOutputs` wraps a step's model stage and checks every
batch's adapted outputs against the distillation config (a term that would silently be 0, a
tensor of the wrong kind, a mask of the wrong length); checks that need the values (the label
range) run on every batch on the CPU and on the first batch elsewhere, so that a GPU run is not
synchronised each step.

Each problem is a ``ValueError`` / ``TypeError`` naming the argument or the adaptor key, its
value and the fix, or — where it can be intended — a ``UserWarning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from purekd.combinators import on_policy_stage
from purekd.configs import DistillationConfig, TrainingConfig
from purekd.stages import Adapted
from purekd.teacher_cache import CachedCollate, CachedTeacherDataset

_TENSOR_KEYS = ("logits", "logits_mask", "labels", "losses", "hidden", "attention")
_FLOAT_KEYS = ("logits", "losses", "hidden", "attention")


# -- the adaptors' outputs -------------------------------------------------------------------


def _has_distribution(adapted: Adapted) -> bool:
    """Whether the adaptor returned a next-token distribution the KD term reads: ``logits``,
    a fused output layer (``lm_hidden`` + ``lm_weight``) or a top-k (``topk_ids``)."""
    return (bool(adapted.logits) or adapted.topk_ids is not None
            or (adapted.lm_hidden is not None and adapted.lm_weight is not None))


def check_outputs(config: DistillationConfig, student: Adapted, teacher: Adapted, *,
                  with_values: bool, warned: set[str]) -> None:
    """Check one batch's adapted outputs against ``config`` (see the module's docstring)."""
    for side, adapted in (("student", student), ("teacher", teacher)):
        _check_kinds(side, adapted)
    kd_weight = config.kd_loss_weight
    has_S, has_T = _has_distribution(student), _has_distribution(teacher)
    if kd_weight != 0 and has_S != has_T:
        missing = "teacher" if not has_T else "student"
        raise ValueError(
            f"kd_loss_weight={kd_weight} but the {missing}'s adaptor returned no 'logits' (nor "
            "another form of the distribution: 'lm_hidden' + 'lm_weight', or a teacher's "
            "'topk_ids' + 'topk_logprobs') while the other adaptor did: the KD term would be 0 "
            f"at every step. Return 'logits' from the {missing}'s adaptor, or set "
            "kd_loss_weight=0")
    hard_weight = config.hard_label_weight
    if hard_weight != 0 and not student.losses:
        raise ValueError(
            f"hard_label_weight={hard_weight} but the student's adaptor returned no 'losses': "
            "the hard-label term would be 0 at every step. Return 'losses': [loss] from the "
            "student's adaptor (e.g. the model's loss when given labels), or set "
            "hard_label_weight=0")
    if kd_weight != 0 and not has_S and not has_T:
        others = config.intermediate_matches or student.captured or (hard_weight and student.losses)
        if not others:
            raise ValueError(
                "nothing to train: neither adaptor returned 'logits' (so the KD term is left "
                "out), and there is no intermediate match, custom match or hard-label loss. "
                "Return 'logits' from both adaptors")
        if "kd" not in warned:
            warned.add("kd")
            warnings.warn(
                f"kd_loss_weight={kd_weight} but neither adaptor returns 'logits': the KD term is "
                "left out (as in TextBrewer) and only the other terms train. Set "
                "kd_loss_weight=0 to say so", UserWarning, stacklevel=5)
    if config.probability_shift and student.labels and student.logits:
        _check_labels(student, with_values)
    if torch.is_grad_enabled():
        _check_trainable(config, student)
    for side, adapted in (("student", student), ("teacher", teacher)):
        _check_logits_masks(side, adapted, warned)


def _check_trainable(config: DistillationConfig, student: Adapted) -> None:
    """The student's logits and losses that a weighted term uses carry a gradient."""
    used = [("logits", config.kd_loss_weight), ("losses", config.hard_label_weight)]
    for key, weight in used:
        if weight == 0:
            continue
        for index, value in enumerate(getattr(student, key)):
            if not value.requires_grad:
                raise ValueError(
                    f"the student's adaptor returned {key}[{index}] without a gradient "
                    f"(requires_grad=False) while its term has weight {weight}: the term cannot "
                    "train the student. Was it detached, or computed under torch.no_grad()? "
                    "Return the model's output itself")


def _check_logits_masks(side: str, adapted: Adapted, warned: set[str]) -> None:
    masks = adapted.logits_mask
    if not masks:
        return
    for index, logits in enumerate(adapted.logits):
        mask = masks[index] if len(masks) > 1 else masks[0]
        if logits.dim() == 3 and tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"the {side}'s adaptor returned logits_mask[{index if len(masks) > 1 else 0}] of "
                f"shape {tuple(mask.shape)} for logits[{index}] of shape {tuple(logits.shape)}: "
                f"the mask must be {tuple(logits.shape[:-1])}, one entry per row")
        fits = tuple(mask.shape) == tuple(logits.shape[:-1])  # flat (N, C) token logits: kept
        if logits.dim() == 2 and not fits and "mask2d" not in warned:
            warned.add("mask2d")
            warnings.warn(
                f"the {side}'s adaptor returned a logits_mask of shape {tuple(mask.shape)} with "
                f"2-d logits[{index}] {tuple(logits.shape)}: it does not fit their rows, so it "
                f"is ignored (as in TextBrewer); a mask of shape {tuple(logits.shape[:-1])} "
                "would select rows", UserWarning, stacklevel=5)


def _check_kinds(side: str, adapted: Adapted) -> None:
    for key in _TENSOR_KEYS:
        for index, value in enumerate(getattr(adapted, key)):
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"the {side}'s adaptor returned {key}[{index}] of type "
                    f"{type(value).__name__}: every {key!r} entry must be a torch.Tensor "
                    "(convert with torch.as_tensor, or pick the tensor out of the model's output)")
            if key in _FLOAT_KEYS and not value.is_floating_point():
                hint = (" — raw scores, not class ids from argmax; if stored as integers, "
                        "return logits.float()" if key == "logits" else "")
                raise TypeError(
                    f"the {side}'s adaptor returned {key}[{index}] of dtype {value.dtype}: "
                    f"{key!r} must be floating point{hint}")
    mask = adapted.inputs_mask
    if mask is not None:
        for index, hidden in enumerate(adapted.hidden):
            if hidden.dim() >= 2 and tuple(hidden.shape[:2]) != tuple(mask.shape):
                raise ValueError(
                    f"the {side}'s adaptor returned inputs_mask of shape {tuple(mask.shape)} but "
                    f"hidden[{index}] of shape {tuple(hidden.shape)}: the mask must be (B, L) = "
                    f"{tuple(hidden.shape[:2])}, one entry per position of the hidden states")


def _check_labels(student: Adapted, with_values: bool) -> None:
    for index, (labels, logits) in enumerate(zip(student.labels, student.logits, strict=False)):
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(
                f"probability_shift=True: the student's adaptor returned labels[{index}] of dtype "
                f"{labels.dtype}; labels must be integer class indices of shape "
                f"{tuple(logits.shape[:-1])} (not probabilities or one-hot rows): labels.long()")
    if not with_values:
        return
    pairs = [(i, labels, logits.size(-1)) for i, (labels, logits)
             in enumerate(zip(student.labels, student.logits, strict=False)) if labels.numel()]
    if not pairs:
        return
    highest = torch.stack([labels.max() for _, labels, _ in pairs]).cpu().tolist()
    for (index, _, classes), top in zip(pairs, highest, strict=True):
        if top >= classes:
            raise ValueError(
                f"probability_shift=True: labels[{index}] holds class {top} but logits[{index}] "
                f"has {classes} classes; labels must be in [0, {classes - 1}] (negative labels, "
                "e.g. -100, mark rows to leave alone)")


class CheckedOutputs:
    """A model stage (``(batch, **args) -> Outputs``) whose outputs pass :func:`check_outputs`."""

    def __init__(self, inner: Callable[..., Any], config: DistillationConfig, every_batch: bool):
        self.inner = inner
        self.config = config
        self.every_batch = every_batch
        self.calls = 0
        self.warned: set[str] = set()

    def __call__(self, batch: Any, **kwargs: Any) -> Any:
        outputs = self.inner(batch, **kwargs)
        check_outputs(self.config, outputs.student, outputs.teacher,
                      with_values=self.every_batch or self.calls == 0, warned=self.warned)
        self.calls += 1
        return outputs

    @property
    def state(self) -> Any:
        """The wrapped stage's state module (an on-policy stage's generator), if any."""
        return getattr(self.inner, "state", None)


def install_output_checks(steps: Iterable[Any], config: DistillationConfig,
                          device: str | torch.device) -> None:
    """Wrap each step's ``outputs`` stage in :class:`CheckedOutputs` (once)."""
    every_batch = torch.device(device).type == "cpu"
    for step in steps:
        stage = getattr(step, "outputs", None)
        if stage is None:
            continue
        if isinstance(stage, CheckedOutputs):
            stage.config, stage.every_batch, stage.calls = config, every_batch, 0
        else:
            step.outputs = CheckedOutputs(stage, config, every_batch)


# -- before training ---------------------------------------------------------------------------


def check_device_exists(config: TrainingConfig) -> None:
    """The config's device exists on this machine."""
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainingConfig.device={config.device!r} but CUDA is not available "
                             "on this machine; use device='cpu' (the default picks CUDA only "
                             "when it is available)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"TrainingConfig.device={config.device!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")


def check_device(config: TrainingConfig, student: nn.Module, teachers: list[nn.Module]) -> None:
    """The config's device exists, and every model's weights are on it (under FSDP, a model
    that is sharded may still be on the CPU: sharding moves its shards to the device)."""
    check_device_exists(config)
    device = torch.device(config.device)
    fsdp = config.fsdp
    models = [("the student (model_S)", student, fsdp is not None)]
    models += [(f"teacher {i} (model_T)" if len(teachers) > 1 else "the teacher (model_T)", t,
                fsdp is not None and fsdp.teacher == "shard")
               for i, t in enumerate(teachers)]
    for name, model, sharded in models:
        found = next((p.device for p in model.parameters()), None)
        if sharded and found is not None and found.type == "cpu":
            continue
        if found is not None and not _same_device(found, device):
            raise ValueError(
                f"{name} is on {found} but TrainingConfig.device={config.device!r}: the batch "
                f"goes to {device}; move the model with .to({str(device)!r}) before building the "
                "distiller, or set device to match")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def check_optimizer(optimizer: torch.optim.Optimizer, student: nn.Module) -> None:
    """Something trains: the optimizer holds parameters that require gradients, the student has
    some (it may leave some frozen), the student's are among the optimizer's (else a warning),
    and the learning rate is not 0 everywhere (else a warning)."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in held if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"every parameter in the optimizer is frozen (requires_grad=False; {len(held)} "
            "held): nothing would train. Unfreeze the student's parameters "
            "(p.requires_grad_(True)) or build the optimizer over trainable ones")
    own = {id(p) for p in student.parameters() if p.requires_grad}
    if not own and any(True for _ in student.parameters()):
        raise ValueError(
            "every parameter of the student (model_S) is frozen (requires_grad=False): the "
            "student would not learn. Unfreeze the parameters to train "
            "(p.requires_grad_(True))")
    if own and not any(id(p) in own for p in trainable):
        warnings.warn("the optimizer holds none of the student's trainable parameters (was it "
                      "built over another model?): only the projections will train",
                      UserWarning, stacklevel=4)
    if all(float(group.get("initial_lr", group.get("lr", 1.0))) == 0 for group in optimizer.param_groups):
        warnings.warn("every optimizer parameter group has learning rate 0: the weights will not "
                      "change", UserWarning, stacklevel=4)


def check_weights(config: DistillationConfig, customs: int = 0) -> None:
    """Some term has a nonzero weight; a negative weight is warned about."""
    weights = {"kd_loss_weight": config.kd_loss_weight,
               "hard_label_weight": config.hard_label_weight,
               **{f"intermediate_matches[{i}].weight": m.weight
                  for i, m in enumerate(config.intermediate_matches)}}
    if customs == 0 and all(w == 0 for w in weights.values()):
        raise ValueError("every term's weight is 0 (kd_loss_weight, hard_label_weight and the "
                         "intermediate matches'): the loss is 0 and nothing trains")
    for name, weight in weights.items():
        if weight < 0:
            warnings.warn(f"DistillationConfig.{name}={weight} is negative: training pushes the "
                          "student away from that target", UserWarning, stacklevel=4)


def check_schedule(config: TrainingConfig, *, epochs_mode: bool, loader_length: int | None) -> None:
    """The data gives optimizer steps, and the checkpoint options apply to the mode in use."""
    accumulation = config.gradient_accumulation_steps
    if loader_length == 0:
        raise ValueError("the dataloader has no batch (len(dataloader) == 0): nothing would "
                         "train; check the dataset and drop_last")
    if epochs_mode:
        if loader_length is not None and loader_length < accumulation:
            raise ValueError(
                f"an epoch has {loader_length} micro-batch(es), fewer than "
                f"TrainingConfig.gradient_accumulation_steps={accumulation}: no optimizer step "
                "would ever run (unfinished accumulation is dropped at each epoch's end). Lower "
                "gradient_accumulation_steps, use smaller batches, or train with num_steps")
        if config.ckpt_steps is not None:
            warnings.warn(f"TrainingConfig.ckpt_steps={config.ckpt_steps} is ignored with "
                          "num_epochs (checkpoints follow ckpt_frequency and "
                          "ckpt_epoch_frequency); train with num_steps to use it",
                          UserWarning, stacklevel=3)
        if loader_length is not None:
            steps = loader_length // accumulation
            if config.ckpt_frequency > steps:
                warnings.warn(f"TrainingConfig.ckpt_frequency={config.ckpt_frequency} but an "
                              f"epoch has only {steps} optimizer step(s): at most {steps} "
                              "checkpoint(s) per epoch are written", UserWarning, stacklevel=3)
    else:
        changed = [f"{n}={getattr(config, n)}" for n in ("ckpt_frequency", "ckpt_epoch_frequency")
                   if getattr(config, n) != 1]
        if changed:
            warnings.warn(f"TrainingConfig.{', '.join(changed)} is ignored with num_steps "
                          "(checkpoints follow ckpt_steps)", UserWarning, stacklevel=3)


def check_on_policy(train_config: TrainingConfig, config: DistillationConfig) -> None:
    """On-policy distillation (``config.on_policy``) needs a teacher that scores new sequences:
    not ``FSDPConfig(teacher="none")`` (no teacher forward, the batches carry a cache)."""
    if config.on_policy is None:
        return
    fsdp = train_config.fsdp
    if fsdp is not None and fsdp.teacher == "none":
        raise ValueError(
            "DistillationConfig(on_policy=...) with TrainingConfig(fsdp=FSDPConfig("
            "teacher='none')): the teacher must score every newly sampled sequence, but "
            "teacher='none' runs no teacher (the batches carry a cache of the dataset's text); "
            "use FSDPConfig(teacher='shard') or 'replicate'")


def check_on_policy_data(steps: Iterable[Any], data: Any) -> None:
    """An on-policy step is not fed from a top-k teacher cache: a loader over a
    :class:`~purekd.teacher_cache.CachedTeacherDataset`, batched by a
    :class:`~purekd.teacher_cache.CachedCollate`, or a list of batches carrying a
    ``'teacher_cache'`` is refused when ``train()`` starts, before any sampling and any weight
    change (the teacher must score the newly sampled sequences, which no cache holds)."""
    if not any(on_policy_stage(step) is not None for step in steps):
        return
    loaders = data.items() if isinstance(data, Mapping) else [(None, data)]
    for task, loader in loaders:
        where = "the dataloader" if task is None else f"the dataloader of task {task!r}"
        dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
        found = None
        if isinstance(loader, CachedTeacherDataset) or isinstance(dataset, CachedTeacherDataset):
            found = "its dataset is a CachedTeacherDataset"
        elif isinstance(collate, CachedCollate):
            found = "its collate_fn is a CachedCollate"
        elif (isinstance(loader, Sequence) and not isinstance(loader, (str, bytes)) and loader
              and isinstance(loader[0], Mapping) and "teacher_cache" in loader[0]):
            found = "its first batch carries a 'teacher_cache'"
        if found is not None:
            raise ValueError(
                f"on-policy: {where} reads a top-k teacher cache ({found}), but the teacher "
                "must score every newly sampled sequence, which no cache holds; train from "
                "the plain dataset with prompts (and the teacher model), or train off-policy "
                "from the cache (on_policy=None)")


def check_modes(teachers: list[nn.Module], student: nn.Module) -> None:
    """Warn when training starts with a teacher in training mode or the student in eval mode
    (``with distiller:`` sets both)."""
    if any(t.training for t in teachers):
        warnings.warn("a teacher is in training mode (dropout and batch-norm updates active): "
                      "train inside 'with distiller:' (which puts teachers in eval mode) or call "
                      "teacher.eval()", UserWarning, stacklevel=4)
    if not student.training:
        warnings.warn("the student is in eval mode (dropout off, batch-norm statistics frozen): "
                      "train inside 'with distiller:' or call student.train()", UserWarning,
                      stacklevel=4)


__all__ = ["CheckedOutputs", "check_device", "check_device_exists", "check_modes",
           "check_on_policy", "check_on_policy_data", "check_optimizer", "check_outputs",
           "check_schedule",
           "check_weights",
           "install_output_checks"]
