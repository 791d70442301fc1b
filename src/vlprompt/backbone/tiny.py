"""Small randomly initialised CLIPs with the real architecture, for tests and benchmarks (no weights needed)."""

from __future__ import annotations

from typing import Literal

import torch

from vlprompt.backbone.model import CLIP, CLIPConfig


def tiny_config(kind: Literal["vit", "resnet"] = "vit", *, embed_dim: int = 64, width: int = 128, layers: int = 2,
                text_width: int = 128, text_layers: int = 2, quick_gelu: bool = True) -> CLIPConfig:
    """Config of a tiny CLIP: a 32 px ViT (8 px patches) or a 64 px modified ResNet, the real 77-token text tower.

    Widths are multiples of 64 so the head count inferred from the weights (width // 64) matches, as for real models.
    The vocabulary keeps CLIP's 49408 entries so the real tokenizer works.
    """
    if kind == "vit":
        return CLIPConfig(embed_dim=embed_dim, image_resolution=32, vision_layers=layers, vision_width=width,
                          vision_patch_size=8, transformer_width=text_width, transformer_heads=text_width // 64,
                          transformer_layers=text_layers, quick_gelu=quick_gelu, name="tiny-vit")
    if kind == "resnet":
        return CLIPConfig(embed_dim=embed_dim, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                          vision_patch_size=None, transformer_width=text_width, transformer_heads=text_width // 64,
                          transformer_layers=text_layers, quick_gelu=quick_gelu, name="tiny-resnet")
    raise ValueError(f"unknown tiny CLIP kind {kind!r}: use 'vit' or 'resnet'")


def build_tiny_clip(kind: Literal["vit", "resnet"] = "vit", seed: int = 0, **overrides) -> CLIP:
    """A randomly initialised tiny CLIP in eval mode; the same seed gives the same weights (global RNG untouched)."""
    config = tiny_config(kind, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(config)
        # random BatchNorm statistics so that ResNet tests exercise them (real checkpoints have non-trivial ones)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                torch.nn.init.normal_(module.weight, 1.0, 0.1)
                torch.nn.init.normal_(module.bias, 0.0, 0.1)
    return model.eval()
