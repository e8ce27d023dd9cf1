"""Activation checkpointing: same loss and gradients, blocks found for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models import get_model

from dist_ft.models.checkpointing import enable_activation_checkpointing


@pytest.mark.parametrize(("name", "size", "blocks"), [
    ("resnet18", 32, 8), ("densenet121", 32, 4), ("vit_b_16", 224, 12),
    ("convnext_tiny", 32, 18), ("efficientnet_b0", 32, 16),
])
def test_checkpointed_model_computes_the_same(name: str, size: int, blocks: int) -> None:
    torch.manual_seed(0)
    plain = get_model(name, weights=None, num_classes=3).train()
    ckpt = copy.deepcopy(plain)
    assert len(enable_activation_checkpointing(ckpt, name)) == blocks
    assert enable_activation_checkpointing(ckpt, name) == []  # idempotent
    x = torch.randn(2, 3, size, size)
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same stochastic-depth / dropout draws
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), n
