"""``TrainingConfig`` and ``FSDPConfig``: how to train (accumulation, checkpoints, logging,
device, precision, parallelism). Frozen, validated data; nothing here knows the losses."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ._io import (
    _boolean,
    _ConfigIO,
    _field_error,
    _optional_positive_int,
    _positive_int,
    _tuple_if_list,
    immutable_config,
)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"



_FP16_LEVELS = ("O0", "O1", "O2", "O3")
TEACHER_PLACEMENTS = ("shard", "replicate", "none")


def _check_blocks(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or callable(value):
        return
    usage = ("give None (the default policy), a list of module class names such as "
             "['LlamaDecoderLayer'], or a function module -> bool")
    if not isinstance(value, tuple) or not value:
        raise _field_error(instance, attribute, value, usage)
    for name in value:
        if not isinstance(name, str) or not name:
            raise _field_error(instance, attribute, value, f"{name!r} is not a class name; {usage}")


def _blocks(value: Any) -> Any:
    if isinstance(value, str):  # one class name
        return (value,)
    return _tuple_if_list(value)


@attrs.frozen(kw_only=True)
class FSDPConfig(_ConfigIO):
    """Sharding with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) under torchrun.

    ``blocks`` chooses the modules sharded one by one (each is all-gathered for its own forward
    and backward, then freed): ``None`` takes, in a Hugging Face model, the layers of its
    ``nn.ModuleList`` whose class is named in the model's ``_no_split_modules``
    (``LlamaDecoderLayer``, ``BertLayer``, ``GPT2Block``, …); a tuple of class names takes the
    modules of those classes; a function ``module -> bool`` takes the modules it accepts (such
    a config does not go to JSON). The student, then the step holding it and the projections,
    are sharded on top, so every trained parameter is sharded.

    ``teacher``: ``"shard"`` (each teacher sharded by the same block policy, parameters freed
    again after every forward), ``"replicate"`` (each rank holds the whole teacher, left as
    given) or ``"none"`` (no teacher forward: the batches carry a ``teacher_cache``; calling a
    teacher raises). ``reshard_after_forward``: free the student's gathered blocks after the
    forward and gather them again for the backward (``True``, the least memory) or keep them
    until the backward (``False``, one all-gather fewer per block).
    """

    teacher: str = attrs.field(default="shard")
    blocks: tuple[str, ...] | Callable[[Any], bool] | None = attrs.field(
        default=None, converter=_blocks, validator=_check_blocks)
    reshard_after_forward: bool = attrs.field(default=True, validator=_boolean)

    @teacher.validator
    def _check_teacher(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in TEACHER_PLACEMENTS:
            raise _field_error(self, attribute, value,
                               f"must be one of {list(TEACHER_PLACEMENTS)}")


def _fsdp(value: Any) -> Any:
    if value is True:
        return FSDPConfig()
    if value is False:
        return None
    if isinstance(value, Mapping):
        try:
            return FSDPConfig.from_dict(value)
        except (ValueError, TypeError) as error:
            raise type(error)(f"TrainingConfig.fsdp: {error}") from None
    return value


def _check_fsdp(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, FSDPConfig):
        raise TypeError(f"TrainingConfig.fsdp={value!r}: give None, True, a dict of "
                        "FSDPConfig fields or a purekd.FSDPConfig")


@attrs.frozen
class TrainingConfig(_ConfigIO):
    """How to train: accumulation, checkpoints, logging, device, precision, parallelism.

    ``ckpt_frequency`` checkpoints per epoch, every ``ckpt_epoch_frequency`` epochs (epoch
    mode); every ``ckpt_steps`` optimizer steps with ``num_steps``. ``fp16`` / ``bf16``: mixed
    precision with ``torch.autocast`` (fp16 adds a gradient scaler); ``fp16_opt_level`` is
    accepted for compatibility and ignored. ``data_parallel`` wraps the step (student and
    projections) in ``torch.nn.DataParallel`` when more than one GPU is visible. ``local_rank`` >= 0 (or the ``LOCAL_RANK``
    environment variable set by torchrun) means DistributedDataParallel, unless ``fsdp`` is set:
    then the student, the projections and (by :attr:`FSDPConfig.teacher`) the teachers are
    sharded with FSDP2 instead (``True`` means ``FSDPConfig()``; with ``bf16`` the parameters
    are gathered in bfloat16 and gradients reduced in float32).
    """

    gradient_accumulation_steps: int = attrs.field(default=1, validator=_positive_int)
    ckpt_frequency: int = attrs.field(default=1, validator=_positive_int)
    ckpt_epoch_frequency: int = attrs.field(default=1, validator=_positive_int)
    ckpt_steps: int | None = attrs.field(default=None, validator=_optional_positive_int)
    log_dir: str | None = attrs.field(default=None)
    output_dir: str = attrs.field(default="./saved_models")
    device: str = attrs.field(factory=_default_device, converter=str)
    fp16: bool = attrs.field(default=False, validator=_boolean)
    fp16_opt_level: str = attrs.field(default="O1")
    data_parallel: bool = attrs.field(default=False, validator=_boolean)
    local_rank: int = attrs.field(default=-1)
    bf16: bool = attrs.field(default=False, validator=_boolean, kw_only=True)
    fsdp: FSDPConfig | None = attrs.field(default=None, converter=_fsdp, validator=_check_fsdp,
                                          kw_only=True)

    @device.validator
    def _check_device(self, attribute: attrs.Attribute, value: str) -> None:
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise _field_error(self, attribute, value,
                               "not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None

    @fp16_opt_level.validator
    def _check_level(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in _FP16_LEVELS:
            raise _field_error(self, attribute, value, f"must be one of {list(_FP16_LEVELS)}")

    @local_rank.validator
    def _check_rank(self, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise _field_error(self, attribute, value, "must be -1 (not distributed) or a rank >= 0")

    def __attrs_post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("TrainingConfig: fp16=True and bf16=True; choose one precision")
        if self.data_parallel and self.local_rank != -1:
            raise ValueError(
                "TrainingConfig: data_parallel=True with local_rank="
                f"{self.local_rank}; DataParallel and DistributedDataParallel exclude each other"
            )
        if self.fsdp is not None and self.data_parallel:
            raise ValueError("TrainingConfig: fsdp and data_parallel=True; FSDP shards across "
                             "torchrun processes, DataParallel replicates in one: choose one")
        if self.fsdp is not None and self.fp16:
            raise ValueError("TrainingConfig: fsdp with fp16=True is not supported (a gradient "
                             "scaler per rank could skip steps on some ranks only); use "
                             "bf16=True")
        for name in ("log_dir", "output_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"TrainingConfig.{name}={value!r}: must be a path string")


for _cls in (TrainingConfig, FSDPConfig):
    immutable_config(_cls)

__all__ = ["TEACHER_PLACEMENTS", "FSDPConfig", "TrainingConfig"]
