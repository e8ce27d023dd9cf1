"""Box lists (real layout, bad rows), box geometry, pointing game, IoU and intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import DenseNet

from dist_ft.data.findings import FINDINGS
from dist_ft.data.synth import BBOX_HEADER, BBOX_LIST, image_boxes, write_synthetic
from dist_ft.explain.localize import (
    Box,
    BoxFileError,
    bootstrap_mean_by_group,
    box_scores,
    heatmaps_for,
    localization_report,
    read_bbox_csv,
    render_localization_markdown,
    scale_box,
    wilson_interval,
)

# Three rows as in the release's BBox_List_2017.csv (its header, LF ends, "Infiltrate").
REAL_ROWS = """\
Image Index,Finding Label,Bbox [x,y,w,h],,,
00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661
00020259_002.png,Infiltrate,611.555555555556,535.077934027778,249.173333333333,199.111111111111
00001688_000.png,Nodule,667.496296296296,276.31746031746,122.446560846561,150.620105820106
"""


def test_reads_the_release_layout(tmp_path: Path) -> None:
    path = tmp_path / BBOX_LIST
    path.write_text(REAL_ROWS)
    boxes = read_bbox_csv(path)
    assert [b.finding for b in boxes] == ["Atelectasis", "Infiltration", "Nodule"]
    assert boxes[0] == Box("00013118_008.png", "Atelectasis", 225.084745762712,
                           547.019216763771, 86.7796610169491, 79.1864406779661)


@pytest.mark.parametrize(("row", "message"), [
    ("a.png,Atelectasis,1,2,3", r":2: expected 6 cells"),
    ("a.png,Atelectasis,1,two,3,4", r":2: column 'y' of Bbox \[x,y,w,h\]: 'two'"),
    ("a.png,Atelectasis,1,2,0,4", r":2: box of a.png has width 0.0"),
    ("a.png,Lung cancer,1,2,3,4", r":2: column 'Finding Label': unknown finding 'Lung cancer'"),
    ("a.png,Atelectasis,1,2,nan,4", r":2: column 'w' .* not a finite number"),
])
def test_malformed_rows_are_named(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text(BBOX_HEADER + "\n" + row + "\n")
    with pytest.raises(BoxFileError, match=rf"boxes\.csv{message}"):
        read_bbox_csv(path)


def test_wrong_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("Image Index,Finding Labels,Follow-up #\n")
    with pytest.raises(BoxFileError, match=r"Data_Entry_2017\.csv:1: expected a header"):
        read_bbox_csv(path)


def test_twin_box_file_matches_what_is_drawn(tmp_path: Path) -> None:
    rows = write_synthetic(tmp_path, images=60, size=64, seed=4, box_fraction=1.0)
    text = (tmp_path / BBOX_LIST).read_text()
    assert text.startswith(BBOX_HEADER + "\n") and "Infiltration" not in text
    boxes = read_bbox_csv(tmp_path / BBOX_LIST)
    by_image = {r.image: r for r in rows}
    boxed = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
             "Pneumonia", "Pneumothorax"}
    expected = sum(1 for r in rows for k in r.labels if FINDINGS[k] in boxed)
    assert len(boxes) == expected > 10  # box_fraction=1: every positive pair
    for box in boxes:
        x, y, w, h = image_boxes(by_image[box.image], 64, 4)[box.finding]
        assert (box.x, box.y, box.w, box.h) == (x, y, w, h)


def test_scale_box_follows_the_loader_geometry() -> None:
    box = Box("a.png", "Mass", 512, 256, 128, 64)
    assert scale_box(box, 1024, 1024, 64) == (32, 16, 40, 20)
    # 2:1 landscape: the height becomes 64 and 32 px are cropped off each side.
    assert scale_box(Box("a.png", "Mass", 64, 0, 32, 32), 256, 128, 64) == (0, 0, 16, 16)


def test_pointing_game_and_iou() -> None:
    heat = np.zeros((20, 20))
    heat[5:10, 5:10] = 0.8
    heat[7, 7] = 1.0
    hit, iou = box_scores(heat, (5, 5, 10, 10))
    assert hit and iou == pytest.approx(1.0)
    hit, iou = box_scores(heat, (10, 10, 20, 20))
    assert not hit and iou == 0.0
    hit, iou = box_scores(heat, (5, 5, 15, 10))  # box twice the hot area
    assert hit and iou == pytest.approx(0.5)
    assert box_scores(np.zeros((4, 4)), (0, 0, 4, 4)) == (False, 0.0)


def test_intervals() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)  # the textbook value
    assert wilson_interval(0, 10)[0] == 0.0
    values = np.random.default_rng(0).random(400)
    groups = np.arange(400) // 2
    low, high = bootstrap_mean_by_group(values, groups, resamples=500, seed=1)
    assert low < values.mean() < high and high - low < 0.1
    narrow = bootstrap_mean_by_group(np.tile(values, 4), np.arange(1600) // 2, 500, 1)
    assert narrow[1] - narrow[0] < high - low  # more images: a narrower interval


def test_markdown_renders_every_finding() -> None:
    summary = {"boxes": 3, "images": 3, "hits": 2, "hit_rate": 2 / 3,
               "hit_rate_ci": [0.2, 0.9], "mean_iou": 0.4, "mean_iou_ci": [0.3, 0.5]}
    report = {"threshold": 0.5, "findings": {"Mass": summary}, "overall": summary,
              "skipped": {"no_image": 1, "not_a_class": 0}, "ci": "intervals"}
    text = render_localization_markdown(report)
    assert "| Mass | 3 | 0.667 [0.200-0.900] | 0.400 [0.300-0.500] |" in text
    assert "**all**" in text and "1 box(es) of images not evaluated" in text


def test_report_probes_the_model_once(tmp_path: Path) -> None:
    """One probe forward per report, then one per Grad-CAM batch; a float64 model works."""
    write_synthetic(tmp_path, images=24, size=64, seed=2, box_fraction=1.0)
    paths = {p.name: p for p in tmp_path.glob("images_*/images/*.png")}
    boxes = read_bbox_csv(tmp_path / BBOX_LIST)
    torch.manual_seed(0)
    model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                     num_classes=len(FINDINGS)).double().eval()
    batches: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    report = localization_report(model, 64, paths, boxes, list(FINDINGS), batch_size=4,
                                 resamples=50)
    handle.remove()
    per_finding = {}
    for box in boxes:
        per_finding.setdefault(box.finding, set()).add(box.image)
    expected = sum(-(-len(names) // 4) for names in per_finding.values())
    assert len(batches) == 1 + expected and batches[0] == 1
    assert report["overall"]["boxes"] == len(boxes) and report["map_cell_px"] == 8.0
    low, high = report["overall"]["mean_iou_ci"]
    assert low <= report["overall"]["mean_iou"] <= high
    maps = heatmaps_for(model, [paths[n] for n in sorted(paths)[:3]], 0, 64, batch_size=2)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32 and np.isfinite(maps).all()
