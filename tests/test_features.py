"""Feature extraction: exact features, cache reuse and invalidation, augmented views, bad images, precision."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import FIXTURES, noise_image

from vlprompt.backbone import transforms
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.backbone.transforms import EvalTransform, TrainTransform, load_image, view_generator
from vlprompt.data.types import Item
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.features.cache import FeatureCache
from vlprompt.features.extract import FeatureSet, augmented_views, default_num_workers, extract_features

DTD = FIXTURES / "dtd"


@pytest.fixture(scope="module")
def dtd() -> tuple[Path, list[Item]]:
    if not DTD.is_dir():
        pytest.skip(f"test fixtures not found at {DTD}")
    split = json.loads((DTD / "split_zhou_DescribableTextures.json").read_text())
    return DTD / "images", [Item(path, label) for path, label, _ in split["train"][::3]]  # 7 images, 5 classes


@pytest.fixture
def synthetic(tmp_path) -> tuple[Path, list[Item]]:
    """Five small random PNG images of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    items = []
    for i, (h, w) in enumerate([(40, 50), (64, 36), (33, 33), (80, 60), (45, 90)]):
        noise_image(h, w, rng).save(root / f"img{i}.png")
        items.append(Item(f"img{i}.png", i % 2))
    return root, items


class EncodeCounter:
    """Wraps ``clip.encode_image`` on one model object and counts the rows it encodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, clip: CLIP) -> None:
        self.rows = 0
        real = clip.encode_image

        self.batches: list[int] = []

        def counted(images: torch.Tensor) -> torch.Tensor:
            self.rows += images.shape[0]
            self.batches.append(images.shape[0])
            return real(images)

        monkeypatch.setattr(clip, "encode_image", counted)


def by_hand(clip: CLIP, root: Path, items: list[Item]) -> torch.Tensor:
    pixels = torch.stack([EvalTransform(clip.config.image_resolution)(load_image(root / i.path)) for i in items])
    with torch.no_grad():
        return clip.encode_image(pixels)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_features_equal_encode_image_on_transformed_images(dtd, kind):
    """Same batch composition (one batch), fp32: the maths is identical, so the features are bit-identical."""
    root, items = dtd
    clip = build_tiny_clip(kind, seed=0)
    result = extract_features(clip, root, items, batch_size=len(items))
    assert torch.equal(result.features, by_hand(clip, root, items))
    assert result.features.dtype == torch.float32 and result.features.shape == (len(items), 64)
    assert result.labels.tolist() == [i.label for i in items] and result.paths == [i.path for i in items]
    assert result.skipped == [] and len(result) == len(items)
    assert not torch.allclose(result.features.norm(dim=-1), torch.ones(len(items)))  # not normalised


def test_batching_and_workers_do_not_change_the_result(dtd, clip):
    """Batch size 1 on every path: each row is computed alone, whatever the loader does, so equality is exact."""
    root, items = dtd
    alone = torch.cat([by_hand(clip, root, [item]) for item in items])
    assert torch.equal(extract_features(clip, root, items, batch_size=1).features, alone)
    assert torch.equal(extract_features(clip, root, items, batch_size=1, num_workers=2).features, alone)


def test_model_mode_is_eval_during_extraction_and_restored(dtd):
    root, items = dtd
    clip = build_tiny_clip("resnet", seed=0)
    expected = extract_features(clip, root, items[:3], batch_size=3).features
    clip.train()
    assert torch.equal(extract_features(clip, root, items[:3], batch_size=3).features, expected)  # BN running stats
    assert clip.training


def test_second_call_is_served_from_the_cache(dtd, clip, tmp_path, monkeypatch):
    root, items = dtd
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(clip, root, items, cache=cache)
    assert cache.stats().rows == len(items)

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing should be decoded, hashed or encoded on a cached call")

    monkeypatch.setattr(clip, "encode_image", forbidden)
    monkeypatch.setattr(transforms, "load_image", forbidden)
    monkeypatch.setattr("vlprompt.features.cache.file_digest", forbidden)  # fixture files are old: stat suffices
    second = extract_features(clip, root, items, cache=cache, batch_size=2)
    assert torch.equal(second.features, first.features) and second.labels.tolist() == first.labels.tolist()
    assert cache.hits == len(items)


def test_only_missing_images_are_computed(dtd, clip, tmp_path, monkeypatch):
    root, items = dtd
    cache = FeatureCache(tmp_path / "cache")
    extract_features(clip, root, items[:4], cache=cache, batch_size=1)
    counter = EncodeCounter(monkeypatch, clip)
    result = extract_features(clip, root, items, cache=cache, batch_size=1)
    assert counter.rows == len(items) - 4
    assert torch.equal(result.features, extract_features(clip, root, items, batch_size=1).features)


def test_a_changed_image_is_recomputed(synthetic, clip, tmp_path, monkeypatch):
    root, items = synthetic
    cache = FeatureCache(tmp_path / "cache")
    before = extract_features(clip, root, items, cache=cache, batch_size=1)
    # same name, same size on disk is irrelevant: new pixels mean new bytes mean a new content hash
    Image.fromarray(np.full((64, 36, 3), 200, dtype=np.uint8)).save(root / "img1.png")
    counter = EncodeCounter(monkeypatch, clip)
    after = extract_features(clip, root, items, cache=cache, batch_size=1)
    assert counter.rows == 1
    assert not torch.equal(after.features[1], before.features[1])
    assert torch.equal(after.features[1], by_hand(clip, root, [items[1]])[0])
    assert torch.equal(after.features[[0, 2, 3, 4]], before.features[[0, 2, 3, 4]])


def test_another_model_gets_new_keys(dtd, clip, tmp_path, monkeypatch):
    root, items = dtd
    cache = FeatureCache(tmp_path / "cache")
    extract_features(clip, root, items, cache=cache)
    other = build_tiny_clip("vit", seed=1)
    counter = EncodeCounter(monkeypatch, other)
    result = extract_features(other, root, items, cache=cache, batch_size=len(items))
    assert counter.rows == len(items) and cache.stats().rows == 2 * len(items)
    assert torch.equal(result.features, by_hand(other, root, items))


def test_another_transform_or_precision_gets_new_keys(dtd, clip, tmp_path, monkeypatch):
    root, items = dtd
    cache = FeatureCache(tmp_path / "cache")
    extract_features(clip, root, items, cache=cache)
    counter = EncodeCounter(monkeypatch, clip)
    grey_stats = EvalTransform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    extract_features(clip, root, items, cache=cache, transform=grey_stats)
    assert counter.rows == len(items)
    extract_features(clip, root, items, cache=cache, precision="bf16")
    assert counter.rows == 2 * len(items)
    augmented_views(clip, root, items, views=1, seed=0, cache=cache)
    assert counter.rows == 3 * len(items) and cache.stats().rows == 4 * len(items)


def test_corrupt_rows_are_recomputed_and_replaced(dtd, clip, tmp_path, monkeypatch):
    root, items = dtd
    cache = FeatureCache(tmp_path / "cache")
    clean = extract_features(clip, root, items, cache=cache, batch_size=1).features
    with sqlite3.connect(cache.path) as conn:
        keys = [row[0] for row in conn.execute("SELECT key FROM features ORDER BY key LIMIT 3")]
        conn.execute("UPDATE features SET data = substr(data, 1, 100) WHERE key = ?", (keys[0],))
        conn.execute("UPDATE features SET data = zeroblob(256) WHERE key = ?", (keys[1],))
        conn.execute("UPDATE features SET dim = 32, data = substr(data, 1, 128) WHERE key = ?", (keys[2],))
    counter = EncodeCounter(monkeypatch, clip)
    reader = FeatureCache(tmp_path / "cache")
    again = extract_features(clip, root, items, cache=reader, batch_size=1)
    assert counter.rows == 3 and reader.corrupt == 3
    assert torch.equal(again.features, clean)
    extract_features(clip, root, items, cache=reader, batch_size=1)
    assert counter.rows == 3  # the rows were rewritten


def test_transform_without_describe_cannot_be_cached(dtd, clip, tmp_path):
    root, items = dtd
    plain = EvalTransform(32)
    with pytest.raises(ConfigError, match="describe"):
        extract_features(clip, root, items, transform=lambda image: plain(image), cache=FeatureCache(tmp_path / "c"))
    features = extract_features(clip, root, items, transform=lambda image: plain(image), batch_size=len(items))
    assert torch.equal(features.features, by_hand(clip, root, items))


# -- augmented views ---------------------------------------------------------------------------------------------------


def test_views_are_the_seeded_train_transform_of_each_image(dtd, clip):
    """View v of item i = encode(TrainTransform(image, view_generator(seed, path, v))); rows encoded in the same
    batch composition (image-major, all views of a batch of images at once), so exact."""
    root, items = dtd
    items = items[:3]
    result = augmented_views(clip, root, items, views=2, seed=7, batch_size=6)
    train = TrainTransform(32)
    pixels = torch.stack([train(load_image(root / item.path), view_generator(7, item.path, v))
                          for item in items for v in range(2)])
    with torch.no_grad():
        expected = clip.encode_image(pixels).view(3, 2, -1).transpose(0, 1)
    assert result.features.shape == (2, 3, 64) and result.num_views == 2
    assert torch.equal(result.features, expected)


def test_views_are_reproducible_and_distinct(dtd, clip):
    root, items = dtd[0], dtd[1][:4]
    first = augmented_views(clip, root, items, views=3, seed=1, batch_size=1).features
    again = augmented_views(clip, root, items, views=3, seed=1, batch_size=1, num_workers=2).features
    reordered = augmented_views(clip, root, items[::-1], views=[2, 0, 1], seed=1, batch_size=1).features
    assert torch.equal(first, again)
    assert torch.equal(reordered.flip(1), first[[2, 0, 1]])  # independent of item order and of the views asked
    other_seed = augmented_views(clip, root, items, views=3, seed=2, batch_size=1).features
    for v in range(3):
        assert not torch.allclose(other_seed[v], first[v], atol=1e-3)
        for w in range(v):
            assert not torch.allclose(first[v], first[w], atol=1e-3)
    eval_features = extract_features(clip, root, items, batch_size=1).features
    assert not torch.allclose(first[0], eval_features, atol=1e-3)


def test_each_image_is_decoded_once_for_all_its_views(dtd, clip, monkeypatch):
    root, items = dtd
    opened: list[str] = []
    real = transforms.load_image
    monkeypatch.setattr(transforms, "load_image", lambda path: opened.append(str(path)) or real(path))
    augmented_views(clip, root, items, views=4, seed=0, batch_size=5)
    assert sorted(opened) == sorted(str(root / item.path) for item in items)


def test_views_partly_cached_compute_only_the_missing_views(dtd, clip, tmp_path, monkeypatch):
    root, items = dtd
    cache = FeatureCache(tmp_path / "cache")
    two = augmented_views(clip, root, items, views=2, seed=3, cache=cache, batch_size=1).features
    counter = EncodeCounter(monkeypatch, clip)
    four = augmented_views(clip, root, items, views=4, seed=3, cache=cache, batch_size=1).features
    assert counter.rows == 2 * len(items)
    assert torch.equal(four[:2], two)
    assert torch.equal(four, augmented_views(clip, root, items, views=4, seed=3, batch_size=1).features)


def test_view_options_are_checked(dtd, clip):
    root, items = dtd
    for views in (0, [], [1, 1], [-1]):
        with pytest.raises(ConfigError, match="views"):
            augmented_views(clip, root, items, views=views, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        augmented_views(clip, root, items, views=1, seed=1.5)  # type: ignore[arg-type]


# -- bad images --------------------------------------------------------------------------------------------------------


@pytest.fixture
def with_bad(synthetic) -> tuple[Path, list[Item], list[Item]]:
    root, items = synthetic
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    bad = [Item("broken.jpg", 0), Item("missing.png", 1)]
    return root, items[:2] + bad[:1] + items[2:] + bad[1:], items


@pytest.mark.parametrize("cached", [False, True])
def test_bad_images_stop_the_call_with_their_list(with_bad, clip, tmp_path, cached):
    root, mixed, _ = with_bad
    cache = FeatureCache(tmp_path / "cache") if cached else None
    with pytest.raises(DatasetError) as info:
        extract_features(clip, root, mixed, cache=cache)
    message = str(info.value)
    assert "2 of 7 images" in message and "broken.jpg" in message and "missing.png" in message
    assert "on_error='skip'" in message


@pytest.mark.parametrize("cached", [False, True])
def test_bad_images_can_be_skipped_and_counted(with_bad, clip, tmp_path, cached, caplog):
    root, mixed, good = with_bad
    cache = FeatureCache(tmp_path / "cache") if cached else None
    result = extract_features(clip, root, mixed, cache=cache, on_error="skip", batch_size=1)
    assert result.skipped == ["broken.jpg", "missing.png"] and len(result) == 5
    assert result.paths == [i.path for i in good] and result.labels.tolist() == [i.label for i in good]
    assert torch.equal(result.features, extract_features(clip, root, good, batch_size=1).features)
    assert "skipped 2 of 7" in caplog.text
    views = augmented_views(clip, root, mixed, views=2, seed=0, on_error="skip", batch_size=1)
    assert views.features.shape == (2, 5, 64) and views.skipped == ["broken.jpg", "missing.png"]


# -- precision, options, helpers ---------------------------------------------------------------------------------------


def test_bf16_is_close_to_fp32(dtd, clip):
    """bf16 keeps 8 significant bits (unit roundoff u = 2**-9 ~ 0.2 %). The tiny ViT chains about 12 rounded matmul
    stages (patch conv, 2 x (qkv, attention, out, fc, proj), projection) whose relative errors add up roughly like a
    random walk, so about sqrt(12) * u ~ 0.7 % relative error is expected; 16 u = 3 % leaves room for error growth
    through the layers while still failing for any real bug (wrong rows are 100 % off)."""
    root, items = dtd
    fp32 = extract_features(clip, root, items).features
    bf16 = extract_features(clip, root, items, precision="bf16").features
    relative = (bf16 - fp32).norm(dim=-1) / fp32.norm(dim=-1)
    assert bf16.dtype == torch.float32
    assert 0 < relative.max() < 16 * 2**-9


def test_options_are_checked(dtd, clip):
    root, items = dtd
    for kwargs, word in [({"precision": "fp8"}, "precision"), ({"batch_size": 0}, "batch_size"),
                         ({"num_workers": -1}, "num_workers"), ({"on_error": "ignore"}, "on_error"),
                         ({"device": "cuda"}, "move the model"), ({"distributed": True}, "process group")]:
        with pytest.raises(ConfigError, match=word):
            extract_features(clip, root, items, **kwargs)


def test_no_items_give_an_empty_set(dtd, clip):
    result = extract_features(clip, dtd[0], [])
    assert result.features.shape == (0, 64) and result.labels.shape == (0,) and len(result) == 0


def test_progress_bar_only_when_asked(dtd, clip, capsys):
    root, items = dtd
    extract_features(clip, root, items[:2], progress=True)
    assert "image features" in capsys.readouterr().err
    extract_features(clip, root, items[:2])  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""


def test_feature_set_helpers():
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    views = FeatureSet(features, torch.tensor([0, 1, 2]), ["a", "b", "c"], ["bad"])
    assert (len(views), views.dim, views.num_views) == (3, 4, 2)
    one = views.view(1)
    assert torch.equal(one.features, features[1]) and one.num_views == 1 and one.skipped == ["bad"]
    part = views.subset([2, 0])
    assert torch.equal(part.features, features[:, [2, 0]]) and part.paths == ["c", "a"]
    assert part.labels.tolist() == [2, 0]
    assert one.view(0) is one and torch.equal(one.subset(torch.tensor([1])).features, features[1, 1:2])
    with pytest.raises(IndexError):
        views.view(2)
    with pytest.raises(ValueError, match="3 feature rows"):
        FeatureSet(features, torch.tensor([0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        FeatureSet(torch.zeros(3), torch.zeros(3, dtype=torch.int64), ["a", "b", "c"])


def test_the_tower_gets_full_batches_whatever_the_views_per_image(dtd, clip, monkeypatch):
    root, items = dtd  # 7 images
    counter = EncodeCounter(monkeypatch, clip)
    augmented_views(clip, root, items, views=3, seed=0, batch_size=4)  # 21 rows, 1 image per decoding batch
    assert counter.batches == [4, 4, 4, 4, 4, 1]
    counter.batches.clear()
    augmented_views(clip, root, items, views=5, seed=0, batch_size=4)  # 5 views of one image overflow a batch
    assert counter.batches == [4] * 8 + [3]
    counter.batches.clear()
    extract_features(clip, root, items, batch_size=3)
    assert counter.batches == [3, 3, 1]


def test_auto_workers_follow_the_machine_and_the_work():
    assert default_num_workers("cpu", 10, cores=16) == 0  # a handful of images: not worth a process
    assert default_num_workers("cpu", 500, cores=1) == 0
    assert default_num_workers("cpu", 500, cores=2) == 1  # the tower keeps the cores; one worker keeps ahead
    assert default_num_workers("cpu", 500, cores=64) == 1
    assert default_num_workers("cuda", 500, cores=4) == 3
    assert default_num_workers("cuda", 500, cores=64) == 8


def test_a_decoding_worker_gives_the_same_features(dtd, clip):
    root, items = dtd
    many = items * 5  # 35 images: enough for "auto" to start a worker
    assert default_num_workers("cpu", len(many), cores=2) == 1
    inline = augmented_views(clip, root, many, views=2, seed=4, batch_size=8, num_workers=0).features
    assert torch.equal(augmented_views(clip, root, many, views=2, seed=4, batch_size=8, num_workers=1).features,
                       inline)
