"""The image-in-the-loop training path: the one training loop fed with images decoded and augmented on the fly.

It sees the same augmented views as the feature cache, so IVLP reduced to CoOp (text depth 1, no vision prompts)
trained on images takes CoOp's steps on cached features (up to fp32 rounding: the image tower runs on batches of 4
here and of 64 there, ~1e-6 relative per feature, compounded over a few momentum steps; a real difference, a wrong
view or order, moves the prompts by ~1e-2). Decoding workers, activation checkpointing and resuming change nothing
(bit for bit on CPU); unreadable images stop training or are left out and counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.data.types import Item
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.features.extract import augmented_views
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RunDir
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.ivlp import IVLP, IVLPConfig
from vlprompt.methods.promptsrc import PromptSRC, PromptSRCConfig
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train
from vlprompt.training.sources import ImageTrainSet, image_train_set

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["banded", "dotted", "striped", "zigzagged"]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("vit", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[Item]]:
    """4 classes x 3 random photographs of assorted sizes (PNG)."""
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    items = []
    for label in range(4):
        for index in range(3):
            height, width = 36 + 4 * index, 50 - 3 * label
            pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
            name = f"c{label}/{index}.png"
            (folder / f"c{label}").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / name)
            items.append(Item(name, label))
    return folder, items


def _ivlp(clip, **overrides):
    options = {"prompt_depth_text": 2, "prompt_depth_vision": 2, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return IVLP(clip, NAMES, IVLPConfig(**options))


def _set(images, views: int = 3, workers: int | str = 0) -> ImageTrainSet:
    folder, items = images
    return ImageTrainSet(folder, items, resolution=32, views=views, pool_seed=0, num_workers=workers)


CONFIG = TrainConfig(epochs=3, batch_size=4, lr=0.05, precision="fp32")


def test_ivlp_reduced_to_coop_on_images_takes_coops_steps_on_cached_features(clip, images):
    folder, items = images
    ivlp = _ivlp(clip, prompt_depth_text=1, n_ctx_vision=0, prompt_depth_vision=0)
    coop = CoOp(clip, NAMES, CoOpConfig(ctx_init="a photo of a"))
    start = coop.ctx.detach().clone()
    features = augmented_views(clip, folder, items, views=3, seed=0, precision="fp32")
    ran_images = train(ivlp, _set(images), CONFIG)
    ran_features = train(coop, features, CONFIG)
    assert (coop.ctx.detach() - start).abs().max() > 1e-2  # training moved the context
    torch.testing.assert_close(ivlp.ctx.detach(), coop.ctx.detach(), rtol=0, atol=2e-5)
    assert [s.accuracy for s in ran_images.history] == [s.accuracy for s in ran_features.history]
    assert [s.loss for s in ran_images.history] == pytest.approx([s.loss for s in ran_features.history], rel=1e-5)


def test_workers_and_checkpointing_change_nothing(clip, images):
    reference = _ivlp(clip)
    train(reference, _set(images), CONFIG)
    with_workers = _ivlp(clip)
    train(with_workers, _set(images, workers=2), CONFIG)
    checkpointed = _ivlp(clip)
    train(checkpointed, _set(images), TrainConfig(epochs=3, batch_size=4, lr=0.05, activation_checkpointing=True, precision="fp32"))
    assert checkpointed.checkpointing
    for a, b, c in zip(reference.parameters(), with_workers.parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_unaugmented_training_uses_the_eval_transform(clip, images):
    from vlprompt.backbone.transforms import EvalTransform, load_image

    folder, items = images
    seen = []
    ivlp = _ivlp(clip)
    # the training steps' inputs (the loop's end-of-epoch check of finite logits runs in eval mode)
    ivlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
    train(ivlp, _set(images, views=0), TrainConfig(epochs=2, batch_size=12, lr=0.05, precision="fp32"))
    transform = EvalTransform(32)
    expected = torch.stack([transform(load_image(folder / item.path)) for item in items])
    assert len(seen) == 2 and all(torch.equal(batch.sort(dim=0).values, expected.sort(dim=0).values) for batch in seen)


@pytest.mark.parametrize("method", ["ivlp", "promptsrc"])
def test_resuming_an_interrupted_run_gives_the_uninterrupted_prompts(clip, images, tmp_path, method):
    def build():
        if method == "ivlp":
            return _ivlp(clip)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return PromptSRC(clip, NAMES, PromptSRCConfig(prompt_depth_text=2, prompt_depth_vision=2, gpa_mean=2.0,
                                                          gpa_std=1.0))

    class Stop(Exception):
        pass

    def stop_after(epoch):
        def callback(stats):
            if stats.epoch == epoch:
                raise Stop

        return callback

    straight = build()
    train(straight, _set(images), CONFIG)
    run = RunDir.create_or_open(tmp_path / "run", RunConfig(method=method, dataset="dtd").to_dict())
    with pytest.raises(Stop):
        train(build(), _set(images), CONFIG, run_dir=run, on_epoch_end=stop_after(2))
    run.close()
    run = RunDir.create_or_open(tmp_path / "run", RunConfig(method=method, dataset="dtd").to_dict(), resume=True)
    resumed = build()
    result = train(resumed, _set(images), CONFIG, run_dir=run)
    run.close()
    assert result.start_epoch == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_unreadable_images_stop_training_or_are_left_out(clip, images, tmp_path):
    folder, items = images
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in items:
        target = broken / item.path
        target.parent.mkdir(exist_ok=True)
        target.write_bytes((folder / item.path).read_bytes())
    (broken / items[5].path).write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="c1/2.png"):
        train(_ivlp(clip), ImageTrainSet(broken, items, resolution=32, views=2, num_workers=0), CONFIG)
    kept = image_train_set(broken, items, resolution=32, views=2, pool_seed=0, num_workers=0, skip_unreadable=True,
                           progress=False)
    assert kept.skipped == ["c1/2.png"] and len(kept) == 11
    train(_ivlp(clip), kept, CONFIG)


def test_feature_methods_refuse_activation_checkpointing(clip, images):
    folder, items = images
    features = augmented_views(clip, folder, items, views=1, seed=0)
    with pytest.raises(ConfigError, match="activation checkpointing does not apply"):
        train(CoOp(clip, NAMES, CoOpConfig(n_ctx=2)), features,
              TrainConfig(epochs=2, batch_size=4, activation_checkpointing=True, precision="fp32"))

