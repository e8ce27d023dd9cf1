"""Backend-specific mechanics behind one interface: DDP or DeepSpeed ZeRO-1/2/3.

What differs between backends, and only that, lives here: where the optimizer state of a
parameter is, how to read full (unsharded) weights, gradients and moments, and how to seed a
freshly built optimizer with carried-over moments and step counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dist_ft.train.stages import step_tensor


def is_deepspeed(accelerator: Any) -> bool:
    """Whether the Accelerator drives DeepSpeed."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage (0 for DDP / single process)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    """The user's module inside DDP / the DeepSpeed engine."""
    return accelerator.unwrap_model(model)


@contextlib.contextmanager
def gathered(accelerator: Any, model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the unwrapped module holds full parameters (ZeRO-3 gathers them).

    Collective under ZeRO-3: every rank must enter.
    """
    module = unwrap(accelerator, model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


def average_bn_stats(accelerator: Any, model: nn.Module) -> None:
    """Average BatchNorm running statistics across ranks (DeepSpeed only).

    DDP broadcasts buffers from rank 0 at every forward; DeepSpeed leaves each rank with the
    statistics of its own shard of the data. Averaging them (as timm's ``distribute_bn``
    does) before evaluation and saving makes every rank hold, and every file store, the
    same model.
    """
    if not is_deepspeed(accelerator) or accelerator.num_processes < 2:
        return
    from torch.nn.modules.batchnorm import _BatchNorm

    world = accelerator.num_processes
    for module in unwrap(accelerator, model).modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                if buf is not None:
                    torch.distributed.all_reduce(buf)
                    buf.div_(world)


def full_state_dict(accelerator: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of every parameter and buffer, torchvision's names (collective).

    BatchNorm statistics are averaged across ranks first (see :func:`average_bn_stats`).
    """
    average_bn_stats(accelerator, model)
    with gathered(accelerator, model) as module:
        state = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
        state.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
    return state


def optimizer_state_elements(accelerator: Any, model: nn.Module, keys: tuple[str, ...]) -> int:
    """Optimizer-state elements this rank holds (per-element state x what it covers).

    Under ZeRO-1/2/3 that is the rank's flat fp32 partitions; under DDP every trainable
    element.
    """
    if is_deepspeed(accelerator):
        zero_opt = accelerator.deepspeed_engine_wrapped.engine.optimizer
        flats = (zero_opt.fp32_partitioned_groups_flat if zero_stage(accelerator) == 3
                 else zero_opt.single_partition_of_fp32_groups)
        covered = sum(f.numel() for f in flats)
    else:
        covered = sum(p.numel() for p in unwrap(accelerator, model).parameters()
                      if p.requires_grad)
    return covered * len(keys)


def full_grad(accelerator: Any, param: nn.Parameter) -> torch.Tensor | None:
    """The full gradient of ``param`` after backward, before the optimizer step."""
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    return param.grad


def _relink_zero_state(accelerator: Any) -> None:
    """Re-link ZeRO-1/2 parameter fragments to the optimizer state as it is now.

    DeepSpeed links them once, right after the first group's first step, so groups stepped
    later (or state created by us) stay unlinked and ``safe_get/set_full_optimizer_state``
    fail with "exp_avg not found in optimizer state fragment".
    """
    if zero_stage(accelerator) in (1, 2):
        zero_opt = accelerator.deepspeed_engine_wrapped.engine.optimizer
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()


def snapshot_moments(accelerator: Any, model: nn.Module, optimizer: Any,
                     keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Full optimizer state of every trainable parameter, by name (collective under ZeRO)."""
    module = unwrap(accelerator, model)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_optimizer_state

        _relink_zero_state(accelerator)
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            values = {k: safe_get_full_optimizer_state(param, k) for k in keys}
            if all(v is not None for v in values.values()):
                out[name] = {k: v.detach().cpu().clone() for k, v in values.items()}
        return out
    inner = getattr(optimizer, "optimizer", optimizer)
    for name, param in module.named_parameters():
        state = inner.state.get(param)
        if param.requires_grad and state and all(k in state for k in keys):
            out[name] = {k: state[k].detach().cpu().clone() for k in keys}
    return out


def seed_moments(accelerator: Any, model: nn.Module, optimizer: Any, keys: tuple[str, ...],
                 moments: dict[str, dict[str, torch.Tensor]], steps_by_group: list[int]) -> int:
    """Put carried moments into a freshly built optimizer; returns how many params got them.

    Every group's state is created now (zeros, with that group's step count), so parameters
    without carried moments start fresh exactly as a new optimizer would.
    """
    module = unwrap(accelerator, model)
    named = dict(module.named_parameters())
    if not is_deepspeed(accelerator):
        inner = getattr(optimizer, "optimizer", optimizer)
        index = {id(p): n for n, p in named.items()}
        seeded = 0
        for group, steps in zip(inner.param_groups, steps_by_group, strict=True):
            for p in group["params"]:
                carried = moments.get(index[id(p)])
                if carried is None:
                    continue
                state = inner.state[p]
                for k in keys:
                    state[k] = carried[k].to(p.device, p.dtype).clone()
                if "exp_avg" in keys:
                    state["step"] = step_tensor(steps, group, p)
                seeded += 1
        return seeded

    from deepspeed.utils import safe_set_full_optimizer_state

    zero_opt = accelerator.deepspeed_engine_wrapped.engine.optimizer
    base = zero_opt.optimizer
    if zero_stage(accelerator) == 3:
        flats = zero_opt.fp32_partitioned_groups_flat
        group_of = [zero_opt.sub_group_to_group_id[i] for i in range(len(flats))]
    else:
        flats = zero_opt.single_partition_of_fp32_groups
        group_of = list(range(len(flats)))
    for flat, g in zip(flats, group_of, strict=True):
        state: dict[str, torch.Tensor] = {k: torch.zeros_like(flat) for k in keys}
        if "exp_avg" in keys:
            state["step"] = step_tensor(steps_by_group[g], base.param_groups[g], flat)
        base.state[flat] = state
    _relink_zero_state(accelerator)  # link parameter fragments to the state just made
    seeded = 0
    for name, param in named.items():
        carried = moments.get(name)
        if carried is None or not param.requires_grad:
            continue
        for k in keys:
            safe_set_full_optimizer_state(param, carried[k], k)
        seeded += 1
    return seeded
