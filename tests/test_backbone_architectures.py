"""OpenAI's released architectures: our CLIP + config_from_state_dict reproduce each one's shapes and parameter count.

Models are built on the meta device, so even RN50x64 costs no memory. Documented parameter counts:
- ViT-B/32: 151,277,313, printed by OpenAI's "Interacting with CLIP" notebook (``model.parameters()``);
- all models, in millions to two decimals (total / image tower / text tower): open_clip's ``docs/model_profile.csv``
  (open_clip builds these architectures with OpenAI's parameter names; text = everything but the image tower and
  ``logit_scale``).
"""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone.convert import official_architecture, official_name, quick_gelu_from_model_name
from vlprompt.backbone.download import OPENAI_CHECKPOINTS, resolve_short_name
from vlprompt.backbone.model import CLIP, CLIPConfig, config_from_state_dict

# name: (total, image, text) parameters in millions, open_clip docs/model_profile.csv
DOCUMENTED_MPARAMS = {
    "RN50": (102.01, 38.32, 63.69),
    "RN101": (119.69, 56.26, 63.43),
    "RN50x4": (178.30, 87.14, 91.16),
    "RN50x16": (290.98, 167.33, 123.65),
    "RN50x64": (623.26, 420.38, 202.88),
    "ViT-B/32": (151.28, 87.85, 63.43),
    "ViT-B/16": (149.62, 86.19, 63.43),
    "ViT-L/14": (427.62, 303.97, 123.65),
    "ViT-L/14@336px": (427.94, 304.29, 123.65),
}


def meta_clip(name: str) -> CLIP:
    with torch.device("meta"):
        return CLIP(CLIPConfig(**OPENAI_CHECKPOINTS[name].architecture, name=name))


def test_every_release_has_documented_counts():
    assert set(DOCUMENTED_MPARAMS) == set(OPENAI_CHECKPOINTS)


@pytest.mark.parametrize("name", list(OPENAI_CHECKPOINTS))
def test_parameter_counts_match_documented(name):
    model = meta_clip(name)
    total = sum(p.numel() for p in model.parameters())
    image = sum(p.numel() for p in model.visual.parameters())
    text = total - image - model.logit_scale.numel()
    expected = DOCUMENTED_MPARAMS[name]
    assert (round(total / 1e6, 2), round(image / 1e6, 2), round(text / 1e6, 2)) == expected
    assert all(p.is_meta for p in model.parameters())


def test_vit_b32_exact_parameter_count():
    assert sum(p.numel() for p in meta_clip("ViT-B/32").parameters()) == 151_277_313


@pytest.mark.parametrize("name", list(OPENAI_CHECKPOINTS))
def test_architecture_inferred_from_weight_shapes(name):
    model = meta_clip(name)
    inferred = config_from_state_dict(model.state_dict(), name=name)
    assert inferred == model.config
    assert official_name(inferred) == name
    # a GELU model of the same shapes is not OpenAI's release
    assert official_name(CLIPConfig(**{**inferred.to_dict(), "quick_gelu": False})) is None


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("ViT-B/16", {"visual.conv1.weight": (768, 3, 16, 16), "visual.positional_embedding": (197, 768),
                      "visual.proj": (768, 512), "text_projection": (512, 512)}),
        ("ViT-L/14@336px", {"visual.conv1.weight": (1024, 3, 14, 14), "visual.positional_embedding": (577, 1024),
                            "visual.proj": (1024, 768), "token_embedding.weight": (49408, 768)}),
        ("RN50", {"visual.conv1.weight": (32, 3, 3, 3), "visual.attnpool.positional_embedding": (50, 2048),
                  "visual.attnpool.c_proj.weight": (1024, 2048), "visual.layer4.2.conv3.weight": (2048, 512, 1, 1)}),
        ("RN50x64", {"visual.conv1.weight": (64, 3, 3, 3), "visual.attnpool.positional_embedding": (197, 4096),
                     "text_projection": (1024, 1024), "visual.layer3.35.bn3.running_var": (2048,)}),
    ],
)
def test_official_shapes(name, shapes):
    state = meta_clip(name).state_dict()
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_vision_heads_follow_openai():
    # OpenAI: ViT heads = width // 64; ResNet attention-pool heads = width * 32 // 64
    assert meta_clip("ViT-L/14").visual.transformer.resblocks[0].attn.heads == 16
    assert meta_clip("RN50").visual.attnpool.num_heads == 32
    assert meta_clip("RN50x64").visual.attnpool.num_heads == 64


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("RN50", "RN50"), ("rn50x4", "RN50x4"), ("ViT-B/16", "ViT-B/16"), ("ViT-B-16", "ViT-B/16"),
     ("vit-b-32", "ViT-B/32"), ("ViT-L-14-336px", "ViT-L/14@336px"), ("ViT-L-14-336", "ViT-L/14@336px"),
     ("ViT-L/14@336px", "ViT-L/14@336px"), (" ViT-L/14 ", "ViT-L/14"), ("ViT-B-16-quickgelu", None),
     ("RN51", None), ("openai/clip-vit-base-patch16", None)],
)
def test_short_name_aliases(alias, canonical):
    assert resolve_short_name(alias) == canonical


def test_official_checksums_are_in_urls():
    for name, entry in OPENAI_CHECKPOINTS.items():
        assert entry.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.filename == name.replace("/", "-").replace("@", "-") + ".pt"


@pytest.mark.parametrize(
    ("model_name", "quick", "canonical"),
    [("ViT-B-16", False, "ViT-B/16"), ("ViT-B-16-quickgelu", True, "ViT-B/16"), ("ViT-B/16", True, "ViT-B/16"),
     ("RN50-quickgelu", True, "RN50"), ("RN50", False, "RN50"), ("ViT-L-14-336", False, "ViT-L/14@336px"),
     ("ViT-B-32-plus-256", False, None)],
)
def test_model_names(model_name, quick, canonical):
    assert quick_gelu_from_model_name(model_name) is quick
    arch = official_architecture(model_name)
    assert (arch.name if arch else None) == canonical
