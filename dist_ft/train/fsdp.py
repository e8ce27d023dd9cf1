"""PyTorch FSDP2 (``fully_shard``): a model sharded by the plan's blocks, and its sharded
state read and written through ``torch.distributed.checkpoint`` (DCP).

dist-ft applies ``fully_shard`` itself rather than through Accelerate's FSDP plugin, which
does not engage on a CPU-only machine: the same code then runs over gloo on CPU and NCCL on
CUDA, started by ``accelerate launch``, torchrun or srun alike (as torchtune does). Every
parameter becomes a ``DTensor`` sharded on dim 0 over the ranks. Frozen and trainable
parameters share units, so a stage change needs only a new optimizer over the same DTensors,
its moments the old optimizer's shards (nothing is gathered). A checkpoint holds each rank's
shards and DCP reshards them on load, so it resumes on any number of processes.
"""

from __future__ import annotations

import functools
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_ft.config.schema import FsdpConfig
from dist_ft.models.blocks import HEAD, STEM

log = logging.getLogger("dist_ft.train")

SHARDED = "sharded"  # a checkpoint's DCP folder: model and optimizer shards, every rank's


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 module (``fully_shard`` was applied to it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter, gradient or moment)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor``'s shards gathered (collective), else ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank holds of ``tensor`` (its shard of a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def wrap_units(module: nn.Module, block_of: dict[str, str]) -> dict[str, list[nn.Module]]:
    """The modules of each body block, by block name: the largest modules whose parameters
    all belong to that block (DenseNet's ``denseblock2`` is its dense block and the
    transition after it). Stem and head stay with the root unit.

    Args:
        module: the model, before sharding.
        block_of: parameter name -> block name (the plan's block map).
    """
    units: dict[str, list[nn.Module]] = {}

    def visit(prefix: str, mod: nn.Module) -> None:
        blocks = {block_of.get(prefix + name) for name, _ in mod.named_parameters()}
        if prefix and len(blocks) == 1:
            block = next(iter(blocks))
            if block not in (None, STEM, HEAD):
                units.setdefault(block, []).append(mod)
                return
        if len(blocks) > 1 or not prefix:
            for name, child in mod.named_children():
                visit(f"{prefix}{name}.", child)

    visit("", module)
    return units


@functools.cache
def _mesh(device_type: str, world: int) -> Any:
    # One 1-D mesh over the default group: its collectives keep the group's timeout
    # (trainer.collective_timeout_min), so a dead or hung peer stops the others in time.
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def shard_model(module: nn.Module, block_of: dict[str, str], cfg: FsdpConfig,
                device: torch.device) -> nn.Module:
    """``fully_shard`` each block (``cfg.wrap == "blocks"``), then the root, over all ranks.

    A collective call: every rank must shard the same model with the same weights (each keeps
    its dim-0 shard of every parameter and drops the rest).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = _mesh(device.type, world)
    precision = cfg.mixed_precision
    policy = MixedPrecisionPolicy(param_dtype=_dtype(precision.param_dtype),
                                  reduce_dtype=_dtype(precision.reduce_dtype))
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy,
                              "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.cpu_offload and device.type != "cpu":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    norms = 0
    if policy.param_dtype is not None:
        # BatchNorm stays fp32, each layer its own unit: its running statistics are fp32
        # buffers, which CPU batch norm refuses to mix with low-precision weights and inputs.
        norm_policy = MixedPrecisionPolicy(param_dtype=torch.float32,
                                           reduce_dtype=torch.float32,
                                           output_dtype=policy.param_dtype)
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                fully_shard(norm, **{**kwargs, "mp_policy": norm_policy})
                norms += 1
    units = wrap_units(module, block_of) if cfg.wrap == "blocks" else {}
    for modules in units.values():
        fully_shard(modules, **kwargs)
    # The root's outputs in fp32 whatever param_dtype says: the loss and metrics take them.
    root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                       reduce_dtype=policy.reduce_dtype,
                                       output_dtype=torch.float32 if precision.param_dtype
                                       else None)
    fully_shard(module, **{**kwargs, "mp_policy": root_policy})
    log.info("FSDP2 over %d ranks: %d block units + root, reshard_after_forward=%s%s", world,
             len(units), cfg.reshard_after_forward,
             f", compute in {precision.param_dtype} ({norms} BatchNorm units in fp32)"
             if precision.param_dtype else "")
    return module


def _state_dict_options(lean: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lean, strict=not lean)


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lean: bool = False) -> None:
    """Each rank writes its shards of the model and the optimizer state to ``folder/sharded``
    (collective).

    Only tensors are written: the optimizer's hyper-parameters come from the recipe on
    resume, so the checkpoint holds no pickled object that a load would have to trust.

    Args:
        lean: leave the frozen parameters out (an adapter stage's checkpoint).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    options = _state_dict_options(lean)
    if not optimizer.state:  # no step taken yet (or all skipped): nothing of it to write,
        # and get_state_dict would create its state by a zero step of the live optimizer
        state = {"model": get_model_state_dict(model, options=options)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optim": optim_state["state"]}
    dcp.save(state, checkpoint_id=str(Path(folder) / SHARDED))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lean: bool = False) -> None:
    """Load ``folder/sharded`` into the sharded model and its optimizer, resharded onto
    this run's ranks whatever number wrote it (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = _state_dict_options(lean)
    folder = Path(folder) / SHARDED
    saved = read_metadata(folder / ".metadata").state_dict_metadata
    if not any(k.startswith("optim.") for k in saved):  # saved before any optimizer step
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(model, state["model"], options=options)
        return
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state["state"]}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"],
                                     "param_groups": optim_state["param_groups"]},
                   options=options)


# What a DCP ``.metadata`` pickle may name: DCP's own records of tensor shapes and offsets.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of its dataclasses
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        refused = pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        # One plain name only: pickle resolves "a.b" by getattr through the module, and
        # DCP's metadata module imports os and torch ("os.system" would reach os.system).
        if "." in name or module not in _METADATA_GLOBALS:
            raise refused
        allowed = _METADATA_GLOBALS[module]
        if allowed is None:  # a class defined in that module, not one of its imports
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
            raise refused
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if name not in allowed and not dtype:
            raise refused
        return super().find_class(module, name)


def read_metadata(file: Path) -> Any:
    """A DCP ``.metadata`` file, unpickled with only DCP's record classes allowed (DCP itself
    reads it with plain ``pickle``).

    Raises:
        pickle.UnpicklingError: the file names anything else ("Unsupported global: ...").
        ValueError: it records a pickled object (DCP would load it with
            ``weights_only=False``); dist-ft's checkpoints hold tensors only.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(file, "rb") as fh:
        metadata = _MetadataUnpickler(fh).load()
    objects = [k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata)]
    if objects:
        raise ValueError(f"records pickled objects ({', '.join(objects[:3])}), which DCP "
                         "would load unchecked")
    return metadata
