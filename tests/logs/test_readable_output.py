"""What ``dist-ft aggregate`` shows: readable optimizer-group labels with the stage apart,
"best" only for metrics, freeze-stage markers on plots, folder names that never collide."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from dist_ft.logs.aggregate import best_mode, stage_boundaries, tag_label
from dist_ft.logs.outputs import plot_figure
from dist_ft.logs.report import aggregate_runs
from dist_ft.logs.runs import load_members

MERGED = "lr/default.no_decay+head.no_decay@full"
STAGES = [{"name": "head", "start_step": 0, "include": ["head"]},
          {"name": "top", "start_step": 4, "include": ["head", {"last_blocks": 2}]},
          {"name": "full", "start_step": 8, "include": ["all"]}]


def staged_run(folder: Path, lr: float, every: int = 1, steps: int = 12) -> Path:
    """A run as the trainer logs one (torch's SummaryWriter, the trainer's tags): three freeze
    stages starting at steps 0, 4 and 8, logged every ``every`` steps."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(
        {"optim": {"lr": lr}, "plan": {"stages": STAGES}}, sort_keys=False))
    writer = SummaryWriter(str(folder / "tb"))
    for step in range(every, steps + 1, every):
        stage = sum(step > s["start_step"] for s in STAGES[1:])  # step = updates done
        writer.add_scalar("train/loss", 1.0 / step, step)
        writer.add_scalar("train/samples_per_s", 100.0 + step, step)
        writer.add_scalar("train/grad_norm", 2.0 - step / 10, step)
        writer.add_scalar("train/stage", stage, step)
        writer.add_scalar("lr/head", lr * (1 - step / 20), step)
        if stage == 2:
            writer.add_scalar(MERGED, lr / 10, step)
        if step % 4 == 0:
            writer.add_scalar("val/auroc_mean", 0.5 + step / 100, step)
            writer.add_scalar("val/loss", 1.0 / step, step)
            writer.add_scalar("val/gap", 0.1, step)
    writer.close()
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readable") / "sweep"
    staged_run(root / "a", 0.001)
    staged_run(root / "b", 0.003)
    return root


def test_csv_has_the_groups_own_name_and_the_stage_apart(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "agg"
    aggregate_runs([sweep], out, group_by=["optim.lr"], plot=[])
    with open(out / "scalars.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["group", "tag", "step", "members", "nonfinite", "mean", "std",
                             "min", "max", "label", "since_stage"]
    merged = {(r["label"], r["since_stage"]) for r in rows if r["tag"] == MERGED}
    assert merged == {("default (no decay) + head (no decay)", "full")}
    assert {(r["label"], r["since_stage"]) for r in rows if r["tag"] == "lr/head"} == \
        {("head", "")}
    assert {r["label"] for r in rows if r["tag"] == "train/loss"} == {"train/loss"}


def test_best_only_for_metrics(sweep: Path, tmp_path: Path) -> None:
    summary = aggregate_runs([sweep], tmp_path / "agg", group_by=["optim.lr"], plot=[])
    group = summary["groups"]["optim.lr=0.001"]
    for tag in ("lr/head", MERGED, "train/samples_per_s", "train/grad_norm", "train/stage",
                "val/gap"):
        assert "best" not in group[tag] and "final" in group[tag], tag
    assert group["train/loss"]["best"] == {"step": 12, "value": pytest.approx(1 / 12),
                                           "mode": "min"}
    assert group["val/auroc_mean"]["best"]["mode"] == "max"
    assert group["val/auroc_mean"]["best"]["step"] == 12
    assert group[MERGED]["label"] == "default (no decay) + head (no decay)"
    assert group[MERGED]["since_stage"] == "full"
    assert [best_mode(t) for t in ("val/f1_macro", "val_auroc/Mass", "rank/loss", "lr/x")] == \
        ["max", "max", "min", None]


def test_labels_of_every_group_the_trainer_names() -> None:
    """Every optimizer group of the smoke recipe's stages, as the trainer names it (with and
    without layer decay), reads without the tag's punctuation and keeps its stage apart."""
    from dist_ft.config.load import load_recipe
    from dist_ft.models.spec_cache import fast_model_spec
    from dist_ft.plan import resolve_plan
    from dist_ft.train.stages import optimizer_groups
    from tests.conftest import CONFIGS

    for extra in ([], ["optim.layer_decay=0.8"], ["optim.groups=[]"]):
        recipe = load_recipe(CONFIGS / "chestxray14_smoke.yaml", extra)
        plan = resolve_plan(recipe, fast_model_spec(recipe.model))
        stage_names = {s.name for s in plan.stages}
        for index in range(len(plan.stages)):
            for group in optimizer_groups(plan, index):
                named = tag_label(f"lr/{group.name}")
                assert "@" not in named.label and "." not in named.label, (group.name, named)
                assert "no_decay" not in named.label
                assert named.since_stage in stage_names | {""}
                assert ("@" in group.name) == bool(named.since_stage)


def test_stage_boundaries_at_the_plans_start_steps(sweep: Path, tmp_path: Path) -> None:
    members, root = load_members([sweep], workers=1)
    marks = stage_boundaries(members, ["optim.lr"], root)
    assert marks == {f"optim.lr={lr}": [(4, "top"), (8, "full")] for lr in (0.001, 0.003)}
    # Logged every 5 steps: the first point (5) is in "top" already, "full" shows at 10; the
    # plan says 4 and 8.
    sparse = staged_run(tmp_path / "sparse", 0.001, every=5, steps=15)
    members, root = load_members([sparse], workers=1)
    assert stage_boundaries(members, ["run"], root) == {"sparse": [(4, "top"), (8, "full")]}
    (sparse / "recipe.yaml").unlink()  # without a recipe: the first step logged, no names
    members, root = load_members([sparse], workers=1)
    assert stage_boundaries(members, ["dir"], root) == {"tb": [(10, "stage 2")]}


def test_plots_mark_stage_changes_and_name_each_group(sweep: Path) -> None:
    import matplotlib.pyplot as plt

    from dist_ft.logs.aggregate import aggregate

    members, root = load_members([sweep], workers=1)
    results = aggregate(members, ["optim.lr"], None, ["mean", "std"], "intersection", root)
    marks = stage_boundaries(members, ["optim.lr"], root)
    fig = plot_figure(results, ["lr/head", MERGED], marks)
    try:
        (ax,) = fig.axes
        lines = [ln for ln in ax.lines if ln.get_gid() == "stage-boundary"]
        assert sorted(ln.get_xdata()[0] for ln in lines) == [4, 8]
        assert sorted(t.get_text().strip() for t in ax.texts) == ["full", "top"]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "default (no decay) + head (no decay), since full · optim.lr=0.001 (n=1)" \
            in legend
        assert "head · optim.lr=0.003 (n=1)" in legend
        assert not any("@" in t or "no_decay" in t for t in legend)
        styles = [(str(ln.get_color()), ln.get_linestyle()) for ln in ax.lines
                  if ln.get_gid() != "stage-boundary"]
        assert len(styles) == 4 and len(set(styles)) == 4
    finally:
        plt.close(fig)
    plain = plot_figure(results, ["train/loss"], None)  # without boundaries: no markers
    try:
        assert not [ln for ln in plain.axes[0].lines if ln.get_gid() == "stage-boundary"]
    finally:
        plt.close(plain)


def test_default_plots_include_every_learning_rate_in_one(sweep: Path, tmp_path: Path) -> None:
    summary = aggregate_runs([sweep], tmp_path / "agg", group_by=["optim.lr"])
    names = sorted(Path(p).name for p in summary["plots"])
    assert names == ["lr.png", "train_loss.png", "val_auroc_mean.png", "val_loss.png"]


def test_groups_differing_only_in_punctuation_keep_apart(tmp_path: Path) -> None:
    """Two groups whose names map to one folder name get two folders; list values read by
    their items' names unless that would merge groups."""
    for name, value in (("x", "a b"), ("y", "a_b")):
        staged_run(tmp_path / "in" / name, 0.001, steps=4)
        recipe = tmp_path / "in" / name / "recipe.yaml"
        data = yaml.safe_load(recipe.read_text())
        recipe.write_text(yaml.safe_dump({**data, "data": {"name": value}}))
    out = tmp_path / "out"
    summary = aggregate_runs([tmp_path / "in"], out, group_by=["data.name", "plan.stages"],
                             tags=["train/loss"], plot=[], tensorboard=True)
    assert sorted(summary["groups"]) == ["data.name=a b,plan.stages=head+top+full",
                                         "data.name=a_b,plan.stages=head+top+full"]
    folders = sorted(p.name for p in (out / "tb").iterdir())
    assert len(folders) == 2 and folders[1] == folders[0] + "-2"
    # Same stage names, other start steps: the compact labels would merge, so none is used.
    recipe = tmp_path / "in" / "y" / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["plan"]["stages"][1]["start_step"] = 3
    recipe.write_text(yaml.safe_dump(data))
    summary = aggregate_runs([tmp_path / "in"], tmp_path / "out2", group_by=["plan.stages"],
                             tags=["train/loss"], plot=[])
    assert len(summary["groups"]) == 2
    assert all("'start_step'" in g for g in summary["groups"])
