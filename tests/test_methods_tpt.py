"""TPT: the confidence selection and the average-entropy objective against numpy, the AdamW step against an explicit
computation, zero steps = zero-shot CLIP / the CoOp prompt it starts from, the reset between images, the test set's
order, the views (seeded per image and view, view 0 the original), AugMix, the config's official defaults.

Tolerances: logits are exp(logit_scale) (14.3 for the tiny CLIP) times a cosine; the fast text path and the plain
one differ by fp32 summation order (~1e-7 of a cosine), so logits agree to ~2e-6 (bound 1e-5, as CoOp's tests).
Where the same computation runs on the same inputs in the same shapes (zero-step TPT and CoOp's classifier, one
image alone or after others) the results are compared bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import FIXTURES, needs_fixtures, noise_image

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.backbone.transforms import AUGMIX_OPERATIONS, AugMixTransform, EvalTransform, TrainTransform, \
    view_generator
from vlprompt.errors import CheckpointError, ConfigError
from vlprompt.methods import METHODS, Training, method_config
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.prompt_file import save_prompt
from vlprompt.methods.tpt import TPT, TPTConfig, average_entropy, select_confident
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig

CLASSNAMES = ["cat", "golden retriever", "sea or lake", "x", "red fox"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def _views(clip, images: int, views: int = 64, seed: int = 0) -> torch.Tensor:
    """Random view features [V, B, D] whose views of one image are close to each other (a real image's are)."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, images, clip.config.embed_dim, generator=generator)
    return centre + 0.5 * torch.randn(views, images, clip.config.embed_dim, generator=generator)


# ------------------------------------------------------------------------------------------------- the defining maths


def _numpy_entropy(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return -terms.sum(axis=-1)


def test_selection_keeps_the_lowest_entropy_views_as_numpy_ranks_them():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    chosen = select_confident(logits, 6)
    expected = np.argsort(_numpy_entropy(logits.numpy()), kind="stable")[:6]
    assert chosen.tolist() == expected.tolist()
    assert TPTConfig().kept_views == 6 == int(64 * 0.1)


def test_average_entropy_is_the_entropy_of_the_mean_prediction():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(4)) * 5
    shifted = logits.double().numpy() - logits.double().numpy().max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    mean = probs.mean(axis=0)
    assert average_entropy(logits).item() == pytest.approx(float(-(mean * np.log(mean)).sum()), abs=1e-5)
    # a class no view gives any probability contributes 0, not NaN (the official clamp)
    extreme = torch.tensor([[0.0, 0.0, -1e4], [1.0, 0.0, -1e4]])
    value = average_entropy(extreme)
    assert torch.isfinite(value)
    p = np.array([[0.5, 0.5], [np.e / (1 + np.e), 1 / (1 + np.e)]]).mean(axis=0)
    assert value.item() == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-6)


def _explicit_step(clip, method: TPT, views: torch.Tensor, config: TPTConfig) -> tuple[torch.Tensor, np.ndarray]:
    """One TPT step written out: plain 77-token text path, softmax probabilities, numpy's selection, the entropy
    of the mean of probabilities, autograd's gradient, then AdamW's first step by its formula."""
    ctx = method.ctx.detach().clone().requires_grad_(True)
    layout = method.layout
    prompts = layout.assemble(ctx[None], layout.length)  # [K, 77, width]
    text = clip.encode_text_embeddings(prompts, layout.eot_index)
    scale = clip.logit_scale.exp()
    logits = scale * F.normalize(views, dim=-1) @ F.normalize(text, dim=-1).t()
    chosen = np.argsort(_numpy_entropy(logits.detach().double().numpy()), kind="stable")[:config.kept_views]
    mean = logits[torch.as_tensor(chosen)].softmax(dim=-1).mean(dim=0)
    loss = -(mean * mean.log()).sum()
    (grad,) = torch.autograd.grad(loss, ctx)
    lr, wd, eps = config.tta_lr, config.tta_weight_decay, 1e-8
    # AdamW, step 1: decoupled decay, then m_hat = g, v_hat = g^2 (bias corrections cancel the betas)
    updated = ctx.detach() * (1 - lr * wd) - lr * grad / (grad.abs() + eps)
    return updated, chosen


def test_one_step_is_adamw_on_the_entropy_of_the_selected_views(clip):
    config = TPTConfig()
    method = TPT(clip, CLASSNAMES, config)
    views = _views(clip, 1)[:, 0]
    expected, chosen = _explicit_step(clip, method, views, config)
    adapted = method.adapt(views)
    assert adapted.selected is not None and adapted.selected.tolist() == chosen.tolist()
    assert len(adapted.losses) == 1
    assert torch.allclose(adapted.ctx, expected, atol=1e-6, rtol=0)
    assert not torch.equal(adapted.ctx, method.ctx.detach())


def test_a_step_lowers_the_entropy_of_the_selected_views_and_moves_the_prediction(clip):
    method = TPT(clip, CLASSNAMES, TPTConfig())
    scale = clip.logit_scale.exp()
    for image in range(4):
        views = _views(clip, 4, seed=1)[:, image]
        adapted = method.adapt(views)
        with torch.no_grad():
            before = scale * F.normalize(views, dim=-1) @ F.normalize(method.text_features(), dim=-1).t()
            after = scale * F.normalize(views, dim=-1) @ F.normalize(method.text_features(adapted.ctx), dim=-1).t()
        selected = adapted.selected
        assert average_entropy(after[selected]) < average_entropy(before[selected])
        assert average_entropy(before[selected]).item() == pytest.approx(adapted.losses[0].item(), abs=1e-6)
        prediction = method.classifier()(views[:, None])
        assert torch.allclose(prediction, after[:1], atol=1e-5)
        assert (prediction - before[:1]).abs().max() > 1e-4  # the original image's logits moved


def test_more_steps_keep_the_first_selection(clip):
    method = TPT(clip, CLASSNAMES, TPTConfig(tta_steps=3))
    adapted = method.adapt(_views(clip, 1)[:, 0])
    assert len(adapted.losses) == 3 and adapted.losses[2] < adapted.losses[0]


# ------------------------------------------------------------------------------------------------ special cases


def test_zero_steps_is_zero_shot_clip_and_the_coop_prompt(clip):
    views = _views(clip, 3)
    tpt = TPT(clip, CLASSNAMES, TPTConfig(tta_steps=0))
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a"))
    zeroshot = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template="a photo of a {}."))
    logits = tpt.classifier()(views)
    for b in range(3):  # the same computation on the same shapes (one image at a time): bit for bit
        assert torch.equal(logits[b:b + 1], coop.classifier()(views[0, b:b + 1]))
    assert (logits - zeroshot.classifier()(views[0])).abs().max().item() < 1e-5
    assert zeroshot(views[0]).abs().max() > 1.0


def test_tpt_plus_coop_starts_from_the_coop_context(clip, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        coop = CoOp(clip, ["a", "b"], CoOpConfig(n_ctx=4))  # random context, other classes
    path = save_prompt(coop, tmp_path / "coop.safetensors")
    tpt = TPT(clip, CLASSNAMES, TPTConfig(init_prompt=str(path), tta_steps=0))
    assert torch.equal(tpt.ctx.detach(), coop.ctx.detach())
    views = _views(clip, 2)
    moved = coop.with_classnames(CLASSNAMES).classifier()
    assert all(torch.equal(tpt.classifier()(views[:, [b]]), moved(views[0, [b]])) for b in range(2))
    stepped = TPT(clip, CLASSNAMES, TPTConfig(init_prompt=str(path)))
    assert stepped.adapt(views[:, 0]).selected is not None
    # another backbone, a folder, a class-specific context: clear errors
    with pytest.raises(CheckpointError, match="backbone"):
        TPT(build_tiny_clip("vit", seed=1), CLASSNAMES, TPTConfig(init_prompt=str(path)))
    with pytest.raises(ConfigError, match="folder"):
        TPT(clip, CLASSNAMES, TPTConfig(init_prompt=str(tmp_path)))
    csc = save_prompt(CoOp(clip, ["a", "b"], CoOpConfig(n_ctx=4, csc=True)), tmp_path / "csc.safetensors")
    with pytest.raises(ConfigError, match="unified CoOp context"):
        TPT(clip, CLASSNAMES, TPTConfig(init_prompt=str(csc)))


def test_the_prompt_and_optimiser_are_reset_between_images(clip):
    method = TPT(clip, CLASSNAMES, TPTConfig())
    initial = method.ctx.detach().clone()
    views = _views(clip, 3)
    classifier = method.classifier()
    together = classifier(views)
    alone = [classifier(views[:, [b]]) for b in range(3)]
    for b in (2, 0, 1):  # again, in another order, after the others
        assert torch.equal(together[b:b + 1], alone[b])
        assert torch.equal(classifier(views[:, [b]]), alone[b])
    assert torch.equal(method.ctx.detach(), initial)  # the method itself is never tuned
    first, second = method.adapt(views[:, 0]), method.adapt(views[:, 0])
    assert torch.equal(first.ctx, second.ctx)  # a fresh optimiser (no momentum carried over)
    assert list(method.state_dict()) == ["ctx", "view_seed"]


def test_the_classifier_adapts_under_inference_mode(clip):
    views = _views(clip, 2)
    method = TPT(clip, CLASSNAMES, TPTConfig())
    expected = method.classifier()(views)
    with torch.inference_mode():
        assert torch.equal(method.classifier()(views.clone()), expected)
    with pytest.raises(ConfigError, match=r"\[V, B, D\]"):
        method.classifier()(views[0])


def test_with_classnames_keeps_the_context_and_the_view_seed(clip):
    method = TPT(clip, CLASSNAMES, TPTConfig())
    moved = method.with_classnames(["dog", "car"])
    assert torch.equal(moved.ctx, method.ctx) and int(moved.view_seed) == int(method.view_seed)
    assert moved.classifier()(_views(clip, 2)).shape == (2, 2)


# ---------------------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_official_ones_and_bad_values_are_refused():
    config = TPTConfig()
    assert (config.tta_views, config.tta_selection, config.tta_steps, config.tta_lr, config.tta_weight_decay,
            config.n_ctx, config.ctx_init, config.augmix) == (64, 0.1, 1, 5e-3, 0.01, 4, "a photo of a", "auto")
    assert METHODS["tpt"].training is Training.TEST_TIME and METHODS["tpt"].transfers
    assert not Training.TEST_TIME.uses_training_images and not Training.TEST_TIME.uses_sgd
    for bad in ({"tta_views": 0}, {"tta_selection": 0.0}, {"tta_selection": 1.5}, {"tta_views": 5},
                {"tta_steps": -1}, {"tta_lr": 0.0}, {"augmix": "maybe"}, {"init_prompt": 3}):
        with pytest.raises(ConfigError):
            method_config(METHODS["tpt"], bad)
    for dataset, augmix in (("imagenet", "off"), ("ImageNet-A", "off"), ("imagenet_sketch", "off"),
                            ("imagenetv2", "off"), ("imagenet_r", "off"), ("dtd", "on"), (None, "on")):
        assert config.for_dataset(dataset, "a photo of a {}.").augmix == augmix
    assert TPTConfig(augmix="off").for_dataset("dtd", "").augmix == "off"


# ----------------------------------------------------------------------------------------------------------- views


def test_augmix_views_are_seeded_and_without_mix_are_the_training_crop():
    image = noise_image(50, 70, 0)
    transform = AugMixTransform(32)
    first = transform(image, view_generator(7, "a.jpg", 3))
    assert torch.equal(first, transform(image, view_generator(7, "a.jpg", 3)))
    assert not torch.equal(first, transform(image, view_generator(7, "a.jpg", 4)))
    assert not torch.equal(first, transform(image, view_generator(7, "b.jpg", 3)))
    plain = AugMixTransform(32, mix=False)(image, view_generator(7, "a.jpg", 3))
    assert torch.equal(plain, TrainTransform(32)(image, view_generator(7, "a.jpg", 3)))
    assert first.shape == (3, 32, 32) and torch.isfinite(first).all() and not torch.equal(first, plain)
    assert transform.describe() != AugMixTransform(32, mix=False).describe()
    crop = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8"))
    for operation in AUGMIX_OPERATIONS:
        out = operation(crop, torch.Generator().manual_seed(0), 1)
        assert out.size == crop.size and out.mode == "RGB"


@needs_fixtures
def test_views_of_test_images_do_not_depend_on_the_order(clip, tmp_path):
    from vlprompt.data import load_dataset
    from vlprompt.evaluation.metrics import predict
    from vlprompt.stages import FeatureOptions, eval_features, test_time_views

    data = load_dataset("dtd", FIXTURES)
    method = TPT(clip, data.classnames, TPTConfig(tta_views=16).for_dataset("dtd", data.template))
    options = FeatureOptions(device=torch.device("cpu"), precision="fp32", batch_size=16, num_workers=0,
                             progress=False)
    forward = test_time_views(method, clip, data, "test", options)
    reverse = test_time_views(method, clip, dataclasses.replace(data, test=data.test[::-1]), "test", options)
    assert forward.features.shape == (16, len(data.test), clip.config.embed_dim)
    assert forward.paths == reverse.paths[::-1]
    assert torch.equal(forward.features, reverse.features.flip(1))  # each image's views alone in its tower call
    # view 0 is the original image (the evaluation transform), the others differ from it and from each other
    plain = eval_features(clip, data, "test", dataclasses.replace(options, cache=None))
    assert torch.allclose(forward.features[0], plain.features, atol=1e-5)
    assert (forward.features[1] - forward.features[2]).abs().max() > 1e-3
    # per-image predictions are the same whatever the order of the test set
    classifier = method.classifier()
    logits = {}
    for views in (forward, reverse):
        predicted = predict(classifier, views.features, len(data.classnames), progress=False)
        for path, label in zip(views.paths, predicted.tolist(), strict=True):
            logits.setdefault(path, set()).add(label)
        rows = classifier(views.features)
        for path, row in zip(views.paths, rows, strict=True):
            logits.setdefault(path + "#logits", []).append(row)
    for path in forward.paths:
        assert len(logits[path]) == 1
        first, second = logits[path + "#logits"]
        assert torch.equal(first, second)
    assert EvalTransform(clip.config.image_resolution).describe() == method.test_views().original.describe()


@needs_fixtures
def test_api_build_fit_evaluate_predict_save_load(clip, tmp_path):
    import vlprompt.api as vp

    data = vp.load_dataset("dtd", FIXTURES)
    method = vp.build_method("tpt", clip, data, tta_views=16, seed=3)
    assert method.config.augmix == "on"  # resolved for dtd
    assert vp.fit(method, data).kind == "test_time"
    metrics = vp.evaluate(method, data, precision="fp32", feature_cache=False, progress=False)
    assert metrics["num_samples"] == len(data.test)
    path = vp.save_prompt(method, tmp_path / "tpt.safetensors")
    loaded = vp.load_prompt(path, clip)
    assert int(loaded.view_seed) == int(method.view_seed) and torch.equal(loaded.ctx, method.ctx)
    assert vp.evaluate(loaded, data, precision="fp32", feature_cache=False, progress=False) == metrics
    assert int(vp.build_method("tpt", clip, data, seed=3).view_seed) == int(method.view_seed)
    assert int(vp.build_method("tpt", clip, data, seed=4).view_seed) != int(method.view_seed)
    image = FIXTURES / "dtd" / "images" / data.test[0].path
    predictor = vp.Predictor(loaded)
    first = predictor.predict([image, image], top_k=2)
    assert first[0] == first[1] and len(first[0].labels) == 2
    tensor = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    assert predictor.predict(tensor, top_k=1) == predictor.predict([tensor], top_k=1)


def test_published_numbers_of_tpt_are_the_official_readme_table():
    from vlprompt.harness.report.aggregate import method_label
    from vlprompt.harness.report.published import lookup

    expected = {"imagenet": 60.74, "imagenet_a": 26.67, "imagenetv2": 54.7, "imagenet_r": 59.11,
                "imagenet_sketch": 35.09}
    for target, accuracy in expected.items():
        value = lookup("tpt", "imagenet", target, "all", 0, "RN50", "domainshift")
        assert value is not None and value.accuracy == accuracy and "azshue/TPT" in value.source
    assert lookup("tpt", "imagenet", "imagenet_a", "all", None, "ViT-B/16") is None  # none entered (not read)
    assert method_label("tpt") == "TPT"


@pytest.mark.parametrize("device, precision", [
    ("cpu", "bf16"),
    pytest.param("cuda", "fp16", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA GPU")]),
])  # fp16 autocast on a CPU takes minutes; on CUDA it is the official setting (the loss scaled from 1000)
def test_a_step_under_mixed_precision_autocast(device, precision):
    from vlprompt.common.precision import autocast_for

    target = torch.device(device)
    clip = build_tiny_clip("vit", seed=0).to(target)  # its own: the module's CLIP stays on the CPU
    method = TPT(clip, CLASSNAMES, TPTConfig())
    views = _views(clip, 1)[:, 0].to(target)
    with torch.inference_mode(), autocast_for(target, precision):
        adapted = method.adapt(views)
        logits = method.classifier()(views[:, None])
    moved = (adapted.ctx - method.ctx.detach()).abs()
    # AdamW's first step moves every element by lr * |g| / (|g| + eps) <= lr, plus the decay lr * wd * |ctx|
    bound = 5e-3 * (1 + 0.01 * method.ctx.detach().abs().max().item()) + 1e-6
    assert 0 < moved.max().item() <= bound and moved.median().item() > 1e-3
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
