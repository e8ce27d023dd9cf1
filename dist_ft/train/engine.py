"""Backend-specific mechanics behind one interface: DDP, DeepSpeed ZeRO-1/2/3 or FSDP2.

What differs between backends, and only that, lives here: how a micro-batch's backward and
an optimizer step run (:class:`StepBackend`: ``backward``, ``clip``, ``step``, ``grad_norm``),
where the optimizer state of a parameter is, how to read full (unsharded) weights, gradients
and moments, and how to seed a freshly built optimizer with carried-over moments and step
counts. The training loop calls these and never asks which backend it runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dist_ft.config.schema import backend_label
from dist_ft.train import fsdp


def step_tensor(steps: int, group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
    """An Adam ``step`` count as torch keeps it for ``group``: on the parameter's device for
    fused or capturable groups, else a CPU scalar."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(steps), dtype=torch.float32, device=param.device)
    return torch.tensor(float(steps))


def is_deepspeed(accelerator: Any) -> bool:
    """Whether the Accelerator drives DeepSpeed."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage (0 for DDP / single process)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def is_fsdp(accelerator: Any, model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (see :mod:`dist_ft.train.fsdp`)."""
    return fsdp.is_sharded(unwrap(accelerator, model))


def backend_name(accelerator: Any, model: nn.Module | None = None) -> str:
    """What runs, in words: ``DeepSpeed ZeRO-2``, ``FSDP2``, ``DDP`` or ``one process``."""
    if model is not None and is_fsdp(accelerator, model):
        return backend_label("fsdp")
    if is_deepspeed(accelerator):
        return backend_label("deepspeed", zero_stage(accelerator))
    return backend_label("ddp") if accelerator.num_processes > 1 else "one process"


def unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    """The user's module inside DDP / the DeepSpeed engine."""
    return accelerator.unwrap_model(model)


@contextlib.contextmanager
def gathered(accelerator: Any, model: nn.Module,
             params: list[nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """Within the block, the unwrapped module holds full parameters (ZeRO-3 gathers them:
    ``params``, or all of them). Under FSDP2 they stay ``DTensor`` shards: read each through
    :func:`dist_ft.train.fsdp.full_tensor`, which gathers it.

    Collective under ZeRO-3: every rank must enter.
    """
    module = unwrap(accelerator, model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        gather = list(module.parameters()) if params is None else params
        with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
            yield module
    else:
        yield module


def average_bn_stats(accelerator: Any, model: nn.Module) -> None:
    """Average BatchNorm running statistics across ranks (DeepSpeed and FSDP2).

    DDP broadcasts buffers from rank 0 at every forward; DeepSpeed and FSDP2 leave each rank
    with the statistics of its own shard of the data. Averaging them (as timm's ``distribute_bn``
    does) before evaluation and saving makes every rank hold, and every file store, the
    same model.
    """
    if accelerator.num_processes < 2 or not (is_deepspeed(accelerator)
                                             or is_fsdp(accelerator, model)):
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
        state = {n: fsdp.full_tensor(p.detach()).float().cpu().clone()
                 for n, p in module.named_parameters()}
        state.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
    return state


def full_params(accelerator: Any, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the named parameters, whole (collective under ZeRO-3)."""
    if not names:
        return {}
    named = dict(unwrap(accelerator, model).named_parameters())
    params = [named[n] for n in names]
    with gathered(accelerator, model, params):
        return {n: fsdp.full_tensor(p.detach()).float().cpu().clone()
                for n, p in zip(names, params, strict=True)}


def optimizer_state_elements(accelerator: Any, model: nn.Module, keys: tuple[str, ...]) -> int:
    """Optimizer-state elements this rank holds (per-element state x what it covers).

    Under ZeRO-1/2/3 that is the rank's flat fp32 partitions; under FSDP2 its shards of the
    trainable parameters; under DDP every trainable element.
    """
    if is_deepspeed(accelerator):
        covered = sum(f.numel() for f, _ in _zero_partitions(accelerator)[1])
    else:
        covered = sum(fsdp.local_numel(p) for p in unwrap(accelerator, model).parameters()
                      if p.requires_grad)
    return covered * len(keys)


def full_grad(accelerator: Any, param: nn.Parameter) -> torch.Tensor | None:
    """The full gradient of ``param`` after backward, before the optimizer step."""
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    return None if param.grad is None else fsdp.full_tensor(param.grad)


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
    """Full optimizer state of every trainable parameter, by name (collective under ZeRO and
    FSDP2)."""
    module = unwrap(accelerator, model)
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_optimizer_state

        _relink_zero_state(accelerator)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            values = {k: safe_get_full_optimizer_state(param, k) for k in keys}
            if all(v is not None for v in values.values()):
                out[name] = {k: v.detach().cpu().clone() for k, v in values.items()}
        return out
    return _optimizer_state(module, optimizer, keys,
                            lambda t: fsdp.full_tensor(t).cpu().clone())


def _optimizer_state(module: nn.Module, optimizer: Any, keys: tuple[str, ...],
                     copy: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``copy`` of each trainable parameter's ``keys`` state in a torch optimizer (or
    Accelerate's wrapper of one), by name; parameters without that state are left out."""
    inner = getattr(optimizer, "optimizer", optimizer)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in module.named_parameters():
        state = inner.state.get(param)
        if param.requires_grad and state and all(k in state for k in keys):
            out[name] = {k: copy(state[k].detach()) for k in keys}
    return out


def carry_moments(accelerator: Any, model: nn.Module, optimizer: Any,
                  keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state to carry into the next stage's optimizer, by parameter name.

    Under FSDP2 each rank keeps its own shards (``DTensor``; nothing is gathered, the
    parameters keep their sharding); elsewhere the full state (:func:`snapshot_moments`).
    """
    if not is_fsdp(accelerator, model):
        return snapshot_moments(accelerator, model, optimizer, keys)
    return _optimizer_state(unwrap(accelerator, model), optimizer, keys, torch.Tensor.clone)


def _zero_partitions(accelerator: Any) -> tuple[Any, list[tuple[torch.Tensor, int]]]:
    """DeepSpeed's ZeRO optimizer and its flat fp32 partitions, each with the index of the
    param group it belongs to (ZeRO-3 may split a group into several sub-groups)."""
    zero_opt = accelerator.deepspeed_engine_wrapped.engine.optimizer
    if zero_stage(accelerator) == 3:
        flats = zero_opt.fp32_partitioned_groups_flat
        return zero_opt, [(f, zero_opt.sub_group_to_group_id[i]) for i, f in enumerate(flats)]
    return zero_opt, [(f, g) for g, f in enumerate(zero_opt.single_partition_of_fp32_groups)]


def group_steps(accelerator: Any, optimizer: Any) -> list[int | None]:
    """Each optimizer group's step count as the optimizer keeps it (None where it keeps
    none: SGD, or a group not stepped yet); under ZeRO the count of the group's flat fp32
    partition. Steps dropped for a non-finite loss do not count, unlike the run's steps."""
    if is_deepspeed(accelerator):
        zero_opt, partitions = _zero_partitions(accelerator)
        base = zero_opt.optimizer
        first = {g: flat for flat, g in reversed(partitions)}
        pairs = [(first.get(g), base) for g in range(len(base.param_groups))]
    else:
        inner = getattr(optimizer, "optimizer", optimizer)
        pairs = [(group["params"][0] if group["params"] else None, inner)
                 for group in inner.param_groups]
    steps: list[int | None] = []
    for key, opt in pairs:
        step = opt.state.get(key, {}).get("step") if key is not None else None
        steps.append(None if step is None else int(float(step)))
    return steps


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
                for k in keys:  # an FSDP2 shard is already where (and as) its param is
                    value = carried[k]
                    state[k] = value.clone() if fsdp.is_dtensor(value) \
                        else value.to(p.device, p.dtype).clone()
                if "exp_avg" in keys:
                    state["step"] = step_tensor(steps, group, p)
                seeded += 1
        return seeded

    from deepspeed.utils import safe_set_full_optimizer_state

    zero_opt, partitions = _zero_partitions(accelerator)
    base = zero_opt.optimizer
    for flat, g in partitions:
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
            if hasattr(param, "ds_id"):  # ZeRO-3
                set_zero3_partition(param, carried[k], k)
            else:
                safe_set_full_optimizer_state(param, carried[k], k)
        seeded += 1
    return seeded


def set_zero3_partition(param: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Set this rank's part of a ZeRO-3 parameter's fp32 master (``key`` None) or optimizer
    state ``key`` from the full ``value``.

    DeepSpeed's ``safe_set_full_*`` cut the full value into partitions without the padding
    of the last one, so they fail wherever the number of processes does not divide a
    tensor's size (3 processes, 32768 elements); the padded cut is made here.
    """
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    part, group = param.partition_numel(), param.ds_process_group
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    flat = torch.nn.functional.pad(value.detach().flatten(), (0, part * world - value.numel()))
    local = flat.narrow(0, part * rank, part)
    if key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, key)


class StepBackend:
    """Backward and optimizer step under DDP / one process (Accelerate's wrappers).

    Args:
        accelerator: the run's Accelerator.
        model: the prepared model.
        optimizer: the prepared optimizer.
    """

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: Any) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self._norm: torch.Tensor | None = None

    @property
    def replicated(self) -> bool:
        """Whether every rank holds the full weights (all but ZeRO-3)."""
        return zero_stage(self.accelerator) != 3

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (gradients accumulate until the step boundary)."""
        self.accelerator.backward(loss)

    def clip(self, max_norm: float | None) -> None:
        """Clip the gradients at a step boundary (kept as a tensor: no device sync)."""
        if max_norm:
            self._norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self, skip: bool = False) -> None:
        """Apply the update (Accelerate skips it between boundaries) or drop it; zero grads."""
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def grad_norm(self) -> float | None:
        """The last clipped step's global gradient norm, if known."""
        return None if self._norm is None else float(self._norm)


class DeepSpeedStepBackend(StepBackend):
    """Backward and step through the DeepSpeed engine (ZeRO-1/2/3).

    Accelerate's ``backward`` would also run ``engine.step()``; they are split so the loop can
    look at gradients between them. DeepSpeed clips from its own config
    (``gradient_clipping``) and itself drops an update whose gradient norm is not finite (its
    overflow path, every ZeRO stage): a requested skip is checked, not assumed.
    """

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: Any) -> None:
        super().__init__(accelerator, model, optimizer)
        self.engine = accelerator.deepspeed_engine_wrapped.engine

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward (scaling and accumulation are the engine's)."""
        self.engine.backward(loss)

    def clip(self, max_norm: float | None) -> None:
        """Nothing to do: the engine clips inside its step."""

    def step(self, skip: bool = False) -> None:
        """The engine's step; with ``skip``, check that DeepSpeed really dropped the update.

        Raises:
            RuntimeError: asked to skip, but the engine applied the update.
        """
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if skip and self.engine.skipped_steps == skipped_before:
            raise RuntimeError("the loss was not finite but DeepSpeed applied the update "
                               "(finite gradients?); stopping rather than go on")

    def grad_norm(self) -> float | None:
        """The engine's global gradient norm of the last step."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


class FsdpStepBackend(StepBackend):
    """Backward and step of an FSDP2 model with a plain torch optimizer.

    Gradients are reduce-scattered only by the backward that ends a step: before it they
    accumulate unsharded on each rank (``set_requires_gradient_sync``), as DDP's
    ``no_sync``. Clipping takes the global norm over every rank's gradient shards.
    """

    @property
    def replicated(self) -> bool:
        """Never: each rank holds its shards."""
        return False

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; reduce-scatter at the step boundary only."""
        self.model.set_requires_gradient_sync(self.accelerator.sync_gradients)
        self.accelerator.backward(loss)

    def clip(self, max_norm: float | None) -> None:
        """Clip to the global norm of the sharded gradients (a collective)."""
        if max_norm:
            grads = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            self._norm = fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(grads, max_norm))

    def step(self, skip: bool = False) -> None:
        """At a step boundary: the update (unless dropped), then zero the gradients."""
        if not self.accelerator.sync_gradients:
            return
        if not skip:
            self.optimizer.step()
        # Every parameter's: one frozen since its gradient was reduced must not keep it.
        self.model.zero_grad(set_to_none=True)


def step_backend(accelerator: Any, model: nn.Module, optimizer: Any) -> StepBackend:
    """The :class:`StepBackend` for the model's sharding and the Accelerator's type."""
    if is_fsdp(accelerator, model):
        return FsdpStepBackend(accelerator, model, optimizer)
    cls = DeepSpeedStepBackend if is_deepspeed(accelerator) else StepBackend
    return cls(accelerator, model, optimizer)


def prepare(accelerator: Any, module: nn.Module, make_optimizer: Any,
            shard: Any = None) -> tuple[nn.Module, Any]:
    """The model and optimizer to train: ``shard(module)`` (FSDP2, unless sharded already)
    and a plain optimizer over its DTensors, or both prepared by Accelerate (DDP, DeepSpeed).

    Args:
        make_optimizer: builds the optimizer over a module's parameters.
        shard: FSDP2's sharding of a plain module; None for the other backends.
    """
    if shard is None:
        return accelerator.prepare(module, make_optimizer(module))
    if not fsdp.is_sharded(module):
        module = shard(module)
    return module, make_optimizer(module)


def module_for_new_stage(accelerator: Any, model: nn.Module, rebuild: Any,
                         same_structure: bool = True) -> nn.Module:
    """The module to re-prepare for a new trainable set.

    DDP re-wraps the same module; FSDP2 keeps the same sharded module while its structure
    stays (``same_structure``: no adapters merged or injected). DeepSpeed has no
    ``add_param_group``, so a new engine is built, from a fresh module holding the gathered
    full weights (ZeRO-3 holds only shards): ``rebuild(state_dict)`` makes it; so is a new
    FSDP2 module around new adapters.
    """
    if is_deepspeed(accelerator) or (is_fsdp(accelerator, model) and not same_structure):
        return rebuild(full_state_dict(accelerator, model))
    return unwrap(accelerator, model)


def params_without_grad(accelerator: Any, model: nn.Module) -> list[str]:
    """Trainable parameters whose full gradient is missing or all zero (after backward)."""
    missing = []
    for name, param in unwrap(accelerator, model).named_parameters():
        if param.requires_grad:
            grad = full_grad(accelerator, param)
            if grad is None or not bool(torch.any(grad != 0)):
                missing.append(name)
    return missing
