"""Sharding with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) under torchrun.

What :func:`shard_models` does, in this order (``fully_shard`` is applied bottom-up):

1. every *block* of the student (chosen by :func:`block_modules`), then the student itself,
   then the step that holds the student and the projections — the step is the FSDP root, the
   student a group of its own so that a callback can call it directly;
2. each teacher by its :attr:`~purekd.configs.FSDPConfig.teacher` placement: ``"shard"``
   shards its blocks and the teacher itself with ``reshard_after_forward=True`` given
   explicitly, also on the teacher's root (a root left at the default keeps its gathered
   parameters after the forward, and a teacher has no backward to free them: PyTorch issues
   #149029 and #154655); ``"replicate"`` leaves it whole on every rank; ``"none"`` makes any
   call of it raise, since the batches are expected to carry the teacher's cached outputs;
3. with ``bf16``, :class:`~torch.distributed.fsdp.MixedPrecisionPolicy` gathers parameters in
   bfloat16 and reduces gradients in float32; the sharded parameters (what the optimizer
   updates) stay float32.

``fully_shard`` replaces each parameter with a sharded :class:`~torch.distributed.tensor.DTensor`
parameter, so an optimizer built on the unsharded model would update tensors nobody uses:
:func:`rebind_optimizer` points it at the new parameters (by name).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from purekd.configs._training import FSDPConfig

if TYPE_CHECKING:  # torch.distributed's FSDP, DTensor and DCP take seconds to import: on use
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.utils.hooks import RemovableHandle

BlockPolicy = tuple[str, ...] | Callable[[nn.Module], bool] | None


def hugging_face_block_names(model: nn.Module) -> set[str]:
    """The class names in the ``_no_split_modules`` of ``model`` and of every Hugging Face
    model inside it (``{'LlamaDecoderLayer'}``, ``{'BertLayer', 'BertEmbeddings'}``, …)."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, (list, tuple, set, frozenset)):
            names.update(str(name) for name in declared)
    return names


def block_modules(model: nn.Module, blocks: BlockPolicy = None) -> list[nn.Module]:
    """The submodules of ``model`` to shard one by one, innermost first (``fully_shard`` order).

    ``None``: the elements of an :class:`torch.nn.ModuleList` whose class is named in
    :func:`hugging_face_block_names` — a decoder's layers, BERT's ``BertLayer`` s (not its
    embeddings, whose word embeddings an MLM head may share). A tuple of class names: every
    submodule of those classes. A function: every submodule it returns ``True`` for. ``model``
    itself is never a block.
    """
    chosen: list[nn.Module] = []
    if blocks is None:
        names = hugging_face_block_names(model)
        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                chosen.extend(child for child in module if type(child).__name__ in names)
    elif isinstance(blocks, tuple):
        chosen = [m for m in model.modules() if m is not model and type(m).__name__ in blocks]
    else:
        chosen = [m for m in model.modules() if m is not model and blocks(m)]
    order = {id(m): index for index, m in enumerate(model.modules())}
    unique = {id(m): m for m in chosen}.values()
    return sorted(unique, key=lambda m: -order[id(m)])  # children before their parents


def device_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over every process of the default group (on CUDA, this rank's
    device becomes the current one first)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None
                              else int(os.environ.get("LOCAL_RANK", "0")))
    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision(bf16: bool, *, cast_forward_inputs: bool = True) -> MixedPrecisionPolicy:
    """bfloat16 parameters and float32 gradient reductions with ``bf16``; full precision
    otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy(cast_forward_inputs=cast_forward_inputs)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                cast_forward_inputs=cast_forward_inputs)


def _shard(module: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy,
           reshard: bool | None) -> None:
    from torch.distributed.fsdp import fully_shard

    if not is_sharded(module):  # a second train() finds the models sharded by the first
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)


def _shard_blocks_and_root(model: nn.Module, blocks: BlockPolicy, mesh: DeviceMesh,
                           policy: MixedPrecisionPolicy, reshard: bool | None) -> int:
    found = block_modules(model, blocks)
    for block in found:
        _shard(block, mesh, policy, reshard)
    _shard(model, mesh, policy, reshard)
    return len(found)


def teacher_modules(step: nn.Module) -> list[nn.Module]:
    """The teacher modules a step (or a task router) holds in its ``teachers``, each once."""
    found: dict[int, nn.Module] = {}

    def collect(value: Any) -> None:
        if isinstance(value, nn.Module):
            found.setdefault(id(value), value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for module in step.modules():
        teachers = getattr(type(module), "teachers", None)
        if isinstance(teachers, property):
            collect(module.teachers)
    return list(found.values())


def _refuse_call(module: nn.Module, args: Any, kwargs: Any) -> None:
    raise ValueError(
        f"TrainingConfig.fsdp.teacher='none' but the teacher {type(module).__name__} was "
        "called: a batch had no cached teacher outputs. Give every batch a 'teacher_cache', or "
        "place the teacher with FSDPConfig(teacher='shard') or 'replicate'")


@attrs.frozen
class ShardedModels:
    """What :func:`shard_models` did: the mesh, how many blocks of the student and of each
    teacher were sharded one by one, and the hooks to remove when training ends."""

    mesh: DeviceMesh
    student_blocks: int
    teacher_blocks: tuple[int, ...]
    hooks: tuple[RemovableHandle, ...] = ()

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def shard_models(step: nn.Module, student: nn.Module, options: FSDPConfig, *,
                 device: torch.device, bf16: bool) -> ShardedModels:
    """Shard the student, the step (student and projections) and the teachers in place.

    Needs the default process group (torchrun). The student must be inside ``step``; the
    teachers are found by :func:`teacher_modules`. Modules sharded already (by an earlier
    ``train()``) are kept as they are.
    """
    if not any(module is student for module in step.modules()):
        raise ValueError("FSDP: the student is not a submodule of the step; the step must hold "
                         "the student (and the projections) for them to be sharded together")
    mesh = device_mesh(device)
    if not block_modules(student, options.blocks) and not is_sharded(student):
        warnings.warn(
            f"FSDP: no block of the student ({type(student).__name__}) matches "
            f"FSDPConfig.blocks={options.blocks!r}; it is sharded as one unit, so all of it is "
            "gathered at once in the forward. Name its repeated layers: "
            "FSDPConfig(blocks=('MyLayer',))", stacklevel=3)
    student_blocks = _shard_blocks_and_root(student, options.blocks, mesh, mixed_precision(bf16),
                                            options.reshard_after_forward)
    # the root: the projections; its inputs (batches, cached teacher outputs) keep their dtype
    _shard(step, mesh, mixed_precision(bf16, cast_forward_inputs=False), None)
    teacher_blocks: list[int] = []
    hooks: list[RemovableHandle] = []
    for teacher in teacher_modules(step):
        if options.teacher == "shard":
            teacher_blocks.append(_shard_blocks_and_root(teacher, options.blocks, mesh,
                                                         mixed_precision(bf16), reshard=True))
        elif options.teacher == "none":
            hooks.append(teacher.register_forward_pre_hook(_refuse_call, with_kwargs=True))
    return ShardedModels(mesh, student_blocks, tuple(teacher_blocks), tuple(hooks))


def global_batches(describe: Mapping[str, Any] | None, world: int) -> dict[str, Any] | None:
    """A run's fingerprint parts (``describe``) with each loader's ``batch_size`` (per process)
    replaced by ``global_batch_size`` = ``batch_size * world``: what an FSDP run's sharded state
    records, so that it resumes on another number of processes exactly when the global batch
    is unchanged (and is refused, naming ``global_batch_size``, when it is not)."""
    if describe is None:
        return None

    def globalise(info: Any) -> Any:
        if isinstance(info, Mapping) and isinstance(info.get("batch_size"), int):
            rest = {k: v for k, v in info.items() if k != "batch_size"}
            return {**rest, "global_batch_size": info["batch_size"] * world}
        if isinstance(info, Mapping) and "kind" not in info:  # loaders by task
            return {k: globalise(v) for k, v in info.items()}
        return info

    return {k: (globalise(v) if k == "data" else v) for k, v in describe.items()}


def rebind_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str],
                     module: nn.Module) -> None:
    """Point ``optimizer`` at ``module``'s parameters after sharding.

    ``names`` maps ``id(parameter)`` to its name in ``module``, taken before sharding (see
    :func:`parameter_names`); every parameter in the optimizer must be one of them, and the
    optimizer must not have stepped yet (its state would belong to the unsharded tensors).
    """
    if any(optimizer.state.values()):
        raise ValueError("FSDP: the optimizer already holds state (it has stepped); build it "
                         "fresh before train(): sharding replaces every parameter")
    current = dict(module.named_parameters())
    for index, group in enumerate(optimizer.param_groups):
        rebound = []
        for param in group["params"]:
            name = names.get(id(param))
            if name is None:
                raise ValueError(
                    f"FSDP: optimizer.param_groups[{index}] holds a parameter of shape "
                    f"{tuple(param.shape)} that is neither the student's nor a projection's; "
                    "FSDP shards only those: give the optimizer only their parameters")
            rebound.append(current[name])
        group["params"] = rebound


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of ``module`` (a tied one by its first
    name)."""
    return {id(param): name for name, param in module.named_parameters()}


def local_numel(parameters: Iterable[torch.Tensor]) -> int:
    """How many elements this rank holds: a sharded parameter's local shard, a plain one
    whole."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module``'s state dict with every sharded tensor gathered whole, on the CPU, on rank 0
    (an empty dict on the other ranks); the names are those of the unsharded module. Every rank
    must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    return dict(state)  # tensors, or a module's extra state


__all__ = [
    "BlockPolicy",
    "ShardedModels",
    "block_modules",
    "device_mesh",
    "full_state_dict",
    "global_batches",
    "hugging_face_block_names",
    "is_sharded",
    "local_numel",
    "mixed_precision",
    "parameter_names",
    "rebind_optimizer",
    "shard_models",
    "teacher_modules",
]
