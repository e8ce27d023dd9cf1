"""Grad-CAM points at the evidence: hand-built models (alignment) and a model trained on the twin.

The alignment tests need no training: models whose last feature map is a blurred copy of the
image, read by a global average pool and a linear head, so Grad-CAM is exactly that map and
its peak must fall on a bright blob wherever the blob is. Naive upsampling (each cell at the
centre of an even tiling) misses: it shifts pad-1 stride-2 maps by (stride - 1) / 2 pixels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock

from dist_ft.explain.gradcam import default_layer, gradcam, map_geometry, upsample


def blob_batch(size: int, side: int, step: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One image per blob position: a bright ``side`` square on black, at every ``step``."""
    corners = [(y, x) for y in range(0, size - side + 1, step)
               for x in range(0, size - side + 1, step)]
    images = torch.zeros(len(corners), 3, size, size)
    for k, (y, x) in enumerate(corners):
        images[k, :, y : y + side, x : x + side] = 1.0
    return images, corners


def misses(cam: torch.Tensor, corners: list[tuple[int, int]], side: int) -> list[tuple]:
    """Blob corners whose map's argmax pixel is outside the blob, with that pixel."""
    out = []
    for k, (y, x) in enumerate(corners):
        py, px = divmod(int(cam[k].argmax()), cam.shape[-1])
        if not (y <= py < y + side and x <= px < x + side):
            out.append(((y, x), (py, px)))
    return out


def box_filter(conv: nn.Conv2d) -> None:
    """Make ``conv`` average its kernel window of input channel 0 into output channel 0."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0 / conv.weight[0, 0].numel()


class Blur(nn.Module):
    """Features: a 3x3 mean, then three pad-1 stride-2 3x3 means (stride 8); GAP; linear."""

    def __init__(self) -> None:
        super().__init__()
        convs = [nn.Conv2d(3 if i == 0 else 1, 1, 3, stride=1 if i == 0 else 2, padding=1,
                           bias=False) for i in range(4)]
        for conv in convs:
            box_filter(conv)
        self.features = nn.Sequential(*convs)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def blur_resnet() -> ResNet:
    """A torchvision ResNet-10 whose ``layer4`` channel 0 is the 7x7-blurred, max-pooled image.

    Stem: a 7x7 mean of channel 0; every residual branch is zeroed, so blocks pass the
    shortcut on (stride-2 ones sample it with their 1x1 convolution); the head reads channel 0.
    """
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                if name == "conv1":
                    box_filter(module)
                elif name.endswith("downsample.0"):
                    module.weight[0, 0] = 1.0
        model.fc.weight.zero_()
        model.fc.weight[0, 0] = 1.0
        model.fc.bias.zero_()
    return model


@pytest.mark.parametrize("size", [56, 60, 64, 72])  # 7, 8 (ceil), 8 and 9 cells
def test_peak_on_blob_stride8(size: int) -> None:
    # Blobs of 10 px: every blob holds a cell centre within 4 px of its middle (cells 8 px).
    model, side = Blur().eval(), 10
    images, corners = blob_batch(size, side, step=2)
    cam = gradcam(model, images, 0, layer="features")
    assert cam.shape == (len(corners), size, size)
    assert misses(cam, corners, side) == []
    # Cell i is centred on pixel 8i (each pad-1 stride-2 3x3 window is centred on 2i).
    assert map_geometry(model, images[:1], model.features) == ((8.0, 0.0), (8.0, 0.0))
    # The same maps spread as an even tiling (align_corners=False) miss blobs: the test can fail.
    raw = model.features(images).detach()
    naive = upsample(raw, (size, size), None)[:, 0]
    assert len(misses(naive, corners, side)) > len(corners) // 10


def test_peak_on_blob_resnet_default_layer() -> None:
    model, size, side = blur_resnet(), 128, 40  # 4x4 cells of 32 px
    assert default_layer(model) == "layer4"
    images, corners = blob_batch(size, side, step=11)
    cam = gradcam(model, images, 0)
    assert misses(cam, corners, side) == []
    assert map_geometry(model, images[:1], model.layer4) == ((32.0, 0.0), (32.0, 0.0))
    raw = model.layer4(model.layer3(model.layer2(model.layer1(
        model.maxpool(model.relu(model.bn1(model.conv1(images))))))))[:, :1].detach()
    assert len(misses(upsample(raw, (size, size), None)[:, 0], corners, side)) > len(corners) // 5


def test_map_geometry_of_supported_families() -> None:
    """Cell centres of each family's default layer, from the architectures' strides."""
    from torchvision.models import get_model

    expected = {"resnet18": 0.0, "densenet121": 14.0, "efficientnet_b0": 0.0,
                "convnext_tiny": 15.5}  # ConvNeXt's unpadded stride-4/2 stages tile evenly
    for name, offset in expected.items():
        model = get_model(name, weights=None).eval()
        geometry = map_geometry(model, torch.zeros(1, 3, 64, 64),
                                model.get_submodule(default_layer(model)))
        assert geometry == ((32.0, offset), (32.0, offset)), name


class TwinNet(nn.Module):
    """A small CNN (stride-4 features, GAP, linear head), for this test only.

    The supported torchvision models end at stride 32: a 2x2 map at 64 px cannot point into
    a 14 px box, and the smallest is too slow to train here.
    """

    def __init__(self, width: int = 16, classes: int = 14) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU()]

        self.features = nn.Sequential(*block(3, width, 2), *block(width, 2 * width, 1),
                                      *block(2 * width, 2 * width, 2),
                                      *block(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def test_trained_on_twin_points_into_boxes(tmp_path: Path) -> None:
    """Grad-CAM of a model trained on the twin (one pattern per finding) peaks in the boxes."""
    import torch.nn.functional as F
    from torchmetrics.functional.classification import binary_auroc

    from dist_ft.data.findings import FINDINGS
    from dist_ft.data.synth import BOX_FINDINGS, write_synthetic
    from dist_ft.data.transforms import BatchNormalize
    from dist_ft.explain.localize import localization_report, read_bbox_csv
    from dist_ft.explain.predict import load_image_tensor

    size = 64
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # denormal weights slow CPU training ~20x over time

    def load(root: Path, rows: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
        paths = {p.name: p for p in root.glob("images_*/images/*.png")}
        x = torch.stack([load_image_tensor(paths[r.image], size) for r in rows])
        y = torch.zeros(len(rows), len(FINDINGS))
        for i, r in enumerate(rows):
            y[i, list(r.labels)] = 1
        return x, y, paths

    try:
        train = write_synthetic(tmp_path / "train", images=2000, size=size, seed=0,
                                box_fraction=0, distinct_patterns=True)
        held = write_synthetic(tmp_path / "eval", images=400, size=size, seed=1,
                               box_fraction=1.0, distinct_patterns=True)
        x, y, _ = load(tmp_path / "train", train)
        ex, ey, paths = load(tmp_path / "eval", held)
        model, norm = TwinNet(), BatchNormalize()
        untrained = TwinNet().eval()
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        draw = torch.Generator().manual_seed(0)
        for _ in range(600):
            idx = torch.randint(0, len(x), (32,), generator=draw)
            loss = F.binary_cross_entropy_with_logits(model(norm(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            prob = torch.sigmoid(model(norm(ex)))
        learned = [f for f in BOX_FINDINGS
                   if float(binary_auroc(prob[:, FINDINGS.index(f)], ey[:, FINDINGS.index(f)]
                                         .int())) > 0.9]
        assert len(learned) >= 6, learned
        boxes = [b for b in read_bbox_csv(tmp_path / "eval" / "BBox_List_2017.csv")
                 if b.finding in learned]

        def pointing(net: nn.Module, classes: list[str]) -> dict:
            return localization_report(net, size, paths, boxes, classes, batch_size=256,
                                       layer="features", resamples=10)

        report = pointing(model, list(FINDINGS))
        hits = {f: s["hit_rate"] for f, s in report["findings"].items()}
        print("pointing game per finding:", {f: round(h, 3) for f, h in hits.items()})
        assert report["overall"]["hit_rate"] > 0.9, hits
        assert report["map_cell_px"] == 4 and report["median_box_px"] > 4  # fine enough
        assert min(hits.values()) > 0.6, hits
        # Can fail: the map of the next finding's class, or an untrained model, misses.
        wrong = pointing(model, [*FINDINGS[1:], FINDINGS[0]])
        assert wrong["overall"]["hit_rate"] < 0.5, wrong["findings"]
        assert pointing(untrained, list(FINDINGS))["overall"]["hit_rate"] < 0.5
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_flush_denormal(False)
