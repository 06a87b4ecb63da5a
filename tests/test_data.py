"""Datasets, splits and episodes: what every experiment's correctness rests on."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.config import DataConfig, load_config
from fedmeta.data.datasets import load_meta_splits, reserve
from fedmeta.data.episodes import gather, minibatch_order, sample_episodes
from fedmeta.data.files import DataError, verified
from fedmeta.data.idx import load_idx_dataset
from fedmeta.data.pool import ClassPool
from fedmeta.data.splits import partition, seeded_omniglot_split, torchmeta_omniglot_split
from fedmeta.rng import stream
from fedmeta.scenario.backdoor import build_scenario


def test_omniglot_images_are_28x28_with_ink_one(omniglot):
    assert omniglot.images.shape == (1623, 20, 28, 28, 1)
    assert omniglot.images.dtype == torch.uint8
    ink = omniglot.images.float().mean() / 255
    assert 0.03 < ink < 0.2  # strokes on a dark background, not the inverted file format


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_omniglot_split_is_disjoint_and_complete(seed):
    split = seeded_omniglot_split(stream(seed, "omniglot-split"))
    train, test = set(split["train"].tolist()), set(split["test"].tolist())
    assert len(train) == 1200 and len(test) == 423
    assert not train & test and train | test == set(range(1623))


def test_seeded_split_depends_on_seed():
    a = seeded_omniglot_split(stream(0, "omniglot-split"))["train"]
    b = seeded_omniglot_split(stream(1, "omniglot-split"))["train"]
    assert not torch.equal(a, b)


def test_torchmeta_split_is_disjoint_and_complete(data_root):
    split = torchmeta_omniglot_split(data_root)
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes == {"train": 1028, "val": 172, "test": 423}
    everything = torch.cat(list(split.values()))
    assert sorted(everything.tolist()) == list(range(1623))


def test_rotations_only_for_meta_training(omniglot):
    splits = load_meta_splits(DataConfig(dataset="omniglot"), seed=0)
    assert splits.train.num_classes == 4 * 1200 and splits.test.num_classes == 423
    first = splits.train.rows_of(0)
    turned = splits.train.rows_of(1)
    assert torch.equal(splits.train.images[turned], torch.rot90(splits.train.images[first], 1, dims=(1, 2)))
    train_chars = {n.rsplit("/", 1)[0] for n in splits.train.names}
    assert not train_chars & set(splits.test.names)


def test_miniimagenet_ravi_split():
    try:
        splits = load_meta_splits(DataConfig(dataset="miniimagenet"), seed=0)
    except DataError as err:
        pytest.skip(str(err))
    assert (splits.train.num_classes, splits.val.num_classes, splits.test.num_classes) == (64, 16, 20)
    assert splits.image_shape == (84, 84, 3)
    names = [set(p.names) for p in (splits.train, splits.val, splits.test)]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert int(splits.train.counts.min()) == 600
    store = splits.train.images.untyped_storage().data_ptr()  # the splits are views of one array, not copies
    assert splits.val.images.untyped_storage().data_ptr() == splits.test.images.untyped_storage().data_ptr() == store


def test_named_reserved_classes_leave_the_split_that_held_them(omniglot):
    """data.reserved_classes: the paper's fixed pair (mini-ImageNet's Fig. 2) instead of a draw per
    seed; Omniglot here (loads in a second): two drawn characters, a meta-training one (its four
    rotations leave meta-training) and a meta-test one."""
    drawn = reserve(DataConfig(), 0, 5)
    assert drawn.train.num_classes == 4800 and drawn.test.num_classes == 418  # the default draw
    train_character = drawn.train.names[0].rsplit("/", 1)[0]
    names = [*drawn.reserved.names[:3], train_character, drawn.test.names[0]]
    chosen = reserve(DataConfig(reserved_classes=names), 0, 5)
    assert list(chosen.reserved.names) == names  # in the order named: the backdoor classes, then the target
    assert chosen.train.num_classes == 4796 and not any(n.startswith(train_character + "/") for n in chosen.train.names)
    assert chosen.test.num_classes == 419 and not set(names) & set(chosen.test.names)
    assert len(chosen.groups.unique()) == 1199
    with pytest.raises(DataError, match=r"data.reserved_classes: omniglot has no class 'Nope/character01'"):
        reserve(DataConfig(reserved_classes=["Nope/character01", *names[1:]]), 0, 5)

    scenario = build_scenario(load_config("omniglot-exp1a-quick", [f"data.reserved_classes={names}"]), "b")
    for user, pool in enumerate(scenario.users):  # case b: benign users hold the named classes, attackers none
        assert (set(names) <= set(pool.names)) == (user not in scenario.attackers)
    assert scenario.everyone.pool.names[scenario.everyone.target] == names[-1]


@pytest.mark.parametrize("name", ["mnist", "fashionmnist"])
def test_idx_datasets(name):
    train = load_idx_dataset(name, "train")
    assert train.num_classes == 10 and int(train.counts.sum()) == 60000
    assert train.image_shape == (28, 28, 1)
    # every row belongs to exactly one class
    rows = torch.cat([train.rows_of(c) for c in range(10)])
    assert sorted(rows.tolist()) == list(range(60000))


def test_missing_file_names_file_and_checksum(tmp_path):
    with pytest.raises(DataError, match=r"missing dataset file .*images_background\.npz \(expected sha256 8bf84167"):
        verified(tmp_path, "omniglot/images_background.npz")


def test_corrupt_file_names_expected_checksum(tmp_path, data_root):
    (tmp_path / "mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(data_root / "mnist" / name, tmp_path / "mnist" / name)  # contents only, writable
    with gzip.open(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match=r"corrupt dataset file .*t10k-labels.*expected f7ae60f9"):
        load_idx_dataset("mnist", "t10k", str(tmp_path))


def test_missing_root_says_how_to_set_it(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        load_meta_splits(DataConfig(root=str(tmp_path / "nowhere")), seed=0)


def _ragged_pool() -> ClassPool:
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1)
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7 + [3] * 9)
    return ClassPool.from_labels(images, labels, ["a", "b", "c", "d"])


@settings(max_examples=30, deadline=None)
@given(ways=st.integers(1, 4), shots=st.integers(1, 2), queries=st.integers(0, 2), seed=st.integers(0, 10**6))
def test_episodes_draw_distinct_examples_of_distinct_classes(ways, shots, queries, seed):
    pool = _ragged_pool()
    eps = sample_episodes(pool, 6, ways, shots, queries, torch.Generator().manual_seed(seed))
    assert eps.rows.shape == (6, ways, shots + queries)
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7 + [3] * 9)
    for e in range(6):
        assert len(set(eps.classes[e].tolist())) == ways
        for w in range(ways):
            rows = eps.rows[e, w]
            assert len(set(rows.tolist())) == shots + queries  # no repeats, no padding
            assert (labels[rows] == eps.classes[e, w]).all()  # the way's class, nothing else
    assert eps.support.shape == (6, ways * shots) and eps.query.shape == (6, ways * queries)
    assert torch.equal(eps.support_labels(), torch.arange(ways).repeat_interleave(shots))


def test_gather_gives_channels_last_floats(omniglot):
    pool = omniglot.pool(torch.arange(10), rotations=False)
    eps = sample_episodes(pool, 3, 5, 2, 1, torch.Generator().manual_seed(0))
    x = gather(pool.images, eps.support)
    assert x.shape == (3, 10, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert x[0].is_contiguous(memory_format=torch.channels_last)


def test_minibatch_order_covers_each_example_once_per_pass():
    order = minibatch_order(examples=50, steps=10, batch=10, episodes=3, gen=torch.Generator().manual_seed(0))
    assert order.shape == (3, 10, 10)
    for e in range(3):
        first, second = order[e].flatten()[:50], order[e].flatten()[50:]
        assert sorted(first.tolist()) == list(range(50)) and sorted(second.tolist()) == list(range(50))


def test_pool_subsets_share_images_and_keep_positions():
    pool = _ragged_pool()
    sub = pool.classes([3, 1])
    assert sub.names == ("d", "b") and sub.images is pool.images
    assert torch.equal(sub.rows_of(1), pool.rows_of(1))
    held = pool.classes([0, 2]).examples(torch.tensor([0, 2]))
    assert torch.equal(held.rows_of(1), pool.rows_of(2)[[0, 2]])
    with pytest.raises(ValueError):
        pool.classes([1]).examples(torch.tensor([5]))


def test_partition_is_disjoint_and_complete():
    parts = partition(torch.arange(103), 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
