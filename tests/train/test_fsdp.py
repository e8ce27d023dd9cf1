"""FSDP2 in one process (a 1-rank gloo group): checkpoint files as ``verify_checkpoint`` sees
them, written for real by DCP; the wrapping units on the plan's block maps (torchvision
DenseNet, timm ConvNeXt and DeiT); bf16 compute on a BatchNorm model.

DCP's ``.metadata`` index is a plain pickle that DCP itself loads unchecked: dist-ft accepts
one naming only DCP's record classes and recording no pickled object.
"""

from __future__ import annotations

import json
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from dist_ft.config.schema import FsdpConfig, ModelConfig
from dist_ft.models.blocks import HEAD
from dist_ft.models.spec import model_spec
from dist_ft.train.checkpoint import (
    CheckpointDamaged,
    UnsafeCheckpointError,
    _check_dcp_metadata,
    verify_checkpoint,
)
from dist_ft.train.fsdp import SHARDED, is_dtensor, save_sharded, shard_model, wrap_units


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    """A 1-process gloo group for this module's tests, gone afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already running in this test process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(group: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder whose ``sharded/`` dist-ft wrote: a sharded Sequential after one
    AdamW step, with the files ``verify_checkpoint`` needs beside it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    block_of = {"0.weight": "block1", "0.bias": "block1", "2.weight": HEAD, "2.bias": HEAD}
    shard_model(model, block_of, FsdpConfig(), torch.device("cpu"))
    assert all(is_dtensor(p) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    folder.mkdir()
    save_sharded(folder, model, optimizer)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    torch.save({"generator": torch.zeros(4)}, folder / "rank0.pt")
    return folder


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(checkpoint, tmp_path / checkpoint.name))


def test_a_checkpoint_dcp_wrote_passes(checkpoint: Path) -> None:
    files = sorted(p.name for p in (checkpoint / SHARDED).iterdir())
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files), files
    _check_dcp_metadata(checkpoint / SHARDED / ".metadata")
    verify_checkpoint(checkpoint)


def test_a_metadata_naming_a_foreign_global_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    meta = folder / SHARDED / ".metadata"
    meta.write_bytes(b"cos\nsystem\n.")  # protocol 0: GLOBAL os.system, nothing called
    with pytest.raises(UnsafeCheckpointError) as exc:
        verify_checkpoint(folder)
    assert str(meta) in str(exc.value) and "GLOBAL os.system" in str(exc.value)


def _stack_global(module: str, name: str) -> bytes:
    """A protocol-4 pickle of the object ``module``.``name`` (looked up, never called)."""
    def text(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()
    return pickle.PROTO + b"\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + pickle.STOP


def test_a_dotted_name_through_an_allowed_module_is_refused(
    checkpoint: Path, tmp_path: Path
) -> None:
    folder = copy_of(checkpoint, tmp_path)
    meta = folder / SHARDED / ".metadata"
    meta.write_bytes(_stack_global("torch.distributed.checkpoint.metadata", "os.system"))
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        _check_dcp_metadata(meta)


def test_a_truncated_metadata_is_damage_naming_the_file(checkpoint: Path,
                                                        tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    meta = folder / SHARDED / ".metadata"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    with pytest.raises(CheckpointDamaged) as exc:
        verify_checkpoint(folder)
    assert exc.value.file == meta


def test_a_truncated_shard_file_is_damage_naming_the_file(checkpoint: Path,
                                                          tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    shard = next((folder / SHARDED).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointDamaged) as exc:
        verify_checkpoint(folder)
    assert exc.value.file == shard


def test_a_metadata_recording_a_pickled_object_is_refused(group: None, tmp_path: Path) -> None:
    """DCP saves a non-tensor value as a pickle (``BytesStorageMetadata``) and loads it with
    ``weights_only=False``: a checkpoint holding one is refused before anything loads it."""
    dcp.save({"model": {"w": torch.ones(2)}, "extra": {"note": [1, "two"]}},
             checkpoint_id=str(tmp_path / SHARDED))
    meta = tmp_path / SHARDED / ".metadata"
    with pytest.raises(UnsafeCheckpointError, match=r"records pickled objects \(extra\.note"):
        _check_dcp_metadata(meta)


def test_densenet121_units_are_dense_blocks_with_their_transition_and_norm5() -> None:
    spec = model_spec(ModelConfig(name="densenet121", num_classes=14))
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.densenet121(num_classes=14)
    units = wrap_units(model, spec.blocks.block_of)
    named = {id(m): n for n, m in model.named_modules()}
    assert {b: [named[id(m)] for m in ms] for b, ms in units.items()} == {
        "denseblock1": ["features.denseblock1", "features.transition1"],
        "denseblock2": ["features.denseblock2", "features.transition2"],
        "denseblock3": ["features.denseblock3", "features.transition3"],
        "denseblock4": ["features.denseblock4", "features.norm5"],
    }
    assert list(units) == list(spec.blocks.body)
    # Stem (conv0, norm0) and head (classifier) stay with the root unit.
    wrapped = {id(p) for ms in units.values() for m in ms for p in m.parameters()}
    left = [n for n, p in model.named_parameters() if id(p) not in wrapped]
    assert {spec.blocks.block_of[n] for n in left} == {"stem", "head"}


@pytest.mark.parametrize(("name", "first", "count"), [
    ("timm/convnext_atto", "stages.0.blocks.0", 12),  # a stage's downsample with its first
    ("timm/deit_tiny_patch16_224", "blocks.0", 12),  # the last one with the final norm
])
def test_timm_units_are_its_own_blocks(name: str, first: str, count: int) -> None:
    cfg = ModelConfig(name=name, num_classes=14)
    spec = model_spec(cfg)
    from dist_ft.models.factory import build_model

    model = build_model(cfg, meta=True)
    units = wrap_units(model, spec.blocks.block_of)
    named = {id(m): n for n, m in model.named_modules()}
    assert list(units) == list(spec.blocks.body) and len(units) == count
    assert named[id(next(iter(units.values()))[0])] == first
    for block, modules in units.items():  # every unit holds exactly its block's parameters
        held = {f"{named[id(m)]}.{n}" for m in modules for n, _ in m.named_parameters()}
        assert held == {p for p, b in spec.blocks.block_of.items() if b == block}, block


def _tiny_sharded(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    shard_model(model, {"0.weight": "b", "0.bias": "b"}, FsdpConfig(), torch.device("cpu"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def test_a_save_before_any_step_leaves_the_optimizer_alone_and_loads(
    group: None, tmp_path: Path
) -> None:
    """Every step so far skipped (non-finite losses): the checkpoint holds the weights only,
    and writing it creates no optimizer state (which would shift the next real step)."""
    from dist_ft.train.fsdp import load_sharded

    model, optimizer = _tiny_sharded(0)
    save_sharded(tmp_path, model, optimizer)
    assert not optimizer.state
    other, fresh = _tiny_sharded(1)
    load_sharded(tmp_path, other, fresh)
    assert not fresh.state
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(),
                                 strict=True):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name


def test_a_sharded_folder_without_its_index_is_damage(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    (folder / SHARDED / ".metadata").unlink()
    with pytest.raises(CheckpointDamaged, match="missing") as exc:
        verify_checkpoint(folder)
    assert exc.value.file == folder / SHARDED / ".metadata"


def test_bf16_compute_keeps_batchnorm_and_the_master_weights_fp32(group: None) -> None:
    """``mixed_precision.param_dtype: bfloat16`` on a BatchNorm model: the layers compute in
    bf16, BatchNorm in fp32 (CPU batch norm refuses bf16 inputs with fp32 statistics), the
    logits come out fp32 and the sharded weights and gradients stay fp32."""
    import torchvision

    from dist_ft.config.schema import FsdpMixedPrecision

    model = torchvision.models.resnet18(num_classes=3)
    block_of = {n: n.split(".")[0] for n, _ in model.named_parameters()
                if n.startswith("layer")}
    cfg = FsdpConfig(mixed_precision=FsdpMixedPrecision(param_dtype="bfloat16"))
    shard_model(model, block_of, cfg, torch.device("cpu"))
    seen: set[torch.dtype] = set()
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    for train in (True, False):
        model.train(train)
        logits = model(torch.randn(2, 3, 32, 32))
        assert logits.dtype == torch.float32
    logits.sum().backward()
    assert seen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(("wrap", "reshard"), [("blocks", True), ("blocks", False),
                                               ("none", True)])
def test_wrap_and_reshard_after_forward_take_effect(group: None, wrap: str,
                                                    reshard: bool) -> None:
    """``wrap: blocks`` makes each ResNet layer a unit (``none``: the root alone), and
    ``reshard_after_forward`` decides whether a unit's weights are shards again after its
    forward (true) or stay gathered until backward (false)."""
    import torchvision

    from dist_ft.train.fsdp import is_sharded

    model = torchvision.models.resnet18(num_classes=3)
    block_of = {n: n.split(".")[0] for n, _ in model.named_parameters()
                if n.startswith("layer")}
    shard_model(model, block_of, FsdpConfig(wrap=wrap, reshard_after_forward=reshard),
                torch.device("cpu"))
    assert is_sharded(model)
    assert [is_sharded(getattr(model, f"layer{k}")) for k in range(1, 5)] == \
        [wrap == "blocks"] * 4
    model(torch.randn(2, 3, 32, 32)).sum()  # forward only: backward not yet run
    if wrap == "blocks":
        assert is_dtensor(model.layer1[0].conv1.weight) == reshard
