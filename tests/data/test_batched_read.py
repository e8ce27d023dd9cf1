"""The cache's batched read (``CachedImages.__getitems__``): the same bytes as sample by sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from dist_ft.config.schema import DataConfig
from dist_ft.data.cache import CacheReader, prepare_cache
from dist_ft.data.datasets import CachedImages, StackedBatch, collate
from dist_ft.data.sampler import ShardedSampler


@pytest.fixture(scope="module")
def cache(tiny_cxr14_session: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows in shards of 16, 16 and 8: batches straddle shards."""
    out = tmp_path_factory.mktemp("batched") / "cache"
    prepare_cache(tiny_cxr14_session, out, size=32, shard_size=16, progress=False)
    return out


class PerSample(Dataset):
    """A dataset's ``__getitem__`` alone: the loader fetches and collates sample by sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[i]


def _assert_same_batches(got: DataLoader, want: DataLoader) -> int:
    count = 0
    for (images, targets), (ref_images, ref_targets) in zip(got, want, strict=True):
        assert images.dtype == ref_images.dtype == torch.uint8
        assert targets.dtype == ref_targets.dtype == torch.float32
        assert images.shape == ref_images.shape and targets.shape == ref_targets.shape
        assert torch.equal(images, ref_images) and torch.equal(targets, ref_targets)
        count += 1
    return count


def test_reader_read_matches_row_by_row(cache: Path) -> None:
    reader = CacheReader(cache)
    rows = np.array([39, 3, 17, 3, 0, 31, 16, 15, 32])  # unsorted, repeated, three shards
    batch = reader.read(rows)
    assert batch.shape == (len(rows), 32, 32) and batch.dtype == np.uint8
    for k, row in enumerate(rows):
        assert np.array_equal(batch[k], reader.image(row)), row
    assert reader.read(np.array([], dtype=np.int64)).shape == (0, 32, 32)


@pytest.mark.parametrize(("rank", "world", "batch_size"), [(0, 1, 7), (1, 2, 6), (2, 3, 4)])
def test_loader_batches_are_byte_identical_to_the_per_sample_path(
        cache: Path, rank: int, world: int, batch_size: int) -> None:
    reader = CacheReader(cache)
    dataset = CachedImages(reader, reader.rows()[::-1].copy())  # rows not in file order
    samplers = [ShardedSampler(len(dataset), rank, world, seed=5) for _ in range(2)]
    for epoch, start in [(0, 0), (1, 3)]:  # another permutation, and a resumed epoch
        for s in samplers:
            s.set_epoch(epoch, start)
        batched = DataLoader(dataset, batch_size=batch_size, sampler=samplers[0],
                             collate_fn=collate)
        reference = DataLoader(PerSample(dataset), batch_size=batch_size, sampler=samplers[1])
        assert _assert_same_batches(batched, reference) == len(reference) > 1


def test_default_collate_and_subsets_still_work(cache: Path) -> None:
    reader = CacheReader(cache)
    dataset = CachedImages(reader, reader.rows())
    stacked = dataset.__getitems__([5, 1, 30])
    assert isinstance(stacked, StackedBatch) and len(stacked) == 3
    images, targets = default_collate(stacked)  # code that never heard of collate()
    assert torch.equal(images, torch.stack([dataset[i][0] for i in (5, 1, 30)]))
    assert torch.equal(targets, torch.stack([dataset[i][1] for i in (5, 1, 30)]))
    subset = Subset(dataset, [7, 2, 9, 33])
    got = DataLoader(subset, batch_size=3)  # Subset forwards __getitems__
    want = DataLoader(PerSample(subset), batch_size=3)
    assert _assert_same_batches(got, want) == 2


def test_batched_read_in_a_loader_worker(cache: Path) -> None:
    reader = CacheReader(cache)
    dataset = CachedImages(reader, reader.rows())
    sampler = ShardedSampler(len(dataset), seed=1)
    worker = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=1,
                        collate_fn=collate)
    reference = DataLoader(PerSample(dataset), batch_size=8, sampler=sampler)
    assert _assert_same_batches(worker, reference) == 5


def test_training_loader_yields_the_batches_it_yielded_sample_by_sample(
        tiny_cxr14_session: Path, cache: Path, tmp_path: Path) -> None:
    from dist_ft.train.inputs import build_inputs

    cfg = DataConfig(root=str(tiny_cxr14_session), cache=str(cache), image_size=32,
                     batch_size=4, num_workers=0)
    for rank in (0, 1):
        inputs = build_inputs(cfg, seed=3, rank=rank, world=2, device=torch.device("cpu"),
                              bad_image_log=tmp_path / "bad.jsonl")
        assert isinstance(inputs.train_set, CachedImages)
        sampler = ShardedSampler(len(inputs.train_set), rank, 2, seed=3)
        for epoch, start in [(0, 0), (2, 4)]:
            inputs.train_sampler.set_epoch(epoch, start)
            sampler.set_epoch(epoch, start)
            reference = DataLoader(PerSample(inputs.train_set), batch_size=4, sampler=sampler)
            assert _assert_same_batches(inputs.train_loader, reference) == len(reference)
        val_reference = DataLoader(PerSample(inputs.val_set), batch_size=4,
                                   sampler=ShardedSampler(len(inputs.val_set), rank, 2,
                                                          shuffle=False, pad=False))
        assert _assert_same_batches(inputs.val_loader, val_reference) == len(val_reference)
