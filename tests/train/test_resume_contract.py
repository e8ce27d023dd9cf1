"""What a resume compares: pure functions on the recorded contract."""

from __future__ import annotations

import pytest

from dist_ft.train.resume import (
    ResumeMismatch,
    check_resume,
    run_contract,
    with_recorded_global_batch,
)

RECIPE = {"output_dir": "/runs/a", "model": {"name": "resnet18", "num_classes": 14,
                                             "pretrained": "imagenet"},
          "optim": {"name": "adamw", "lr": 1e-3}, "data": {"root": "/data", "batch_size": 8,
                                                           "num_workers": 4},
          "trainer": {"epochs": 3, "keep_last": 3, "backend": "deepspeed", "zero_stage": 2},
          "schedule": {"warmup_steps": 10}, "logging": {"every_steps": 10}}


def contract(world: int = 2, split: str = "sha256:a", **changes: object) -> dict:
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPE.items()}
    for key, value in changes.items():
        section, name = key.split("__")
        recipe[section][name] = value
    return run_contract(recipe, "sha256:plan", split, recipe["data"]["batch_size"] * world)


def test_operational_keys_are_not_compared() -> None:
    saved = contract()
    now = contract(data__num_workers=0, trainer__keep_last=1, logging__every_steps=1,
                   model__pretrained="none")
    assert check_resume(saved, now, [], "ckpt") == []
    assert "output_dir" not in saved and "data.num_workers" not in saved


def test_fixed_keys_are_refused_even_when_accepted() -> None:
    with pytest.raises(ResumeMismatch) as info:
        check_resume(contract(), contract(optim__name="sgd", trainer__zero_stage=3),
                     ["optim", "trainer"], "ckpt")
    text = str(info.value)
    assert "optim.name: checkpoint 'adamw', now 'sgd' (cannot change on resume" in text
    assert "trainer.zero_stage: checkpoint 2, now 3 (cannot change" in text
    assert "--accept-change" not in text


def test_another_world_size_resumes_when_the_global_batch_is_kept() -> None:
    """Every backend resumes on any number of processes; the global batch is what must stay
    (``data.global_batch_size`` derives the per-process batch from it)."""
    held = {"data__global_batch_size": 16}
    assert check_resume(contract(world=2, data__batch_size=8, **held),
                        contract(world=1, data__batch_size=16, **held), [], "c") == []
    with pytest.raises(ResumeMismatch) as info:  # per-process batch kept: the global changes
        check_resume(contract(world=2), contract(world=4), [], "ckpt")
    text = str(info.value)
    assert "  - data.global_batch: checkpoint 16, now 32" in text
    assert "set data.global_batch_size=16" in text
    assert "--accept-change data.global_batch" in text
    accepted = check_resume(contract(world=2), contract(world=4), ["data.global_batch"], "c")
    assert [(c.key, c.saved, c.now) for c in accepted] == [("data.global_batch", 16, 32)]


def test_following_the_printed_fix_resumes() -> None:
    """A run of per-process batches continues on another world once the global batch it
    trained with is set: batch 8 on 2 processes is global batch 16 on 1."""
    now = contract(world=1, data__batch_size=16, data__global_batch_size=16)
    assert check_resume(contract(world=2), now, [], "ckpt") == []


def test_contracts_written_before_the_global_batch_get_it_from_their_world_size() -> None:
    """Older checkpoints recorded no global batch (and, under ZeRO, the world size in the
    contract): it is derived from their per-process batch and the world that wrote them."""
    old = {k: v for k, v in contract().items() if k != "data.global_batch"}
    old["world_size"] = 2
    assert check_resume(with_recorded_global_batch(old, 2), contract(world=2), [], "c") == []
    with pytest.raises(ResumeMismatch, match=r"data\.global_batch: checkpoint 16, now 24"):
        check_resume(with_recorded_global_batch(old, 2), contract(world=3), [], "ckpt")
    # Where the world that wrote it is unknown, the global batch cannot be compared.
    assert check_resume(with_recorded_global_batch(old, None), contract(world=3), [], "c") == []


def test_other_differences_need_an_explicit_acceptance_by_key_or_section() -> None:
    saved, now = contract(), contract(trainer__epochs=5, schedule__warmup_steps=0,
                                      split="sha256:b")
    with pytest.raises(ResumeMismatch) as info:
        check_resume(saved, now, ["trainer.epochs"], "ckpt")
    text = str(info.value)
    listed = [line for line in text.splitlines() if line.startswith("  - ")]
    assert listed == ["  - data.split: checkpoint 'sha256:a', now 'sha256:b'",
                      "  - schedule.warmup_steps: checkpoint 10, now 0"]  # epochs accepted
    assert "--accept-change data.split --accept-change schedule.warmup_steps" in text
    changes = check_resume(saved, now, ["trainer.epochs", "schedule", "data.split"], "ckpt")
    assert [(c.key, c.saved, c.now) for c in changes] == [
        ("data.split", "sha256:a", "sha256:b"), ("schedule.warmup_steps", 10, 0),
        ("trainer.epochs", 3, 5)]


def test_checkpoints_from_before_adapters_and_timm_still_match() -> None:
    """Keys added later at their defaults (a stage's ``adapters: null``, ``model.source:
    torchvision``) leave the contract as older checkpoints recorded it."""
    stages = [{"name": "head", "start_epoch": 0, "include": [{"keyword": "head"}]}]
    old = {**RECIPE, "plan": {"bn_policy": "freeze", "stages": stages}}
    new = {**RECIPE, "model": {**RECIPE["model"], "source": "torchvision"},
           "plan": {"bn_policy": "freeze", "stages": [{**stages[0], "adapters": None}]}}
    saved = run_contract(old, "sha256:plan", "sha256:a", 16)
    assert check_resume(saved, run_contract(new, "sha256:plan", "sha256:a", 16), [],
                        "ckpt") == []
    lora = {**stages[0], "adapters": {"kind": "lora", "r": 8}}
    with pytest.raises(ResumeMismatch, match=r"plan\.stages"):
        check_resume(saved, run_contract({**new, "plan": {"bn_policy": "freeze",
                                                          "stages": [lora]}},
                                         "sha256:plan", "sha256:a", 16), [], "ckpt")


def test_a_per_process_batch_change_names_the_key_and_the_global_batch() -> None:
    with pytest.raises(ResumeMismatch) as info:
        check_resume(contract(), contract(data__batch_size=4), [], "ckpt")
    listed = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert listed == ["  - data.batch_size: checkpoint 8, now 4",
                      "  - data.global_batch: checkpoint 16, now 8"]
