"""peft adapters on a model: one SGD step, merging, and peft's own saved format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_ft.config import load_recipe
from dist_ft.config.schema import ModelConfig
from dist_ft.models.adapters import (
    adapt,
    merged_state_dict,
    peft_modules_to_save,
    save_peft_adapter,
    state_digest,
)
from dist_ft.models.factory import build_model
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.models.structure import ResolvedAdapters
from dist_ft.plan import resolve_plan
from dist_ft.train.stages import build_optimizer, optimizer_groups
from tests.plan.test_adapters import LORA, SMOKE

CFG = ModelConfig(name="resnet18", num_classes=14)
TARGETS = ("layer3.0.conv2", "layer4.1.conv2", "fc")


def _adapted(kind: str) -> tuple[torch.nn.Module, ResolvedAdapters]:
    torch.manual_seed(0)
    adapters = ResolvedAdapters(kind, 4, 8.0, 0.0, TARGETS)
    model = adapt(build_model(CFG), None, adapters)
    with torch.no_grad():  # adapters that do something (LoRA's B starts at zero)
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".ia3_l." in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), adapters


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merged_weights_and_the_peft_folder_compute_what_the_adapted_model_does(
    kind: str, tmp_path: Path
) -> None:
    from peft import PeftModel

    model, adapters = _adapted(kind)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    merged = merged_state_dict(CFG, state, adapters)
    assert not [n for n in merged if "lora" in n or "ia3" in n or "base_layer" in n]
    plain = build_model(CFG).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        got = plain(x)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())  # untouched

    # peft's format: the initial weights (what model.pretrained gives) plus the folder.
    base = {n.replace(".base_layer.", "."): t for n, t in state.items()
            if "lora_" not in n and "ia3_" not in n}
    size = save_peft_adapter(tmp_path, CFG, state, adapters, [])
    assert size == (tmp_path / "adapter_model.safetensors").stat().st_size
    fresh = build_model(CFG)
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        again = loaded(x)
    assert float((again - want).norm() / want.norm()) < 1e-5


def test_trained_base_layers_travel_as_modules_to_save(tmp_path: Path) -> None:
    """A head trained beside the adapters goes into the peft folder whole."""
    from peft import PeftModel

    adapters = ResolvedAdapters("lora", 4, 8.0, 0.0, ("layer4.1.conv2",))
    torch.manual_seed(0)
    initial = build_model(CFG)
    pretrained = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in initial.state_dict().items()}, str(pretrained))
    model = adapt(build_model(CFG), None, adapters)
    model.load_state_dict({adapters.adapted_name(k): v for k, v in initial.state_dict().items()},
                          strict=False)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.layer4[1].conv2.lora_B["default"].weight.normal_()
    model.eval()
    trainable = ("layer4.1.conv2.lora_A.default.weight", "layer4.1.conv2.lora_B.default.weight",
                 "fc.weight", "fc.bias")
    assert peft_modules_to_save(trainable, adapters) == (["fc"], "")
    # A tensor of the model itself, or of a module around an adapted layer, has no place in
    # peft's format (the trainer then writes the merged weights only, and says why).
    for odd in ("class_token", "layer4.1.weight_scale"):
        saved, why = peft_modules_to_save((*trainable, odd), adapters)
        assert saved == [] and odd in why
    save_peft_adapter(tmp_path / "out", CFG, model.state_dict(), adapters, ["fc"])
    base = build_model(ModelConfig(name="resnet18", num_classes=14, pretrained=str(pretrained)))
    loaded = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_one_sgd_step_moves_each_adapter_tensor_by_its_groups_lr_times_gradient() -> None:
    recipe = load_recipe(SMOKE, [f"plan.stages={LORA}", "optim.name=sgd", "optim.momentum=0.0",
                                 "optim.weight_decay=0.0"])
    plan = resolve_plan(recipe, fast_model_spec(recipe.model))
    stage = plan.stages[1]
    torch.manual_seed(0)
    model = adapt(build_model(CFG), None, stage.adapters)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()  # else A's gradient is exactly zero
    for name, p in model.named_parameters():
        p.requires_grad_(name in set(stage.trainable))
    groups = optimizer_groups(plan, 1)
    optimizer = build_optimizer(recipe.optim, model, groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    lr = {p: g.lr for g in groups for p in g.params}
    for name, p in model.named_parameters():
        if name in lr:
            assert torch.allclose(p, before[name] - lr[name] * p.grad, rtol=0, atol=1e-7), name
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), f"frozen {name} moved"
    assert {lr[n] for n in lr if ".lora_" in n} == {1e-3}  # the 'top' group: 0.5 x 2e-3


def test_state_digest_sees_any_change() -> None:
    model = build_model(CFG)
    state = model.state_dict()
    digest = state_digest(state)
    assert digest == state_digest({k: v.clone() for k, v in state.items()})
    state["fc.bias"][3] += 1e-6
    assert state_digest(state) != digest


def test_every_adapter_of_a_timm_vit_attention_gets_a_gradient() -> None:
    """timm's attention calls its qkv and proj Linear layers: their adapters train (unlike
    torchvision's MultiheadAttention, which the plan refuses to target)."""
    recipe = load_recipe(SMOKE, [
        "model.name=timm/deit_tiny_patch16_224", "data.image_size=32",
        "plan.stages=[{name: lora, start_step: 0, include: [head], "
        "adapters: {r: 4, target: [{last_blocks: 2}, attn]}}]", "optim.groups=[]"])
    stage = resolve_plan(recipe, fast_model_spec(recipe.model)).stages[0]
    assert [m.rpartition(".")[2] for m in stage.adapters.modules] == ["qkv", "proj"] * 2
    torch.manual_seed(0)
    model = adapt(build_model(recipe.model), None, stage.adapters)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    adapters = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
    assert len(adapters) == 8
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for _, p in adapters)
