"""The tutorial training loop ``dist-ft bench trainer`` measures ``dist-ft train`` against.

What the Accelerate and torchvision tutorials teach, written without any of dist-ft's code so
that a cost anywhere in dist-ft (data path, augmentation, step, bookkeeping) shows in the
ratio: a plain ``Dataset`` that opens each PNG with PIL and applies torchvision's
``Resize -> RandomHorizontalFlip -> ToTensor -> Normalize``; a torchvision model; Adam with its
defaults; ``accelerator.prepare(model, optimizer, loader)``; forward /
``accelerator.backward`` / ``step`` / ``zero_grad``. DDP by default, or DeepSpeed ZeRO-N
(``--zero-stage``) through Accelerate's plugin.

It reads a ChestX-ray14-layout folder (``Data_Entry_2017.csv``, ``train_val_list.txt``,
``images*/``). Run under ``accelerate launch`` (one process per rank)::

    accelerate launch --multi_gpu --num_processes 2 -m dist_ft.bench.tutorial_loop \\
        --root DATA --model resnet18 --image-size 64 --batch-size 16 --steps 45 --out r.json

Rank 0 writes ``{"windows": [[step, samples, seconds], ...], "loop_started_at": UNIX_TIME}``:
consecutive windows of ``--every`` steps that cover the loop's time without gaps (all
processes' samples), and when the loop began (what came before is start-up).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia")


class ChestXray14(Dataset):
    """The images of ``train_val_list.txt`` with their 14 labels, one PIL load per sample."""

    def __init__(self, root: Path, transform: transforms.Compose) -> None:
        self.transform = transform
        paths = {p.name: p for p in root.glob("images*/**/*.png")}
        keep = set((root / "train_val_list.txt").read_text().split())
        self.samples: list[tuple[Path, torch.Tensor]] = []
        with open(root / "Data_Entry_2017.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                name = row["Image Index"]
                if name in keep and name in paths:
                    found = row["Finding Labels"].split("|")
                    label = torch.tensor([float(f in found) for f in FINDINGS])
                    self.samples.append((paths[name], label))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        return self.transform(Image.open(path).convert("RGB")), label


def main(argv: list[str] | None = None) -> int:
    """Train ``--steps`` optimizer steps; rank 0 writes the windows to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--num-classes", type=int, default=len(FINDINGS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--zero-stage", type=int, default=0, help="0: DDP; 1-3: DeepSpeed")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=5, help="window length in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed

    cuda = torch.cuda.is_available()
    plugin = None
    if args.zero_stage:
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        plugin = DeepSpeedPlugin(zero_stage=args.zero_stage)
        # No clipping, as in the DDP loop (left out, DeepSpeed would clip at 1.0).
        plugin.deepspeed_config["gradient_clipping"] = 0.0
    # gloo on CPU: without it Accelerate sees no backend and runs each rank alone.
    accelerator = Accelerator(cpu=not cuda and plugin is None, deepspeed_plugin=plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(
                                  backend="nccl" if cuda else "gloo",
                                  timeout=timedelta(minutes=10))])
    set_seed(args.seed)

    transform = transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    dataset = ChestXray14(args.root, transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, pin_memory=cuda, drop_last=True)
    model = torchvision.models.get_model(args.model, num_classes=args.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    model.train()
    loop_started_at = time.time()  # what came before is start-up
    windows: list[list[float]] = []
    step, samples = 0, 0
    start = time.perf_counter()
    while step < args.steps:
        for images, labels in loader:
            loss = loss_fn(model(images), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            samples += len(images) * accelerator.num_processes
            if step % args.every == 0 or step == 1:
                now = time.perf_counter()
                windows.append([step, samples, now - start])
                start, samples = now, 0
            if step >= args.steps:
                break
    if accelerator.is_main_process:
        args.out.write_text(json.dumps({"windows": windows, "loss": float(loss.detach()),
                                        "world_size": accelerator.num_processes,
                                        "loop_started_at": loop_started_at}))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
