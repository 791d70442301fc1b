"""Zero-shot CLIP and prompt ensembling against a direct computation with ``clip.encode_text`` on 77 tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.backbone.tokenizer import tokenize
from vlprompt.errors import ConfigError
from vlprompt.methods import config_for_dataset
from vlprompt.data.registry import DATASETS, key_of
from vlprompt.methods.templates import (
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    dataset_template,
    fill,
)
from vlprompt.methods.zeroshot import Ensemble, EnsembleConfig, ZeroShot, ZeroShotConfig, ensemble_templates

CLASSNAMES = ["banded", "blotchy", "braided"]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("resnet", seed=1)


def _direct_text_features(clip, template: str) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokenize([fill(template, c) for c in CLASSNAMES])), dim=-1)


def test_zero_shot_equals_clip_with_the_template(clip, features):
    method = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template="{} texture."))
    text = _direct_text_features(clip, "{} texture.")
    expected = clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()
    assert (method(features) - expected).abs().max().item() < 1e-5
    assert (method.classifier()(features) - expected).abs().max().item() < 1e-5
    assert method.prompts() == [["banded texture.", "blotchy texture.", "braided texture."]]
    assert list(method.state_dict()) == [] and list(method.parameters()) == []


def test_zero_shot_without_a_template_uses_a_photo_of_a(clip):
    method = ZeroShot(clip, CLASSNAMES)
    assert method.templates == ("a photo of a {}.",)


def test_ensemble_is_the_normalised_mean_of_normalised_features(clip, features):
    templates = ("itap of a {}.", "a photo of the small {}.", "{} texture.")
    method = Ensemble(clip, CLASSNAMES, EnsembleConfig(templates=templates))
    mean = torch.stack([_direct_text_features(clip, t) for t in templates]).mean(dim=0)
    expected = clip.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(mean, dim=-1).t()
    assert (method(features) - expected).abs().max().item() < 1e-5


def test_ensemble_template_sets(clip):
    assert len(IMAGENET_TEMPLATES_SELECT) == 7 and len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80 and set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)
    coop7 = ensemble_templates(EnsembleConfig(template="{} texture."))
    assert coop7 == (*IMAGENET_TEMPLATES_SELECT, "{} texture.")
    assert ensemble_templates(EnsembleConfig(template_set="clip80")) == IMAGENET_TEMPLATES
    # the dataset's template is not repeated when the set already holds it
    assert ensemble_templates(EnsembleConfig(template_set="clip80", template="a photo of a {}.")) == IMAGENET_TEMPLATES
    mine = ensemble_templates(EnsembleConfig(templates=("a {}.", "the {}."), template="{} texture."))
    assert mine == ("a {}.", "the {}.")


def test_dataset_templates_and_the_reference_imagenet_rule():
    assert dataset_template("oxford_flowers") == dataset_template("Flowers102") == "a photo of a {}, a type of flower."
    assert dataset_template("DescribableTextures") == "{} texture."
    assert dataset_template("eurosat") == "a centered satellite photo of {}."
    assert key_of("caltech-101") == "caltech101" and len({info.template for info in DATASETS.values()}) > 1
    with pytest.raises(ConfigError, match="no hand-crafted template"):
        dataset_template("mnist")
    assert config_for_dataset(ZeroShotConfig(), "dtd", "{} texture.").template == "{} texture."
    assert config_for_dataset(ZeroShotConfig("a {}."), "dtd", "{} texture.").template == "a {}."
    assert config_for_dataset(EnsembleConfig(), "dtd", "{} texture.").template == "{} texture."
    assert config_for_dataset(EnsembleConfig(), "imagenet", "a photo of a {}.").template == ""
    assert config_for_dataset(EnsembleConfig(), "ImageNetV2", "a photo of a {}.").template == "a photo of a {}."


def test_with_classnames(clip, features):
    method = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template="{} texture."))
    other = method.with_classnames(["braided", "banded"])
    assert torch.allclose(other(features), method(features)[:, [2, 0]], atol=1e-5)


def test_bad_input(clip):
    with pytest.raises(ConfigError, match="class list is empty"):
        ZeroShot(clip, [])
    with pytest.raises(ConfigError, match="exactly one"):
        ZeroShotConfig(template="a photo of a cat.")
    with pytest.raises(ConfigError, match="exactly one"):
        EnsembleConfig(templates=("a {} of {}.",))
    with pytest.raises(ConfigError, match="template_set"):
        EnsembleConfig(template_set="clip81")
    with pytest.raises(ConfigError, match="not one string"):
        EnsembleConfig(templates="a {}.")
    with pytest.raises(ConfigError, match="context length"):
        ZeroShot(clip, ["word " * 80])
