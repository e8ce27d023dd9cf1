"""The step-isolating loop of ``dist-ft bench trainer``: the tutorial's step on dist-ft's data.

The tutorial loop (:mod:`dist_ft.bench.tutorial_loop`) differs from ``dist-ft train`` in two
places at once: the data path (per-sample PIL vs dist-ft's loader and batched augmentation)
and the step (plain forward / backward / ``optimizer.step`` vs dist-ft's trainer). This loop
takes dist-ft's data path (the recipe's dataset, sampler and batched augmentation) and the
tutorial's step (the recipe's model, Adam with torch's defaults, ``accelerator.prepare``,
``accelerator.backward``, the recipe's backend and clipping), so that ``dist-ft`` vs this
loop measures the step alone, and this loop vs the tutorial the data path alone. Under
``trainer.backend: fsdp`` the model is sharded as PyTorch's FSDP2 tutorial does (``fully_shard``
on each block, then the root: :func:`dist_ft.train.fsdp.shard_model`, the trainer's units)
and Adam is built over its ``DTensor`` parameters instead of ``accelerator.prepare``.

Run under ``accelerate launch`` (one process per rank)::

    accelerate launch --multi_gpu --num_processes 2 -m dist_ft.bench.step_loop RECIPE \\
        --steps 60 --every 5 --out rates.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from dist_ft.config import load_recipe
from dist_ft.data.datasets import build_dataset
from dist_ft.data.transforms import BatchAugment, BatchNormalize
from dist_ft.models.factory import build_model
from dist_ft.models.preprocessing import input_config
from dist_ft.train.runtime import with_global_batch


def main(argv: list[str] | None = None) -> int:
    """Train ``--steps`` optimizer steps; rank 0 writes each window's images and seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=5, help="window length in steps")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    # The per-process batch dist-ft trains with (data.global_batch_size, if set, split).
    recipe = with_global_batch(load_recipe(args.recipe), int(os.environ.get("WORLD_SIZE", "1")))

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    cfg = recipe.trainer
    plugin = None
    if cfg.backend == "deepspeed":
        plugin = DeepSpeedPlugin(zero_stage=cfg.zero_stage)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
        # Set explicitly: left out, DeepSpeed clips at 1.0.
        plugin.deepspeed_config["gradient_clipping"] = cfg.grad_clip_norm or 0.0
    acc = Accelerator(cpu=not cuda and plugin is None, deepspeed_plugin=plugin,
                      kwargs_handlers=[InitProcessGroupKwargs(
                          backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=10))])
    torch.manual_seed(cfg.seed)

    # The recipe's architecture (torchvision's or timm's), randomly initialised as the tutorial.
    model = build_model(recipe.model.model_copy(update={"pretrained": "none"}))
    prep = input_config(recipe.model, recipe.data)
    data = recipe.data
    dataset = build_dataset(data, "train")
    sampler = DistributedSampler(dataset, acc.num_processes, acc.process_index, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler,
                        num_workers=data.num_workers, pin_memory=cuda,
                        persistent_workers=data.num_workers > 0)
    fsdp = cfg.backend == "fsdp"
    if fsdp:  # Accelerate's FSDP plugin does not engage on CPU: shard as the trainer does
        from dist_ft.models.spec import describe_model
        from dist_ft.train.fsdp import shard_model

        block_of = describe_model(model, recipe.model.name).blocks.block_of
        model = shard_model(model, block_of, cfg.fsdp, acc.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.optim.lr)
    if not fsdp:
        model, optimizer = acc.prepare(model, optimizer)
    augment = BatchAugment(data.image_size, data.augment.crop_scale, data.augment.ratio,
                           hflip=data.augment.hflip, rotation_deg=data.augment.rotation_deg,
                           mode=prep.interpolation)
    normalize = BatchNormalize(prep.mean, prep.std).to(acc.device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(cfg.seed)

    model.train()
    loop_started_at = time.time()
    windows: list[list[float]] = []
    step, epoch = 0, 0
    start, images = time.perf_counter(), 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x = normalize(augment(x.to(acc.device, non_blocking=True), generator))
            loss = loss_fn(model(x), y.to(acc.device, non_blocking=True))
            acc.backward(loss)  # under DeepSpeed this also steps (and clips) the engine
            if fsdp and cfg.grad_clip_norm:  # the global norm over every rank's shards
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            elif plugin is None and cfg.grad_clip_norm:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            images += len(x) * acc.num_processes
            if step % args.every == 0 or step == 1:
                now = time.perf_counter()
                windows.append([step, images, now - start])
                start, images = now, 0
            if step >= args.steps:
                break
        epoch += 1
    if acc.is_main_process:
        args.out.write_text(json.dumps({"windows": windows, "loss": float(loss.detach()),
                                        "world_size": acc.num_processes,
                                        "loop_started_at": loop_started_at}))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
