"""CLIP-Adapter, Tip-Adapter(-F), LP++ and CLAP on small tensors with a tiny random CLIP.

Each method's defining formula is recomputed independently here (float64, written out from the papers' equations),
the special cases the maths promises are checked (alpha / ratio 0 and the zero-shot initialisations give zero-shot
CLIP's logits; Tip-Adapter-F without fine-tuning is Tip-Adapter). Tip-Adapter(-F)'s blindness to test labels is
shown through the real pipeline in test_cli_adapters.py. fp32 comparisons use tolerances of a few fp32 ulps of the
logit scale (100-ish): 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from vlprompt.methods.recipe import RecipeContext
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS, Training
from vlprompt.methods.base import class_positions, logit_scale_of
from vlprompt.methods.clap import CLAP, CLAPConfig, clap_multipliers
from vlprompt.methods.clip_adapter import CLIPAdapter, CLIPAdapterConfig
from vlprompt.methods.configs import TIP_GRID_SCALE, TipAdapterFConfig
from vlprompt.methods.lp_plus_plus import LPPlusPlus, LPPlusPlusConfig, lp_plus_plus_step_sizes
from vlprompt.methods.prompt_file import load_prompt, save_prompt
from vlprompt.methods.tip_adapter import TipAdapter, TipAdapterConfig, TipAdapterF, search_grid
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train

CLASSES = ["cat", "dog", "car", "tree"]
TEMPLATE = "a photo of a {}."
ATOL = 1e-4


@dataclass
class Features:
    features: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("vit", seed=0)


def _features(clip, views: int, per_class: int, seed: int) -> Features:
    """Clustered raw features [V, N, D] (or [N, D] for views 0) around random class centres."""
    dim = clip.config.embed_dim
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(CLASSES), dim, generator=torch.Generator().manual_seed(7)) * 3
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    base = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    if views == 0:
        return Features(base, labels)
    return Features(base + 0.5 * torch.randn(views, len(labels), dim, generator=generator), labels)


def _zero_shot(clip, x):
    return ZeroShot(clip, CLASSES, ZeroShotConfig(TEMPLATE))(x)


def _text64(clip) -> torch.Tensor:
    return ZeroShot(clip, CLASSES, ZeroShotConfig(TEMPLATE)).text_features().double()


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_declares_what_each_method_needs():
    assert METHODS["clip_adapter"].training is Training.FEATURES and METHODS["clip_adapter"].transfers
    assert METHODS["clap"].training is Training.FEATURES and not METHODS["clap"].transfers
    for name in ("tip_adapter", "tip_adapter_f", "lp_plus_plus"):
        spec = METHODS[name]
        assert spec.training is Training.CLOSED_FORM and spec.fit_views and not spec.transfers
    assert METHODS["tip_adapter"].train_defaults(RecipeContext(16, "dtd")) == {"views": 10, "crop_scale_min": 0.5}
    assert METHODS["tip_adapter_f"].train_defaults(RecipeContext(16, "eurosat"))["views"] == 100
    assert METHODS["lp_plus_plus"].train_defaults(RecipeContext(4, "dtd")) == {"views": 1, "crop_scale_min": 0.5}
    clap = METHODS["clap"].train_defaults(RecipeContext(16, "dtd"))
    assert (clap["lr"], clap["weight_decay"], clap["batch_size"], clap["epochs"], clap["views"]) == (0.1, 0.0, 256,
                                                                                                   300, 20)


def test_configs_take_the_official_per_dataset_values():
    tip = TipAdapterConfig().for_dataset("dtd", "{} texture.")
    assert (tip.alpha, tip.beta, tip.grid_scale, tip.grid_steps) == (2.0, 1.0, (13.0, 13.0), (200, 20))
    assert tip.templates == ("{} texture.",)
    assert TipAdapterConfig().for_dataset("imagenet", TEMPLATE).templates[0] == "itap of a {}."  # 7 templates
    assert TipAdapterConfig().for_dataset("folder:x", TEMPLATE).grid_scale == (50.0, 50.0)
    assert TipAdapterFConfig().for_dataset("eurosat", "{}").finetune_epochs == 100
    assert TipAdapterFConfig().for_dataset("dtd", "{}").finetune_epochs == 20
    assert len(TIP_GRID_SCALE) == 11
    assert CLAPConfig().for_dataset("imagenet", TEMPLATE).templates[-1] == TEMPLATE  # 7 + the dataset's
    assert CLIPAdapterConfig().for_dataset("imagenet", TEMPLATE).templates == (TEMPLATE,)
    with pytest.raises(ConfigError, match="ratio"):
        CLIPAdapterConfig(ratio=1.5)
    with pytest.raises(ConfigError, match="grid_scale"):
        TipAdapterConfig(grid_scale=(3.0,))


# ---------------------------------------------------------------------------------------------- CLIP-Adapter


@pytest.mark.parametrize("branch", ["visual", "text", "both"])
def test_clip_adapter_with_ratio_zero_is_zero_shot(clip, branch):
    x = _features(clip, 0, 3, seed=1).features
    adapter = CLIPAdapter(clip, CLASSES, CLIPAdapterConfig(templates=(TEMPLATE,), ratio=0.0, branch=branch))
    torch.testing.assert_close(adapter(x), _zero_shot(clip, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(adapter.classifier()(x), _zero_shot(clip, x), atol=ATOL, rtol=0)


def test_clip_adapter_blend_matches_an_independent_computation(clip):
    torch.manual_seed(3)
    adapter = CLIPAdapter(clip, CLASSES, CLIPAdapterConfig(templates=(TEMPLATE,), ratio=0.2, branch="both"))
    x = _features(clip, 0, 2, seed=2).features.double()
    dim = clip.config.embed_dim
    assert adapter.visual[0].weight.shape == (dim // 4, dim) and adapter.visual[0].bias is None

    def mlp(seq, v):
        return torch.relu(torch.relu(v @ seq[0].weight.double().t()) @ seq[2].weight.double().t())

    image = 0.2 * mlp(adapter.visual, x) + 0.8 * x
    text = _text64(clip)
    text = 0.2 * mlp(adapter.text, text) + 0.8 * text
    expected = logit_scale_of(clip).double() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(adapter(x.float()).double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(adapter.classifier()(x.float()).double(), expected, atol=ATOL, rtol=0)
    assert set(adapter.state_dict()) == {"visual.0.weight", "visual.2.weight", "text.0.weight", "text.2.weight"}


def test_clip_adapter_moves_to_other_classes(clip):
    adapter = CLIPAdapter(clip, CLASSES, CLIPAdapterConfig(templates=(TEMPLATE,)))
    other = adapter.with_classnames(["boat", "cat"])
    x = _features(clip, 0, 1, seed=4).features
    assert other(x).shape == (4, 2)
    torch.testing.assert_close(other(x)[:, 1], adapter(x)[:, 0], atol=ATOL, rtol=0)  # same adapter, same text


# ----------------------------------------------------------------------------------------------- Tip-Adapter


def _tip64(clip, x, keys, labels, alpha, beta):
    """Tip-Adapter's logits written out per class: zero-shot + alpha * sum over the class's keys of the affinity."""
    f = F.normalize(x.double(), dim=-1)
    logits = logit_scale_of(clip).double() * f @ _text64(clip).t()
    for k in range(len(CLASSES)):
        for i in torch.nonzero(labels == k).flatten().tolist():
            logits[:, k] += alpha * torch.exp(-beta * (1 - f @ keys[i].double()))
    return logits


def test_tip_adapter_cache_and_logits_match_the_formula(clip):
    data = _features(clip, 10, 3, seed=5)
    tip = TipAdapter(clip, CLASSES, TipAdapterConfig(templates=(TEMPLATE,), alpha=1.7, beta=5.5, search=False))
    info = tip.fit(data, None)
    keys = F.normalize(data.features.double().mean(dim=0), dim=-1)  # mean of the RAW views, then normalised
    torch.testing.assert_close(tip.cache_keys.double(), keys, atol=1e-6, rtol=0)
    assert torch.equal(tip.cache_labels, data.labels) and info["cache_size"] == 12 and info["cache_views"] == 10
    x = _features(clip, 0, 2, seed=6).features
    expected = _tip64(clip, x, keys, data.labels, 1.7, 5.5)
    torch.testing.assert_close(tip(x).double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(tip.classifier()(x).double(), expected, atol=ATOL, rtol=0)


def test_tip_adapter_with_alpha_zero_or_no_cache_is_zero_shot(clip):
    x = _features(clip, 0, 2, seed=7).features
    empty = TipAdapter(clip, CLASSES, TipAdapterConfig(templates=(TEMPLATE,)))
    torch.testing.assert_close(empty(x), _zero_shot(clip, x), atol=ATOL, rtol=0)
    tip = TipAdapter(clip, CLASSES, TipAdapterConfig(templates=(TEMPLATE,), alpha=0.0, beta=3.0, search=False))
    tip.fit(_features(clip, 10, 2, seed=8), None)
    torch.testing.assert_close(tip.classifier()(x), _zero_shot(clip, x), atol=ATOL, rtol=0)


def test_tip_adapter_search_is_the_official_grid_scored_on_validation(clip):
    train, val = _features(clip, 10, 3, seed=9), _features(clip, 0, 2, seed=10)
    config = TipAdapterConfig(templates=(TEMPLATE,), grid_scale=(7.0, 3.0), grid_steps=(12, 5))
    tip = TipAdapter(clip, CLASSES, config)
    info = tip.fit(train, val)
    betas = [i * (7.0 - 0.1) / 12 + 0.1 for i in range(12)]
    alphas = [i * (3.0 - 0.1) / 5 + 0.1 for i in range(5)]
    assert search_grid(7.0, 12) == betas and search_grid(3.0, 5) == alphas
    keys = F.normalize(train.features.double().mean(dim=0), dim=-1)
    best, chosen = -1.0, None
    for beta in betas:  # the official loop: beta outer, alpha inner, strictly better kept
        for alpha in alphas:
            logits = _tip64(clip, val.features, keys, train.labels, alpha, beta)
            acc = 100.0 * float((logits.argmax(-1) == val.labels).double().mean())
            if acc > best + 1e-9:
                best, chosen = acc, (beta, alpha)
    assert (info["beta"], info["alpha"]) == pytest.approx(chosen)
    assert info["val_accuracy"] == pytest.approx(best) and info["selected_on"] == "val"
    assert (float(tip.beta), float(tip.alpha)) == pytest.approx(chosen)
    assert info["beta_grid"] == {"min": betas[0], "max": betas[-1], "steps": 12, "scale": 7.0}


def test_tip_adapter_needs_validation_to_search(clip):
    tip = TipAdapter(clip, CLASSES, TipAdapterConfig(templates=(TEMPLATE,)))
    with pytest.raises(ConfigError, match="validation split.*--no-search"):
        tip.fit(_features(clip, 10, 2, seed=11), None)


def test_tip_adapter_f_without_fine_tuning_is_tip_adapter(clip):
    train, val = _features(clip, 10, 3, seed=12), _features(clip, 0, 2, seed=13)
    common = {"templates": (TEMPLATE,), "grid_scale": (5.0, 5.0), "grid_steps": (6, 4)}
    tip = TipAdapter(clip, CLASSES, TipAdapterConfig(**common))
    tip_f = TipAdapterF(clip, CLASSES, TipAdapterFConfig(**common, finetune_epochs=0))
    info, info_f = tip.fit(train, val), tip_f.fit(train, val, seed=1)
    assert torch.equal(tip.cache_keys, tip_f.cache_keys) and torch.equal(tip.cache_labels, tip_f.cache_labels)
    assert (info["alpha"], info["beta"]) == (info_f["alpha"], info_f["beta"]) and info_f["chosen_epoch"] == 0
    x = _features(clip, 0, 2, seed=14).features
    assert torch.equal(tip.classifier()(x), tip_f.classifier()(x))


def test_tip_adapter_f_fine_tunes_the_keys_and_picks_the_epoch_on_validation(clip):
    train, val = _features(clip, 20, 4, seed=15), _features(clip, 0, 2, seed=16)
    config = TipAdapterFConfig(templates=(TEMPLATE,), finetune_epochs=4, finetune_batch_size=5, grid_steps=(8, 4),
                               grid_scale=(5.0, 5.0))
    tip_f = TipAdapterF(clip, CLASSES, config)
    info = tip_f.fit(train, val, seed=3)
    history = info["finetune_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and info["epoch_selected_on"] == "val"
    accuracies = [h["val_accuracy"] for h in history]
    assert info["chosen_epoch"] == 1 + accuracies.index(max(accuracies))  # the first best epoch
    assert not torch.equal(tip_f.cache_keys, F.normalize(train.features[:10].mean(0), dim=-1))  # keys moved
    again = TipAdapterF(clip, CLASSES, config)
    assert again.fit(train, val, seed=3) == info and torch.equal(again.cache_keys, tip_f.cache_keys)


def test_tip_adapter_keeps_a_subset_of_its_classes_and_refuses_others(clip, tmp_path):
    tip = TipAdapter(clip, CLASSES, TipAdapterConfig(templates=(TEMPLATE,), alpha=2.0, beta=4.0, search=False))
    tip.fit(_features(clip, 10, 2, seed=20), None)
    x = _features(clip, 0, 1, seed=21).features
    subset = tip.with_classnames(["tree", "cat"])
    torch.testing.assert_close(subset(x), tip(x)[:, [3, 0]], atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="cannot classify 1 other class"):
        tip.with_classnames(["cat", "boat"])
    # repeated names (ImageNet's two "crane"s) are matched in the training order
    assert class_positions(["crane", "a", "crane", "b"], ["crane", "b"], "x") == [0, 3]
    assert class_positions(["crane", "a", "crane", "b"], ["a", "crane"], "x") == [1, 2]
    with pytest.raises(ConfigError, match="not in the training order"):
        class_positions(["crane", "a", "crane", "b"], ["b", "crane"], "x")
    path = save_prompt(tip, tmp_path / "tip.safetensors")
    loaded = load_prompt(path, clip)
    assert torch.equal(loaded.cache_keys, tip.cache_keys) and float(loaded.alpha) == 2.0
    assert torch.equal(loaded.classifier()(x), tip.classifier()(x))


# ------------------------------------------------------------------------------------------------------- LP++


def test_lp_plus_plus_unfitted_is_zero_shot(clip):
    x = _features(clip, 0, 2, seed=22).features
    lp = LPPlusPlus(clip, CLASSES, LPPlusPlusConfig(templates=(TEMPLATE,)))
    torch.testing.assert_close(lp(x), _zero_shot(clip, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(lp.classifier()(x), _zero_shot(clip, x), atol=ATOL, rtol=0)


def test_lp_plus_plus_fit_follows_the_paper_step_by_step(clip):
    data = _features(clip, 1, 3, seed=23)
    config = LPPlusPlusConfig(templates=(TEMPLATE,), iterations=25, alpha_every=10)
    lp = LPPlusPlus(clip, CLASSES, config)
    info = lp.fit(data, None)
    # independent float64 re-derivation: init, step sizes, gradients written out for softmax cross-entropy
    f = F.normalize(data.features[0].double(), dim=-1)
    y = F.one_hot(data.labels, len(CLASSES)).double()
    t = _text64(clip)
    n = f.shape[0]
    w = y.t() @ f
    alpha = torch.full((len(CLASSES),), 250.0 * float(((f @ t.t()) * y).sum(0).div(y.sum(0)).mean()),
                       dtype=torch.float64)
    lr_w = 4 * n / float(torch.linalg.eigvalsh(f.t() @ f)[-1])
    lr_alpha = n / (4 * float(((f @ t.t()) ** 2).sum(0).max()))
    assert info["lr_w"] == pytest.approx(lr_w, rel=1e-5) and info["lr_alpha"] == pytest.approx(lr_alpha, rel=1e-5)
    assert lp_plus_plus_step_sizes(f.float(), t.float()) == pytest.approx((lr_w, lr_alpha), rel=1e-5)
    assert info["initial_alpha"] == pytest.approx(float(alpha[0]), rel=1e-5)
    buf = torch.zeros_like(w)
    for it in range(25):
        p = torch.softmax(f @ w.t() + alpha * (f @ t.t()), dim=-1)
        grad_logits = (p - y) / n
        grad_w = grad_logits.t() @ f
        grad_alpha = (grad_logits * (f @ t.t())).sum(0)
        buf = grad_w if it == 0 else 0.9 * buf + grad_w
        w = w - lr_w * buf
        if (it + 1) % 10 == 0:
            alpha = alpha - lr_alpha * grad_alpha
    torch.testing.assert_close(lp.weight.double(), w, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(lp.alpha.double(), alpha, atol=1e-3, rtol=1e-4)
    x = _features(clip, 0, 1, seed=24).features
    fx = F.normalize(x.double(), dim=-1)
    torch.testing.assert_close(lp(x).double(), fx @ w.t() + alpha * (fx @ t.t()), atol=1e-3, rtol=1e-4)
    assert info["selected_on"].startswith("none")


# ------------------------------------------------------------------------------------------------------- CLAP


def test_clap_initialisation_is_zero_shot_and_the_penalty_is_the_formula(clip):
    x = _features(clip, 0, 2, seed=25).features
    clap = CLAP(clip, CLASSES, CLAPConfig(templates=(TEMPLATE,)))
    torch.testing.assert_close(clap(x), _zero_shot(clip, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(clap.classifier()(x), _zero_shot(clip, x), atol=ATOL, rtol=0)
    data = _features(clip, 3, 2, seed=26)
    clap.prepare(data)
    # multipliers: mean zero-shot probability of the own class over all views of the class's images
    logits = torch.cat([_zero_shot(clip, view) for view in data.features]).double()
    labels = data.labels.repeat(3)
    probs = torch.softmax(logits, dim=-1)
    expected = torch.stack([probs[labels == k, k].mean() for k in range(len(CLASSES))])
    torch.testing.assert_close(clap._multipliers.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(clap_multipliers(logits, labels, 4).double(), expected, atol=1e-6, rtol=0)
    assert float(clap.regularizer().detach()) == 0.0  # prototypes at their anchors
    with torch.no_grad():
        clap.prototypes.add_(0.25)
    anchors = clap.anchors.double()
    penalty = sum(float(expected[k]) * float(((clap.prototypes[k].detach().double() - anchors[k]) ** 2).sum())
                  for k in range(4)) / 4
    assert float(clap.regularizer().detach()) == pytest.approx(penalty, rel=1e-5)
    assert float(CLAP(clip, CLASSES, CLAPConfig(templates=(TEMPLATE,), constraint="none")).regularizer()) == 0.0


def test_clap_anchors_are_the_mean_of_unnormalised_text_features(clip):
    templates = (TEMPLATE, "a drawing of a {}.")
    clap = CLAP(clip, CLASSES, CLAPConfig(templates=templates))
    from vlprompt.backbone.tokenizer import get_tokenizer

    raw = []
    for template in templates:
        ids = get_tokenizer()([template.format(c) for c in CLASSES], context_length=77)
        raw.append(clip.encode_text(ids).double())
    torch.testing.assert_close(clap.anchors.double(), (raw[0] + raw[1]) / 2, atol=1e-4, rtol=1e-5)


def test_clap_trains_with_its_penalty_through_the_shared_loop(clip):
    data = _features(clip, 4, 3, seed=27)
    clap = CLAP(clip, CLASSES, CLAPConfig(templates=(TEMPLATE,)))
    plain = CLAP(clip, CLASSES, CLAPConfig(templates=(TEMPLATE,), constraint="none"))
    config = TrainConfig(epochs=3, batch_size=4, lr=0.1, weight_decay=0.0, seed=1)
    train(clap, data, config, device="cpu", progress=False)
    train(plain, data, config, device="cpu", progress=False)
    drift = (clap.prototypes.detach() - clap.anchors).norm()
    assert 0 < drift < (plain.prototypes.detach() - plain.anchors).norm()  # the penalty holds the prototypes back
    with pytest.raises(ConfigError, match="cannot classify"):
        clap.with_classnames(["boat"])
    assert math.isfinite(float(drift))
