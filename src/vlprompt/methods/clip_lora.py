"""CLIP-LoRA (Zanella and Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024).

Low-rank updates of the attention's query, key and value projections, in every block of both towers by default
(official repository MaxZanella/CLIP-LoRA: ``loralib/utils.py`` ``apply_lora``, ``loralib/layers.py``). In block
``l`` of a tower, projection ``p`` in ``config.params`` computes ``W_p x + b_p + s * B_p A_p dropout_p(x)`` with
``A_p`` ``[r, width]``, ``B_p`` ``[width, r]`` and ``s = alpha / sqrt(r)``; the dropout (training only) draws its
own mask for each projection, as the official code gives each projection its own dropout module. ``A`` starts as
``nn.Linear``'s default (Kaiming uniform, a = sqrt(5): U(-1/sqrt(width), 1/sqrt(width))) and ``B`` at zero, so the
adapted model starts exactly at zero-shot CLIP. The updates enter the frozen towers through the backbone's
``TowerExtension.qkv_delta`` hook; the towers are never copied or changed.

The classifier is zero-shot CLIP's ("a photo of a {}." for every dataset, as the official code) through the adapted
text tower, so a learned CLIP-LoRA classifies any class list. The learned state is the factors only (a few hundred
thousand values for ViT-B/16), saved as a prompt file bound to the backbone's fingerprint; :func:`merged_weights`
folds them into the weights (``W_p + s B_p A_p``) for a plain CLIP checkpoint (:func:`save_merged_clip`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.extension import TowerExtension
from vlprompt.backbone.fast_text import encode_trimmed
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer
from vlprompt.errors import CheckpointError, ConfigError, OutputError
from vlprompt.methods.base import CosineClassifier, FrozenClipMethod, cosine_logits, logit_scale_of, rebuilt_on
from vlprompt.methods.configs import LORA_PROJECTIONS, CLIPLoRAConfig
from vlprompt.methods.templates import fill
from vlprompt.methods.zeroshot import class_text_features, tokenize_prompts

__all__ = ["CLIPLoRA", "CLIPLoRAConfig", "LowRankQKV", "MERGED_FORMAT", "build_clip_lora", "lora_blocks",
           "merged_weights", "read_merged_metadata", "save_merged_clip"]

MERGED_FORMAT = "vlprompt-merged-clip"
"""The ``format`` metadata of a merged checkpoint (what :func:`save_merged_clip` may overwrite)."""


def lora_blocks(position: str, layers: int) -> list[int]:
    """The blocks of a ``layers``-block tower that get updates: all of them, a third (bottom / mid / up), a half
    (half-bottom / half-up) or the top three. For the 12-block towers of ViT-B these are the official index lists
    (``INDEX_POSITIONS_TEXT`` / ``INDEX_POSITIONS_VISION``: bottom 0-3, mid 4-7, up 8-11, half-bottom 0-5, half-up
    6-11, top3 9-11), and ViT-L/14's 24-block halves."""
    third, half = layers // 3, layers // 2
    spans = {"all": (0, layers), "bottom": (0, third), "mid": (third, 2 * third), "up": (2 * third, layers),
             "half-bottom": (0, half), "half-up": (half, layers), "top3": (max(0, layers - 3), layers)}
    if position not in spans:
        raise ConfigError(f"unknown LoRA position {position!r}: use one of {', '.join(spans)}")
    start, stop = spans[position]
    return list(range(start, stop))


class LowRankQKV(nn.Module):
    """The factors of one block: ``a`` ``[P, r, width]`` and ``b`` ``[P, width, r]`` for the P projections named in
    ``params`` (in q, k, v order), fp32."""

    def __init__(self, width: int, rank: int, params: Sequence[str], device: torch.device) -> None:
        super().__init__()
        self.params = tuple(p for p in LORA_PROJECTIONS if p in params)
        bound = 1.0 / math.sqrt(width)  # kaiming_uniform_(a=sqrt(5)) on [r, width], nn.Linear's default
        self.a = nn.Parameter(torch.empty(len(self.params), rank, width, device=device).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(len(self.params), width, rank, device=device))

    def delta(self, x: Tensor, scale: float, dropout: float, training: bool) -> Tensor:
        """The update of the joint projection ``[..., 3 * width]`` (q, k, v) of ``x`` ``[..., width]``."""
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        pieces = []
        for p in LORA_PROJECTIONS:
            if p not in self.params:
                pieces.append(x.new_zeros(x.shape))
                continue
            i = self.params.index(p)
            seen = F.dropout(x, dropout, training=training) if dropout > 0.0 else x
            pieces.append((seen @ a[i].t()) @ b[i].t() * scale)
        return torch.cat(pieces, dim=-1)

    def weight_update(self, scale: float) -> Tensor:
        """``s * B A`` of each projection as the rows of the joint ``in_proj_weight`` ``[3 * width, width]``
        (zero rows for the projections without an update), fp32."""
        width = self.a.shape[-1]
        rows = []
        for p in LORA_PROJECTIONS:
            if p in self.params:
                i = self.params.index(p)
                rows.append(scale * (self.b[i].detach().float() @ self.a[i].detach().float()))
            else:
                rows.append(torch.zeros(width, width, device=self.a.device))
        return torch.cat(rows, dim=0)


class CLIPLoRA(FrozenClipMethod):
    """CLIP-LoRA over K classes; ``self(images)`` gives logits [B, K] with gradients to every factor."""

    method_name = "clip_lora"
    trains_on_images = True

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: CLIPLoRAConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or CLIPLoRAConfig()
        if not isinstance(config, CLIPLoRAConfig):
            raise ConfigError(f"CLIP-LoRA needs a CLIPLoRAConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        settings = clip.config
        if config.encoder in ("vision", "both") and not settings.is_vit:
            raise ConfigError(f"CLIP-LoRA: backbone {settings.name or 'this CLIP'!r} has a ResNet image tower, whose "
                              "attention is not a transformer's q/k/v: use a ViT backbone (e.g. ViT-B/16), or "
                              "--encoder text")
        self._tokenizer = tokenizer
        self.scale = config.lora_alpha / math.sqrt(config.rank)
        self.text = self._factors("text", settings.transformer_layers, settings.transformer_width,
                                  config.encoder in ("text", "both"))
        self.vision = self._factors("image", int(settings.vision_layers) if settings.is_vit else 0,  # type: ignore
                                    settings.vision_width, config.encoder in ("vision", "both"))
        self._token_ids = tokenize_prompts([fill(config.template, name) for name in self.classnames],
                                           clip.context_length, tokenizer)  # CPU; errors surface here
        self.checkpointing = False

    def _factors(self, tower: str, layers: int, width: int, wanted: bool) -> nn.ModuleDict:
        if not wanted:
            return nn.ModuleDict()
        blocks = lora_blocks(self.config.position, layers)
        if not blocks:
            raise ConfigError(f"CLIP-LoRA: position {self.config.position!r} names no block of the {layers}-block "
                              f"{tower} tower; use --position all")
        return nn.ModuleDict({str(layer): LowRankQKV(width, self.config.rank, self.config.params, self.clip.device)
                              for layer in blocks})

    def use_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each tower block's activations in backward (less memory, same results: the dropout masks are
        replayed)."""
        self.checkpointing = bool(enabled)

    # -- extensions ---------------------------------------------------------------------------------------------------
    def _hook(self, factors: nn.ModuleDict, dropout: bool) -> Callable[[int, Tensor], Tensor]:
        def delta(layer: int, x: Tensor) -> Tensor:
            block = factors[str(layer)] if str(layer) in factors else None
            if block is None:
                return x.new_zeros(())
            return block.delta(x, self.scale, self.config.dropout, dropout)

        return delta

    def text_extension(self, dropout: bool = False) -> TowerExtension | None:
        """The text tower's low-rank updates (None when the text tower has none); ``dropout``: the training
        forward's dropout on the updates' input."""
        if not len(self.text):
            return None
        return TowerExtension(qkv_delta=self._hook(self.text, dropout), checkpoint=self.checkpointing)

    def vision_extension(self, dropout: bool = False) -> TowerExtension | None:
        """The image tower's low-rank updates (None when the image tower has none)."""
        if not len(self.vision):
            return None
        return TowerExtension(qkv_delta=self._hook(self.vision, dropout), checkpoint=self.checkpointing)

    # -- towers -------------------------------------------------------------------------------------------------------
    def text_features(self, dropout: bool = False) -> Tensor:
        """Class text features [K, D] (not normalised) through the adapted text tower, with gradients (one call for
        the K prompts, as the official code encodes them every step)."""
        ids = self._token_ids.to(self.clip.device)
        extension = self.text_extension(dropout)
        with torch.set_grad_enabled(torch.is_grad_enabled() and extension is not None):
            return encode_trimmed(self.clip, self.clip.token_embedding(ids), ids.argmax(dim=-1), extension)

    def image_features(self, images: Tensor, dropout: bool = False) -> Tensor:
        """Image features [B, D] (not normalised) through the adapted image tower."""
        extension = self.vision_extension(dropout)
        with torch.set_grad_enabled(torch.is_grad_enabled() and extension is not None):
            return self.clip.encode_image(images, extension)

    def forward(self, images: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of pre-processed images [B, 3, R, R]; in training mode with the dropout on the
        updates' input (the evaluation paths, :meth:`encode_images` and :meth:`classifier`, never drop)."""
        text = self.text_features(self.training)
        return cosine_logits(self.image_features(images.to(text.device), self.training), text,
                             logit_scale_of(self.clip))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Adapted image features [B, D] (not normalised): what :meth:`classifier` scores."""
        return self.image_features(images)

    @torch.no_grad()
    def classifier(self) -> CosineClassifier:
        """Zero-shot CLIP's classifier (its template, its encoding) through the adapted text tower."""
        features = class_text_features(self.clip, self.classnames, [self.config.template], tokenizer=self._tokenizer,
                                       extension=self.text_extension())
        return CosineClassifier(features, logit_scale_of(self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> CLIPLoRA:
        """The same adapted towers on another class list (the factors do not depend on the classes)."""
        return rebuilt_on(self, classnames, tokenizer=self._tokenizer)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.config.rank}, text_blocks={len(self.text)}, "
                f"image_blocks={len(self.vision)}, params={''.join(self.config.params)}")


def build_clip_lora(clip: CLIP, classnames: Sequence[str], config: CLIPLoRAConfig | None = None) -> CLIPLoRA:
    """Registry builder of :class:`CLIPLoRA`."""
    return CLIPLoRA(clip, classnames, config)


# ----------------------------------------------------------------------------------------------------------- merge


def merged_weights(method: CLIPLoRA) -> dict[str, Tensor]:
    """The CLIP's state dict (OpenAI names, CPU, its dtype) with every update folded into its block's joint
    projection: ``in_proj_weight + s * B A`` (computed in fp32, then cast to the weights' dtype). Loaded with
    ``load_clip`` it computes what the adapted model computes in evaluation (up to rounding)."""
    if not isinstance(method, CLIPLoRA):
        raise ConfigError(f"only a CLIP-LoRA method can be merged into its backbone, got a "
                          f"{getattr(method, 'method_name', '') or type(method).__name__} method")
    weights = {key: value.detach().cpu().clone() for key, value in method.clip.state_dict().items()}
    for prefix, factors in (("transformer", method.text), ("visual.transformer", method.vision)):
        for layer, block in factors.items():
            key = f"{prefix}.resblocks.{layer}.attn.in_proj_weight"
            base = weights[key]
            weights[key] = (base.float() + block.weight_update(method.scale).cpu()).to(base.dtype)
    return weights


def save_merged_clip(method: CLIPLoRA, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write :func:`merged_weights` as a plain CLIP checkpoint (a safetensors state dict with OpenAI names, what
    ``load_clip`` reads), atomically; returns the path.

    An existing file is replaced only with ``overwrite`` and only when it is a merged checkpoint this function wrote
    (:data:`MERGED_FORMAT`); anything else is refused (OutputError) and left as it was. ``method`` must be a
    CLIP-LoRA (ConfigError otherwise)."""
    from vlprompt import __version__
    from vlprompt.common.io import atomic_write_bytes, safetensors_bytes

    if not isinstance(method, CLIPLoRA):
        name = getattr(method, "method_name", None) or type(method).__name__
        raise ConfigError(f"merge folds CLIP-LoRA's low-rank updates into the backbone; a {name} method is not a "
                          "clip_lora method (prompt learners keep their prompts beside the backbone)")
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ConfigError(f"the merged checkpoint is a safetensors file: name it *.safetensors, got {str(target)!r}")
    if target.exists():
        if not overwrite:
            raise OutputError(f"{target} exists; pass --overwrite (overwrite=True) to replace an earlier merge")
        if _merged_format(target) != MERGED_FORMAT:
            raise OutputError(f"{target} exists and is not a merged checkpoint written by vlprompt merge: refusing to "
                              "overwrite it; choose another --out")
    clip = method.clip
    weights = merged_weights(method)
    metadata = {
        "format": MERGED_FORMAT,
        "method": method.method_name,
        "config": json.dumps({"rank": method.config.rank, "lora_alpha": method.config.lora_alpha,
                              "encoder": method.config.encoder, "position": method.config.position,
                              "params": list(method.config.params)}),
        "base_backbone": clip.config.name or "",
        "base_fingerprint": clip.fingerprint(),
        "quick_gelu": json.dumps(clip.config.quick_gelu),
        "vlprompt_version": __version__,
    }
    return atomic_write_bytes(target, safetensors_bytes({k: v.contiguous() for k, v in weights.items()}, metadata))


def _merged_format(path: Path) -> str | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - not a safetensors file: not ours
        return None


def read_merged_metadata(path: str | os.PathLike[str]) -> Mapping[str, str]:
    """The metadata of a merged checkpoint (CheckpointError when the file is not one)."""
    from safetensors import safe_open

    source = Path(path)
    if _merged_format(source) != MERGED_FORMAT:
        raise CheckpointError(f"{source} is not a merged checkpoint written by vlprompt merge")
    with safe_open(str(source), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})
