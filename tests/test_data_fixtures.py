"""Real images in the standard layouts (../shared/fixtures/coop_data): reading, decoding, few-shot files."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from support import FIXTURES, needs_fixtures, per_class

from vlprompt.data import (
    ImageDataset,
    Item,
    SplitCounts,
    find_unreadable,
    load_dataset,
    load_fewshot,
    load_or_sample_fewshot,
    sample_fewshot,
    save_fewshot,
    subsample_classes,
)
from vlprompt.errors import DatasetError

pytestmark = needs_fixtures

DTD_NAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
FLOWER_NAMES = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold"]


def test_dtd_fixture_items_labels_and_names():
    splits = load_dataset("DescribableTextures", FIXTURES)
    assert splits.name == "dtd" and splits.template == "{} texture."
    assert splits.image_dir == FIXTURES / "dtd" / "images"
    assert splits.classnames == DTD_NAMES
    assert splits.counts() == SplitCounts(20, 10, 15, 5)
    assert splits.train[:2] == [Item("banded/banded_0133.jpg", 0), Item("banded/banded_0085.jpg", 0)]
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        items = splits.split(split)
        assert per_class(items) == {label: count for label in range(5)}
        assert all(item.path.split("/")[0] == DTD_NAMES[item.label] for item in items)
    assert "split_zhou_DescribableTextures.json" in splits.split_source


def test_flowers_fixture_items_labels_and_names():
    splits = load_dataset("Flowers102", FIXTURES)
    assert splits.name == "oxford_flowers"
    assert splits.image_dir == FIXTURES / "oxford_flowers" / "jpg"
    assert splits.classnames == FLOWER_NAMES
    assert splits.template == "a photo of a {}, a type of flower."
    assert splits.train[0] == Item("image_06749.jpg", 0)
    assert splits.counts() == SplitCounts(20, 10, 15, 5)
    assert all("/" not in item.path for item in splits.test)
    every = [item.path for split in ("train", "val", "test") for item in splits.split(split)]
    assert find_unreadable(splits.image_dir, every, workers=1, progress=False) == []   # all 45 decode


def test_fixture_images_decode_once_each_in_label_order():
    import torch

    splits = load_dataset("dtd", FIXTURES)
    dataset = ImageDataset(splits.test, splits.image_dir, transform=lambda im: torch.tensor(im.size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)
    batches = list(loader)
    sizes = torch.cat([b.images for b in batches])
    assert sizes.shape == (15, 2) and int(sizes.min()) >= 300 and int(sizes.max()) <= 640
    assert torch.cat([b.labels for b in batches]).tolist() == [item.label for item in splits.test]
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(15))
    assert all(b.bad == [] for b in batches)
    image, label, index = ImageDataset(splits.train, splits.image_dir)[5]
    assert image.mode == "RGB" and label == splits.train[5].label and index == 5


def _reference_fewshot(items, shots, rng):
    """Dassl's generate_fewshot_dataset loop (tracker in order of first appearance, sample or keep all)."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for group in tracker.values():
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


@pytest.mark.parametrize("name", ["dtd", "oxford_flowers"])
def test_fewshot_is_deterministic_reference_like_and_leaves_global_random_alone(name):
    splits = load_dataset(name, FIXTURES)
    state = random.getstate()
    first, again, other = (sample_fewshot(splits, 2, 1), sample_fewshot(splits, 2, 1), sample_fewshot(splits, 2, 2))
    assert random.getstate() == state
    assert first == again
    assert first.train != other.train
    rng = random.Random(1)
    assert first.train == _reference_fewshot(splits.train, 2, rng)
    assert first.val == _reference_fewshot(splits.val, 2, rng)
    assert per_class(first.train) == {label: 2 for label in range(5)}
    assert first.test == splits.test and first.short_train == {} and first.short_val == {}


def test_fewshot_files_identical_across_calls_and_differ_across_seeds(tmp_path):
    splits = load_dataset("dtd", FIXTURES)
    paths = [save_fewshot(sample_fewshot(splits, 2, seed), tmp_path / f"{i}.json")
             for i, seed in enumerate((1, 1, 2))]
    texts = [p.read_text(encoding="utf-8") for p in paths]
    assert texts[0] == texts[1] != texts[2]
    assert str(FIXTURES) not in texts[0] and '"banded/' in texts[0]
    loaded = load_fewshot(paths[0], splits)
    assert loaded == sample_fewshot(splits, 2, 1)
    assert loaded.image_dir == splits.image_dir


def test_load_or_sample_reuses_the_file_and_refuses_other_settings(tmp_path):
    splits = load_dataset("oxford_flowers", FIXTURES)
    target = tmp_path / "run" / "fewshot.json"
    first = load_or_sample_fewshot(splits, 1, 3, target)
    text = target.read_text()
    assert load_or_sample_fewshot(splits, 1, 3, target) == first and target.read_text() == text
    with pytest.raises(DatasetError, match="holds 1 shots with seed 3, not 1 shots with seed 4"):
        load_or_sample_fewshot(splits, 1, 4, target)
    dtd = load_dataset("dtd", FIXTURES)
    with pytest.raises(DatasetError, match="was sampled from 'oxford_flowers'"):
        load_fewshot(target, dtd)


def test_larger_k_than_classes_keeps_everything_and_reports(tmp_path):
    splits = load_dataset("dtd", FIXTURES)
    result = sample_fewshot(splits, 16, 1)
    assert sorted(result.train, key=lambda i: i.path) == sorted(splits.train, key=lambda i: i.path)
    assert result.short_train == {label: 4 for label in range(5)}
    assert result.val_shots == 4 and result.short_val == {label: 2 for label in range(5)}
    assert "5 classes have fewer than 16 train images" in result.short_report()[0]
    round_trip = load_fewshot(save_fewshot(result, tmp_path / "f.json"), splits)
    assert round_trip.short_train == result.short_train and round_trip.short_val == result.short_val


def test_base_and_new_classes_of_a_fewshot_sample():
    fewshot = sample_fewshot(load_dataset("dtd", FIXTURES), 2, 1)
    base, new = subsample_classes(fewshot, "base"), subsample_classes(fewshot, "new")
    assert base.classnames == DTD_NAMES[:3] and new.classnames == DTD_NAMES[3:]
    assert per_class(base.train) == {0: 2, 1: 2, 2: 2} and per_class(new.test) == {0: 3, 1: 3}
    assert [i.path for i in new.test] == [i.path for i in fewshot.test if i.label >= 3]


def test_relative_root_gives_an_absolute_image_folder(monkeypatch):
    monkeypatch.chdir(FIXTURES.parent)
    splits = load_dataset("dtd", "coop_data")
    assert splits.image_dir.is_absolute() and splits.image_dir == FIXTURES / "dtd" / "images"
