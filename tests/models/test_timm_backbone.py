"""timm backbones: built by name, blocks and layer decay exactly as timm's own, weights offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models._manipulate import group_parameters
from timm.optim import param_groups_layer_decay

from dist_ft.config import ConfigError, Recipe
from dist_ft.config.schema import ModelConfig
from dist_ft.explain.gradcam import default_layer, gradcam
from dist_ft.models.checkpointing import enable_activation_checkpointing
from dist_ft.models.factory import build_model
from dist_ft.models.preprocessing import input_config
from dist_ft.models.spec import describe_model, model_spec
from dist_ft.models.weights import WeightsError
from dist_ft.plan import resolve_plan

# One model per family: ConvNeXt, EfficientNet, DeiT (a ViT taking 32 px through
# dynamic_img_size). Each builds in well under a second on CPU.
MODELS = ["timm/convnext_atto", "timm/efficientnet_b0", "timm/deit_tiny_patch16_224"]


def _build(name: str, num_classes: int = 3, **kw: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, num_classes=num_classes, **kw))


def _timm_groups(model: torch.nn.Module) -> list[list[str]]:
    """timm's own layer groups (what param_groups_layer_decay numbers), in order."""
    groups = group_parameters(model, model.group_matcher(coarse=False))
    return [groups[k] for k in sorted(groups)]


@pytest.mark.parametrize("name", MODELS)
def test_blocks_and_stage_counts_are_timms_groups(
        name: str, recipe_factory: Callable[..., Recipe]) -> None:
    model = _build(name)
    spec = describe_model(model, name)
    groups = _timm_groups(model)
    blocks = spec.blocks
    assert len(blocks.blocks) == len(groups) and blocks.blocks[0] == "stem"
    assert blocks.blocks[-1] == "head" and len(set(blocks.blocks)) == len(blocks.blocks)
    for block, members in zip(blocks.blocks, groups, strict=True):
        assert [n for n, b in blocks.block_of.items() if b == block] == members, block
    assert spec.head == model.pretrained_cfg["classifier"]
    classifier = model.get_classifier().named_parameters(prefix=spec.head)
    assert all(n in groups[-1] for n, _ in classifier)
    # The plan's stages count what timm's groups hold: head, then the last 2 body groups.
    recipe = recipe_factory({"model": {"name": name, "num_classes": 3}, "plan": {"stages": [
        {"name": "head", "start_step": 0, "include": ["head"]},
        {"name": "top", "start_step": 5, "include": ["head", {"last_blocks": 2}]},
        {"name": "all", "start_step": 9, "include": ["all"]}]}})
    plan = resolve_plan(recipe, model_spec(recipe.model))  # meta build, as dist-ft plan
    size = dict(model.named_parameters())
    for stage, members in zip(plan.stages, (groups[-1:], groups[-3:], groups), strict=True):
        names = [n for g in members for n in g]
        assert sorted(stage.trainable) == sorted(names)
        assert stage.trainable_params == sum(size[n].numel() for n in names)


@pytest.mark.parametrize("name", MODELS)
def test_layer_decay_and_weight_decay_follow_timm(
        name: str, recipe_factory: Callable[..., Recipe]) -> None:
    model = _build(name)
    recipe = recipe_factory({"model": {"name": name, "num_classes": 3},
                             "optim": {"lr": 1e-3, "weight_decay": 0.05, "layer_decay": 0.7}})
    plan = resolve_plan(recipe, describe_model(model, name))
    ours = {p: (g.lr_scale, g.weight_decay) for g in plan.stages[0].groups for p in g.params}
    names = {id(p): n for n, p in model.named_parameters()}
    theirs = {names[id(p)]: (g["lr_scale"], g["weight_decay"])
              for g in param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.7,
                                                no_weight_decay_list=model.no_weight_decay()
                                                if hasattr(model, "no_weight_decay") else ())
              for p in g["params"]}
    assert ours.keys() == theirs.keys()
    for n, (scale, decay) in theirs.items():
        assert ours[n][0] == pytest.approx(scale, rel=1e-12), n
        assert ours[n][1] == decay, n


def test_no_weight_decay_names_get_none(recipe_factory: Callable[..., Recipe]) -> None:
    name = "timm/deit_tiny_patch16_224"
    recipe = recipe_factory({"model": {"name": name, "num_classes": 3},
                             "optim": {"weight_decay": 0.05}})
    spec = model_spec(recipe.model)
    assert set(spec.no_decay) == {"cls_token", "pos_embed"}  # 3-D: not caught as 1-D
    wd = {p: g.weight_decay for g in resolve_plan(recipe, spec).stages[0].groups
          for p in g.params}
    assert wd["cls_token"] == wd["pos_embed"] == 0.0 and wd["blocks.0.attn.qkv.weight"] == 0.05


def test_names_and_sources_normalise_and_unknown_names_are_named(run_cli, write_recipe) -> None:
    a = ModelConfig(name="convnext_atto", source="timm")
    assert a == ModelConfig(name="timm/convnext_atto") and a.name == "timm/convnext_atto"
    assert a.source == "timm" and a.arch == "convnext_atto"
    assert ModelConfig(name="efficientnet_b0").source == "torchvision"  # both libraries have it
    with pytest.raises(ValueError, match="is a timm model but source is 'torchvision'"):
        ModelConfig(name="timm/convnext_atto", source="torchvision")
    with pytest.raises(ConfigError, match=r"model.name: unknown timm model 'convnext_atoo'; "
                                          r"did you mean timm/convnext_atto"):
        build_model(ModelConfig(name="timm/convnext_atoo"), meta=True)
    with pytest.raises(ConfigError, match="has no pretrained tag 'nope'; its tags: d2_in1k"):
        build_model(ModelConfig(name="timm/convnext_atto.nope"), meta=True)
    recipe = write_recipe({"model": {"name": "timm/convnxt_atto"}})
    result = run_cli("plan", str(recipe))
    assert result.code == 2 and "did you mean timm/convnext_atto" in result.err


def _hf_cache(root: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """A Hugging Face hub cache holding ``repo``'s model.safetensors (as a download leaves it)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")


def test_imagenet_weights_come_from_the_local_cache_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = ModelConfig(name="timm/convnext_atto", pretrained="imagenet", num_classes=3)
    with pytest.raises(WeightsError) as missing:
        build_model(cfg)
    text = str(missing.value)
    assert "timm/convnext_atto.d2_in1k" in text and str(tmp_path / "hub") in text
    assert "never downloads" in text
    assert "timm.create_model('convnext_atto', pretrained=True)" in text
    published = _build("timm/convnext_atto", num_classes=1000).state_dict()
    _hf_cache(tmp_path / "hub", "timm/convnext_atto.d2_in1k", published)
    model = build_model(cfg)
    own = model.state_dict()
    assert own["head.fc.weight"].shape == (3, 320)  # a new head for 3 classes
    body = [k for k in own if not k.startswith("head.fc.")]
    assert body and all(torch.equal(own[k], published[k]) for k in body)


def test_a_state_dict_file_loads_without_its_classifier(tmp_path: Path) -> None:
    source = _build("timm/efficientnet_b0", num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    model = _build("timm/efficientnet_b0", num_classes=3, pretrained=str(path))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert model.classifier.weight.shape == (3, 1280)
    same = _build("timm/efficientnet_b0", num_classes=5, pretrained=str(path))
    assert torch.equal(same.classifier.weight, source.classifier.weight)


@pytest.mark.parametrize("name,targets,whole", [
    ("timm/deit_tiny_patch16_224", ["qkv", "fc2"], False),
    ("timm/convnext_atto", ["fc1"], False),
    ("timm/convnext_atto", ["fc2"], True),  # a PeftModel: names under base_model.model.
])
def test_adapted_parameters_keep_the_block_of_their_layer(name: str, targets: list[str],
                                                          whole: bool) -> None:
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    model = _build(name)
    plain = describe_model(model, name).blocks.block_of
    config = LoraConfig(r=2, target_modules=targets,
                        modules_to_save=[model.pretrained_cfg["classifier"]])
    if whole:
        model = get_peft_model(model, config)
    else:
        inject_adapter_in_model(config, model)
    spec = describe_model(model, name)
    adapted = [n for n in spec.blocks.block_of if ".lora_" in n or ".base_layer." in n]
    assert len(adapted) > 20
    for n, block in spec.blocks.block_of.items():
        host = n.split(".base_layer.")[0].split(".lora_")[0].split(".modules_to_save.")[0]
        host = host.split(".original_module.")[0]
        if host != n:
            n = host + "." + n.rsplit(".", 1)[-1]
        assert plain[n.removeprefix("base_model.model.")] == block, n
    assert spec.blocks.blocks == describe_model(_build(name), name).blocks.blocks


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_gradcam_and_input_config(name: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    plain, ckpt = _build(name).train(), _build(name).train()
    assert enable_activation_checkpointing(ckpt, name)
    assert any(getattr(m, "grad_checkpointing", False) for m in ckpt.modules())
    for m in (plain, ckpt):
        torch.manual_seed(2)
        m(x).sum().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
    assert default_layer(plain) in ("stages.3", "blocks.6", "blocks[-1]")
    maps = gradcam(plain.eval(), x, [0, 2])
    assert maps.shape == (2, 32, 32) and float(maps.max()) <= 1
    from dist_ft.config.schema import DataConfig

    own = input_config(ModelConfig(name=name), DataConfig(image_size=32))
    assert own.interpolation == "bicubic" and own.pretrained_size == 224
    assert own.mean == (0.485, 0.456, 0.406)
    mine = input_config(ModelConfig(name=name), DataConfig(mean=[0.5] * 3, std=[0.25] * 3,
                                                            interpolation="bilinear"))
    assert (mine.mean, mine.std, mine.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bilinear")
    assert input_config(ModelConfig(name="resnet18"), DataConfig()).interpolation == "bilinear"
