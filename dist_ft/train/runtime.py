"""Process-group and Accelerator set-up: one code path for 1..N processes, CPU or CUDA.

On a machine without CUDA this picks gloo and DeepSpeed's CPU accelerator; with CUDA, NCCL.
The process-group environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) comes from the
launcher (``accelerate launch``, torchrun), from Slurm when the process is one task of an
``srun`` step (so ``srun dist-ft train`` needs no wrapper), or, for a plain process, a
one-process group on localhost: the same distributed code runs everywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from dist_ft.cluster import slurm_process_group_env
from dist_ft.config.schema import Recipe
from dist_ft.train.lifecycle import RunUsageError
from dist_ft.train.trackers import accelerate_log_with

log = logging.getLogger("dist_ft.train")


def _no_cuda_runtime_note(record: logging.LogRecord) -> bool:
    """Drop torch's "No CUDA runtime is found" warning: on a CPU machine it is the normal
    case, not news."""
    return not str(record.msg).startswith("No CUDA runtime is found")


class LauncherConflict(RuntimeError):
    """The launcher's settings contradict the recipe's; the message names both and the fix."""


def has_cuda() -> bool:
    """Whether this process can use a CUDA device."""
    return torch.cuda.is_available()


# Text of the errors gloo/NCCL raise when a peer is gone or silent (they are not all
# torch.distributed.DistError subclasses: gloo's come as plain RuntimeErrors).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting",
              "connection closed", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed because another rank died or hung."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_LOST)


def process_resources() -> dict[str, float]:
    """This process's open file descriptors and resident memory (MiB); empty off Linux."""
    try:
        fds = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/statm") as fh:
            resident_pages = int(fh.read().split()[1])
    except OSError:
        return {}
    return {"open_files": fds, "rss_mib": resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20}


def ensure_process_group_env() -> None:
    """Fill in the process-group environment when no launcher did.

    Order: a launcher's own variables win; then Slurm's, for a task of an ``srun`` step;
    else a one-process group on a free localhost port.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    slurm = slurm_process_group_env(os.environ)
    if slurm is not None:
        os.environ.update(slurm)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })


class BatchSizeError(ValueError):
    """``data.global_batch_size`` does not split evenly over the processes."""


def with_global_batch(recipe: Recipe, world: int) -> Recipe:
    """The recipe with ``data.batch_size`` derived from ``data.global_batch_size`` (if set)
    for ``world`` processes; unchanged without a global batch.

    Raises:
        BatchSizeError: the global batch is not a multiple of processes x accumulation steps,
            naming the three numbers and the nearest global batches that are.
    """
    data, accum = recipe.data, recipe.trainer.grad_accum_steps
    if data.global_batch_size is None:
        return recipe
    parts = world * accum
    per_process, left = divmod(data.global_batch_size, parts)
    if left or per_process == 0:
        lower, upper = max(parts, data.global_batch_size - left), (per_process + 1) * parts
        raise BatchSizeError(
            f"data.global_batch_size={data.global_batch_size} does not split over {world} "
            f"process(es) x trainer.grad_accum_steps={accum}: choose a multiple of {parts} "
            f"(e.g. {lower} or {upper}), or another number of processes")
    return recipe.model_copy(update={"data": data.model_copy(
        update={"batch_size": per_process})})


def check_launcher_agrees(recipe: Recipe, env: dict[str, str] | os._Environ[str]) -> None:
    """Refuse a launcher config whose DeepSpeed or FSDP settings contradict the recipe.

    ``accelerate launch --config_file launch/zero3.yaml`` exports its ZeRO stage; the recipe's
    ``trainer.backend``/``trainer.zero_stage`` decide the backend, so a disagreement would
    silently train under something neither file says. Offload devices are taken from the
    launcher (they change where state lives, not the arithmetic). ``launch/fsdp.yaml`` says
    FSDP (version 2); how FSDP2 shards comes from the recipe's ``trainer.fsdp``.

    Raises:
        LauncherConflict: naming both values and the override that reconciles them.
    """
    cfg = recipe.trainer
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        version = env.get("FSDP_VERSION", "1")
        if cfg.backend != "fsdp":
            raise LauncherConflict(
                f"the launcher config asks for FSDP but the recipe says trainer.backend="
                f"{cfg.backend}: add the override trainer.backend=fsdp, or launch with "
                "launch/cpu_2proc.yaml, launch/ddp_gpus.yaml or a launch/zero*.yaml config")
        if version != "2":
            raise LauncherConflict(
                f"the launcher config asks for FSDP version {version}; dist-ft shards with "
                "FSDP2 (fully_shard): set fsdp_version: 2 (see launch/fsdp.yaml)")
        return
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if ds_file not in ("", "none"):
        raise LauncherConflict(
            f"the launcher passes a DeepSpeed JSON ({ds_file}); dist-ft builds the DeepSpeed "
            "config from the recipe (trainer.zero_stage, trainer.grad_accum_steps, "
            "trainer.grad_clip_norm): use a launch/zero*.yaml config without "
            "deepspeed_config_file")
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if cfg.backend != "deepspeed":
        raise LauncherConflict(
            f"the launcher config asks for DeepSpeed ZeRO-{stage} but the recipe says "
            f"trainer.backend={cfg.backend}: add the override trainer.backend=deepspeed "
            f"trainer.zero_stage={stage}, or launch with launch/cpu_2proc.yaml or "
            "launch/ddp_gpus.yaml")
    if stage is not None and stage.isdigit() and int(stage) != cfg.zero_stage:
        raise LauncherConflict(
            f"the launcher config asks for ZeRO-{stage} but the recipe says "
            f"trainer.zero_stage={cfg.zero_stage}: add the override trainer.zero_stage={stage} "
            "(or use the launch config of the recipe's stage)")


def apply_timeout_to_new_groups(timeout: timedelta) -> None:
    """Make groups created later (DeepSpeed's data-parallel group, dist-ft's gloo side group)
    time out after ``timeout`` too.

    ``new_group`` without a timeout takes torch's module default (30 min for gloo, 10 for
    NCCL), not the world group's: a rank hung inside DeepSpeed's gradient all-reduce held its
    peers for 30 minutes whatever the recipe said. torch reads that default from these module
    globals at each ``new_group`` call; there is no public setter.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def check_precision_supported(recipe: Recipe, cuda: bool) -> None:
    """Refuse ``trainer.precision: fp16`` without CUDA (bf16 and fp32 run everywhere).

    Accelerate's fp16 (autocast + ``GradScaler`` loss scaling) engages on GPUs only: on CPU
    it would silently train in fp32; DeepSpeed's CPU accelerator has no fp16 either. bf16
    needs no loss scaling and runs on CPU (autocast under DDP and DeepSpeed).

    Raises:
        RunUsageError: fp16 asked for on a machine without CUDA (``dist-ft train`` exits 2).
    """
    if recipe.trainer.precision == "fp16" and not cuda:
        raise RunUsageError(
            "trainer.precision=fp16 needs CUDA (fp16 autocast with loss scaling is GPU-only "
            "in Accelerate and DeepSpeed) and this machine has none: use "
            "trainer.precision=bf16 (no loss scaling needed) or trainer.precision=no")


def deepspeed_bf16_config() -> dict[str, Any]:
    """The DeepSpeed config entries of ``trainer.precision: bf16``: torch autocast, not
    DeepSpeed's bf16 mode.

    DeepSpeed's ``bf16`` mode casts the module to bf16: BatchNorm's fp32 running statistics
    then meet bf16 weights, which CPU batch norm refuses ("expected scalar type BFloat16 but
    found Float"), fp32 images meet bf16 convolutions, and frozen weights are rounded to
    bf16. Its ``torch_autocast`` mode keeps every parameter, buffer and ZeRO master partition
    fp32 and runs the engine's forward under ``torch.autocast(dtype=bfloat16)``: matmuls and
    convolutions compute (and their gradients are reduced) in bf16, BatchNorm normalizes with
    its fp32 weights and statistics; the same on CPU and GPU. (Accelerate's own ``bf16``
    would set ``bf16.enabled``.)
    """
    return {"bf16": {"enabled": False}, "fp16": {"enabled": False},
            "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


def build_accelerator(recipe: Recipe) -> Any:
    """The Accelerator for a recipe: DDP, DeepSpeed ZeRO-N or FSDP2 (which it only launches
    and synchronises: dist-ft shards), gloo on CPU, NCCL on CUDA.

    The recipe decides the backend (``trainer.backend``, ``trainer.zero_stage``); the launcher
    (``accelerate launch``, torchrun, srun) decides the processes and machines, and may add
    DeepSpeed offload devices.

    Raises:
        LauncherConflict: the launcher's DeepSpeed or FSDP settings contradict the recipe.
    """
    check_launcher_agrees(recipe, os.environ)
    check_precision_supported(recipe, has_cuda())
    # dist-ft applies FSDP2 itself (dist_ft.train.fsdp); Accelerate's plugin, engaged by
    # launch/fsdp.yaml on GPUs only, would wrap and checkpoint differently on CPU and GPU.
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    cuda = has_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Said by every rank as DeepSpeed loads torch's extension builder, on every CPU run.
        logging.getLogger("torch.utils.cpp_extension").addFilter(_no_cuda_runtime_note)
    ensure_process_group_env()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    cfg = recipe.trainer
    timeout = timedelta(minutes=cfg.collective_timeout_min)
    backend = "nccl" if cuda else "gloo"
    if cuda and cfg.backend == "fsdp" and cfg.fsdp.cpu_offload:
        backend = "cuda:nccl,cpu:gloo"  # offloaded shards: collectives on CPU tensors too
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)]
    apply_timeout_to_new_groups(timeout)
    plugin = None
    if cfg.backend == "deepspeed":
        plugin = DeepSpeedPlugin(
            zero_stage=cfg.zero_stage,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            gradient_clipping=cfg.grad_clip_norm or 0.0,
            zero3_save_16bit_model=False,
        )
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
        # Explicitly: Accelerate drops a 0.0 from the config and DeepSpeed's default then
        # clips at 1.0, so trainer.grad_clip_norm=null would still clip.
        plugin.deepspeed_config["gradient_clipping"] = cfg.grad_clip_norm or 0.0
        plugin.deepspeed_config.setdefault("steps_per_print", 10**9)
        if cfg.precision == "bf16":
            plugin.deepspeed_config.update(deepspeed_bf16_config())
    if plugin is not None and not cuda and os.environ.get("RANK", "0") == "0" \
            and deepspeed_cpu_op_pending():  # else ~1 min of silence on a first run
        log.info("building DeepSpeed's CPU communication op (once, ~1 min)")
    precision = cfg.precision
    # Without CUDA, Accelerate treats a multi-process run as distributed (MULTI_CPU, gloo)
    # only when told cpu=True; otherwise it silently trains each rank alone (no DDP).
    # DeepSpeed prints "DeepSpeed ... built successfully" on stdout from every rank on every
    # run while its process group starts; stdout is the run's result (the `done:` lines).
    captured = io.StringIO()
    failed = True
    try:
        with contextlib.redirect_stdout(captured):
            acc = Accelerator(
                cpu=not cuda and plugin is None,
                mixed_precision=precision,
                gradient_accumulation_steps=cfg.grad_accum_steps,
                deepspeed_plugin=plugin,
                kwargs_handlers=handlers,
                log_with=accelerate_log_with(recipe.logging.trackers),  # mlflow, wandb
            )
        failed = False
    finally:  # on a failure (an op build that broke) what it printed is part of the story
        for line in captured.getvalue().splitlines():
            log.log(logging.WARNING if failed else logging.DEBUG, "%s", line)
    return acc


def deepspeed_cpu_op_pending() -> bool:
    """Whether DeepSpeed's CPU accelerator will compile its shared-memory communication op
    (``deepspeed_shm_comm``) when it starts: file checks only, nothing built.

    DeepSpeed JIT-builds the op with torch's extension builder (ninja, gcc) into
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/py3X_*``), once per
    DeepSpeed install; ninja rebuilds it when the library is missing, when its ``build.ninja``
    names other sources (another install) or when a source is newer. Call it with
    ``DS_ACCELERATOR=cpu`` set. False when the op is prebuilt or unusable here, or when
    anything about the check fails (it only decides whether to say so).
    """
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if (builder is None or installed_ops.get(builder.NAME, False)
                or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False)):
            return False
        folder = Path(_get_build_directory(builder.NAME, verbose=False))
        library, ninja = folder / f"{builder.NAME}.so", folder / "build.ninja"
        if not library.is_file() or not ninja.is_file():
            return True
        text, built = ninja.read_text(errors="replace"), library.stat().st_mtime
        sources = [os.path.abspath(builder.deepspeed_src_path(s)) for s in builder.sources()]
        return any(src not in text or os.path.getmtime(src) > built for src in sources)
    except Exception:  # an internal of DeepSpeed or torch moved: say nothing
        return False
