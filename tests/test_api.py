"""`vlprompt.api`: the README workflow on a folder of the user's own images (learn a CoOp prompt, evaluate, predict,
save / load), the linear probe and zero-shot through `fit`, and the API's errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support import FIXTURES, assert_fp32_close, needs_fixtures

import vlprompt.api as vp
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import CheckpointError, ConfigError

pytestmark = [needs_fixtures, pytest.mark.usefixtures("private_cache")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A user's folder: one sub-folder of photos per class (the DTD fixture images, 9 per class)."""
    root = tmp_path_factory.mktemp("my_photos")
    for folder in sorted((FIXTURES / "dtd" / "images").iterdir()):
        shutil.copytree(folder, root / folder.name)
    return root


def test_readme_workflow(clip, photos, tmp_path):
    data = vp.load_dataset(f"folder:{photos}")
    assert data.classnames == ["banded", "blotchy", "braided", "bubbly", "bumpy"]
    coop = vp.build_method("coop", clip, data, n_ctx=4)
    before = coop.ctx.detach().clone()
    result = vp.fit(coop, data, shots=2, seed=1, epochs=3, lr=0.05, device="cpu", precision="fp32")
    assert result.kind == "features" and result.num_train == 10 and [s.epoch for s in result.history] == [1, 2, 3]
    assert result.history[-1].loss < result.history[0].loss and not torch.equal(coop.ctx.detach(), before)
    metrics = vp.evaluate(coop, data, precision="fp32")
    assert metrics["num_samples"] == len(data.test) and 0.0 <= metrics["accuracy"] <= 100.0

    new_image = photos / "bumpy" / sorted(p.name for p in (photos / "bumpy").iterdir())[0]
    predictions = vp.Predictor(coop).predict([new_image], top_k=3)
    assert predictions[0].source == str(new_image) and len(predictions[0].labels) == 3

    path = vp.save_prompt(coop, tmp_path / "coop.safetensors")
    loaded = vp.load_prompt(path, clip)
    assert torch.equal(loaded.ctx.detach(), coop.ctx.detach())
    # a loaded prompt promises its parameters (above, bit for bit); its outputs are the same float32 maths
    again = vp.Predictor(loaded).predict([new_image], top_k=3)
    assert [(p.source, p.labels) for p in again] == [(p.source, p.labels) for p in predictions]
    assert_fp32_close(torch.tensor([p.probs for p in again]), torch.tensor([p.probs for p in predictions]))
    # counts of argmax hits: rounding order moves one only at a near-tie
    assert vp.evaluate(loaded, data, precision="fp32") == metrics
    with pytest.raises(CheckpointError, match="fingerprint"):
        vp.load_prompt(path, build_tiny_clip("vit", seed=5))


def test_fit_is_deterministic_for_a_seed(clip, photos):
    data = vp.load_dataset(f"folder:{photos}")
    contexts = []
    for _ in range(2):
        coop = vp.build_method("coop", clip, data, n_ctx=2, seed=7)
        vp.fit(coop, data, shots=1, seed=7, epochs=2, lr=0.05, device="cpu", precision="fp32")
        contexts.append(coop.ctx.detach().clone())
    assert torch.equal(contexts[0], contexts[1])
    other = vp.build_method("coop", clip, data, n_ctx=2, seed=8)
    assert not torch.equal(other.ctx.detach(), vp.build_method("coop", clip, data, n_ctx=2, seed=7).ctx.detach())


def test_linear_probe_and_zero_shot_through_fit(clip):
    data = vp.load_dataset("dtd", FIXTURES)
    probe = vp.build_method("linear_probe", clip, data, c_grid=(1.0, 0.01), search_steps=1)
    result = vp.fit(probe, data, shots=2, seed=1, precision="fp32")
    assert result.kind == "closed_form" and result.num_train == 10 and result.info["c"] > 0
    assert len(result.info["coarse"]) == 2 and len(result.info["refine"]) == 1
    assert result.history == [] and "val_accuracy" in result.info
    zeroshot = vp.build_method("zeroshot", clip, data)
    assert zeroshot.templates == ("{} texture.",)  # the dataset's hand-crafted template
    assert vp.fit(zeroshot, data).kind == "none"
    named = vp.build_method("zeroshot", clip, ["cat", "dog"])
    assert named.templates == ("a photo of a {}.",)


def test_api_errors(clip):
    dtd = vp.load_dataset("dtd", FIXTURES)
    flowers = vp.load_dataset("oxford_flowers", FIXTURES)
    with pytest.raises(ConfigError, match="unknown method"):
        vp.build_method("coap", clip, dtd)
    with pytest.raises(ConfigError, match="unknown CoOpConfig field"):
        vp.build_method("coop", clip, dtd, n_context=4)
    with pytest.raises(ConfigError, match="class list is empty"):
        vp.build_method("coop", clip, [])
    coop = vp.build_method("coop", clip, dtd, n_ctx=2)
    with pytest.raises(ConfigError, match="with_classnames"):
        vp.evaluate(coop, flowers)
    with pytest.raises(ConfigError, match="unknown training option"):
        vp.fit(coop, dtd, shots=1, learning_rate=0.1)
    with pytest.raises(ConfigError, match="not both"):
        vp.fit(coop, dtd, train=vp.TrainConfig(precision="fp32"), epochs=2)
    with pytest.raises(ConfigError, match="expected a method"):
        vp.fit(object(), dtd)
    transferred = coop.with_classnames(flowers.classnames)  # the documented way to evaluate across datasets
    assert vp.evaluate(transferred, flowers, precision="fp32")["num_samples"] == 15


@pytest.mark.parametrize(("name", "options"), [
    ("kgcoop", {}), ("prograd", {"n_ctx": 8}), ("tcp", {"class_token_layer": 1}),
])
def test_successors_through_the_api(clip, tmp_path, name, options):
    """build_method / fit (the method's recipe: TCP trains with Adam) / evaluate / Predictor / save and load."""
    data = vp.load_dataset("dtd", FIXTURES)
    method = vp.build_method(name, clip, data, **options)
    assert method.config.template == {"kgcoop": "a photo of a {}, a type of texture.", "prograd": "a texture of {}.",
                                      "tcp": "a photo of a {}, a type of texture."}[name]  # the official table's DTD
    result = vp.fit(method, data, shots=1, seed=1, epochs=2, lr=0.01, device="cpu", precision="fp32")
    assert result.kind == "features" and len(result.history) == 2
    metrics = vp.evaluate(method, data, precision="fp32")
    image = sorted((FIXTURES / "dtd" / "images" / "banded").iterdir())[0]
    predictions = vp.Predictor(method).predict([image], top_k=2)
    loaded = vp.load_prompt(vp.save_prompt(method, tmp_path / f"{name}.safetensors"), clip)
    assert type(loaded) is type(method) and vp.evaluate(loaded, data, precision="fp32") == metrics
    assert vp.Predictor(loaded).predict([image], top_k=2) == predictions
