"""Process-group and Accelerator set-up: one code path for 1..N processes, CPU or CUDA.

On a machine without CUDA this picks gloo and DeepSpeed's CPU accelerator; with CUDA, NCCL.
A run started as a plain process (no launcher) gets a one-process group on localhost, so the
same distributed code runs everywhere.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch

from dist_ft.config.schema import Recipe


def has_cuda() -> bool:
    """Whether this process can use a CUDA device."""
    return torch.cuda.is_available()


def ensure_process_group_env() -> None:
    """Give a launcher-less run the environment of a one-process group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })


def build_accelerator(recipe: Recipe) -> Any:
    """The Accelerator for a recipe: DDP or DeepSpeed ZeRO-N, gloo on CPU, NCCL on CUDA.

    The recipe decides the backend (``trainer.backend``, ``trainer.zero_stage``); the launcher
    (``accelerate launch``, torchrun, srun) decides the processes and machines.
    """
    cuda = has_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ensure_process_group_env()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    cfg = recipe.trainer
    handlers = [InitProcessGroupKwargs(
        backend="nccl" if cuda else "gloo",
        timeout=timedelta(minutes=cfg.collective_timeout_min),
    )]
    plugin = None
    if cfg.backend == "deepspeed":
        plugin = DeepSpeedPlugin(
            zero_stage=cfg.zero_stage,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            gradient_clipping=cfg.grad_clip_norm or 0.0,
            zero3_save_16bit_model=False,
        )
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
        plugin.deepspeed_config.setdefault("steps_per_print", 10**9)
    precision = cfg.precision if cuda else "no"
    # Without CUDA, Accelerate treats a multi-process run as distributed (MULTI_CPU, gloo)
    # only when told cpu=True; otherwise it silently trains each rank alone (no DDP).
    return Accelerator(
        cpu=not cuda and plugin is None,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )
