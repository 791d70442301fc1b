"""CLIP's two towers in compact PyTorch, with OpenAI's parameter names.

The modules mirror OpenAI CLIP's ``model.py`` parameter for parameter (an OpenAI state dict loads with
``load_state_dict`` as is), but attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`,
activations are batch-first, and the text tower can be fed token *embeddings* (:meth:`CLIP.encode_text_embeddings`)
so prompt learners can insert learned context vectors. Both towers take an optional
:class:`~vlprompt.backbone.extension.TowerExtension` (deep prompts at chosen layers, low-rank q/k/v updates,
activation checkpointing); without one they run exactly the plain computation.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from vlprompt.backbone.extension import QkvDelta, TowerExtension, is_active
from vlprompt.errors import CheckpointError, ConfigError

HEAD_WIDTH = 64  # OpenAI CLIP uses 64-wide attention heads everywhere


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP model; ``vision_layers`` is an int for a ViT, a 4-tuple for a modified ResNet."""

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    quick_gelu: bool = True
    vision_heads_override: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, list):
            object.__setattr__(self, "vision_layers", tuple(self.vision_layers))
        if not self.is_vit and len(self.vision_layers) != 4:  # type: ignore[arg-type]
            raise ValueError(f"a ResNet CLIP needs 4 stage depths, got {self.vision_layers!r}")
        if self.is_vit and not self.vision_patch_size:
            raise ValueError("a ViT CLIP needs vision_patch_size")

    @property
    def is_vit(self) -> bool:
        return isinstance(self.vision_layers, int)

    @property
    def vision_heads(self) -> int:
        if self.vision_heads_override is not None:
            return self.vision_heads_override
        if self.is_vit:
            return max(1, self.vision_width // HEAD_WIDTH)
        return max(1, self.vision_width * 32 // HEAD_WIDTH)

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(data["vision_layers"], tuple):
            data["vision_layers"] = list(data["vision_layers"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> CLIPConfig:
        return cls(**dict(data))


# ----------------------------------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtype (as OpenAI CLIP does), cast back after."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP models were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, computed with SDPA (batch-first)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x: Tensor, delta: QkvDelta | None = None, layer: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Project [N, L, D] to per-head q, k, v of shape [N, heads, L, D/heads]; ``delta(layer, x)`` (an extension's
        low-rank update, ``[N, L, 3D]``) is added to the joint projection when given."""
        n, length, width = x.shape
        projected = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if delta is not None:
            projected = projected + delta(layer, x)
        q, k, v = projected.chunk(3, dim=-1)
        shape = (n, length, self.heads, width // self.heads)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def merge(self, out: Tensor) -> Tensor:
        """Per-head output [N, heads, L, d] back to [N, L, D] through the output projection."""
        n, heads, length, head_dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, length, heads * head_dim))

    def forward(self, x: Tensor, causal: bool = False, delta: QkvDelta | None = None, layer: int = 0) -> Tensor:
        q, k, v = self.qkv(x, delta, layer)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = False, delta: QkvDelta | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, delta=delta, layer=layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (batch-first)."""

    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x: Tensor, extension: TowerExtension | None = None) -> Tensor:
        if not is_active(extension):
            for block in self.resblocks:
                x = block(x, causal=self.causal)
            return x
        assert extension is not None
        extension.check_layers(self.layers, "text" if self.causal else "image")
        recompute = extension.checkpoint and torch.is_grad_enabled()
        for layer, block in enumerate(self.resblocks):
            edit = extension.blocks.get(layer)
            if edit is not None:
                x = edit.apply(x)
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, self.causal, extension.qkv_delta, layer,
                                                      use_reentrant=False)
            else:
                x = block(x, self.causal, extension.qkv_delta, layer)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# image towers


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 quick_gelu: bool = True) -> None:
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"image resolution {resolution} is not a multiple of patch size {patch_size}")
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: Tensor, extension: TowerExtension | None = None) -> Tensor:
        """Image features [N, output_dim] read at the class token (position 0, which edits must leave in place)."""
        x = self.conv1(x)  # [N, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if extension is not None and extension.embed is not None:
            x = extension.embed.apply(x)
        x = self.transformer(self.ln_pre(x), extension)
        return self.ln_post(x[:, 0, :]) @ self.proj


class Bottleneck(nn.Module):
    """CLIP's ResNet bottleneck: anti-aliased strided convs (avg-pool before the stride-1 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token (plus position) attends over all spatial tokens."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        n, length, width = x.shape
        head_dim = width // self.num_heads
        q = self.q_proj(x[:, :1]).view(n, 1, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, length, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, head_dim]
        return self.c_proj(out.transpose(1, 2).reshape(n, width))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with avg-pool, anti-aliased strides, attention pooling instead of global pooling."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64) -> None:
        super().__init__()
        if input_resolution % 32:
            raise ValueError(f"ResNet input resolution must be a multiple of 32, got {input_resolution}")
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, extension: TowerExtension | None = None) -> Tensor:
        if is_active(extension):
            raise ConfigError("a ResNet image tower has no token sequence: it cannot take prompts or q/k/v updates "
                              "(use a ViT backbone)")
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# ----------------------------------------------------------------------------------------------------------------------
# the model


class CLIP(nn.Module):
    """CLIP: image tower, causal text tower, projections and the learned logit scale."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        if config.is_vit:
            self.visual: nn.Module = VisionTransformer(
                resolution=config.image_resolution,
                patch_size=int(config.vision_patch_size),  # type: ignore[arg-type]
                width=config.vision_width,
                layers=int(config.vision_layers),  # type: ignore[arg-type]
                heads=config.vision_heads,
                output_dim=config.embed_dim,
                quick_gelu=config.quick_gelu,
            )
        else:
            self.visual = ModifiedResNet(
                layers=config.vision_layers,  # type: ignore[arg-type]
                output_dim=config.embed_dim,
                heads=config.vision_heads,
                input_resolution=config.image_resolution,
                width=config.vision_width,
            )
        width = config.transformer_width
        self.transformer = Transformer(width, config.transformer_layers, config.transformer_heads, config.quick_gelu,
                                       causal=True)
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._fingerprint: str | None = None
        self.initialize_parameters()

    # -- initialisation (OpenAI's scheme; only matters for randomly initialised models) --------------------------------
    def initialize_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
        for tower in self._transformers():
            proj_std = (tower.width**-0.5) * ((2 * tower.layers) ** -0.5)
            attn_std = tower.width**-0.5
            fc_std = (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.config.transformer_width**-0.5)

    def _transformers(self) -> list[Transformer]:
        towers = [self.transformer]
        if isinstance(self.visual, VisionTransformer):
            towers.append(self.visual.transformer)
        return towers

    # -- properties ---------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (that of the first convolution, as in OpenAI CLIP)."""
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def image_resolution(self) -> int:
        return self.config.image_resolution

    @property
    def context_length(self) -> int:
        return self.config.context_length

    # -- towers -------------------------------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, extension: TowerExtension | None = None) -> Tensor:
        """Image features [N, embed_dim] (not normalised) of pre-processed images [N, 3, R, R].

        ``extension``: deep prompts / q,k,v updates of the image tower (ViT only; a ResNet raises ConfigError).
        """
        if extension is None:
            return self.visual(images.to(self.dtype))
        return self.visual(images.to(self.dtype), extension)

    def encode_text(self, ids: Tensor) -> Tensor:
        """Text features [N, embed_dim] (not normalised) of token ids [N, L], L <= context length.

        Read at the end-of-text token, which has the largest id of the vocabulary (as in OpenAI CLIP).
        """
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [N, L], got shape {tuple(ids.shape)}")
        return self.encode_text_embeddings(self.token_embedding(ids), ids.argmax(dim=-1))

    def encode_text_embeddings(self, x: Tensor, eot_index: Tensor, extension: TowerExtension | None = None) -> Tensor:
        """Text features from token embeddings.

        ``x`` [N, L, width] are token embeddings *without* the positional embedding (prompt learners replace some
        of them with learned vectors); ``eot_index`` [N] gives the position of each sequence's end-of-text token, where
        the feature is read. Causal attention means positions after ``eot_index`` never influence the result.
        ``extension``: deep text prompts (replacing edits) / q,k,v updates of the text tower.
        """
        return self.text_features_from_hidden(self.text_hidden(x, extension), eot_index)

    def text_hidden(self, x: Tensor, extension: TowerExtension | None = None) -> Tensor:
        """Hidden states [N, L, width] of the text transformer (before ``ln_final``) from token embeddings."""
        length = x.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"text length {length} exceeds the context length {self.config.context_length}")
        x = x.to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        if extension is None:
            return self.transformer(x)
        extension.check_text()
        return self.transformer(x, extension)

    def text_features_from_hidden(self, hidden: Tensor, eot_index: Tensor) -> Tensor:
        """``ln_final`` at the end-of-text positions, then the text projection."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = self.ln_final(hidden[rows, eot_index.to(hidden.device)])
        return picked @ self.text_projection.to(picked.dtype)

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(ids), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    # -- identity -----------------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 over the architecture and every weight's bytes: identifies a backbone (cache keys, prompt files).

        Computed once per model object (weights are frozen in this library); :meth:`reset_fingerprint` forgets it.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(sorted(self.config.to_dict().items())).encode())
            for name, tensor in self.state_dict().items():
                digest.update(name.encode())
                digest.update(str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def reset_fingerprint(self) -> None:
        self._fingerprint = None


# ----------------------------------------------------------------------------------------------------------------------
# architecture inference from OpenAI-named weights


def _count_blocks(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    indices = {key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}
    return len(indices)


def config_from_state_dict(state_dict: Mapping[str, Tensor], *, quick_gelu: bool = True,
                           name: str | None = None) -> CLIPConfig:
    """Infer the architecture of an OpenAI-named CLIP state dict from its weights' shapes (as OpenAI's build_model)."""
    try:
        if "visual.proj" in state_dict:
            conv = state_dict["visual.conv1.weight"]
            vision_width = conv.shape[0]
            patch = conv.shape[-1]
            vision_layers: int | tuple[int, int, int, int] = _count_blocks(state_dict, "visual.transformer.resblocks.")
            grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            resolution = patch * grid
        else:
            vision_layers = tuple(_count_blocks(state_dict, f"visual.layer{b}.") for b in (1, 2, 3, 4))  # type: ignore[assignment]
            vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            patch = None
            resolution = grid * 32
        width = state_dict["ln_final.weight"].shape[0]
        return CLIPConfig(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=int(resolution),
            vision_layers=vision_layers,
            vision_width=int(vision_width),
            vision_patch_size=int(patch) if patch else None,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=int(width),
            transformer_heads=max(1, int(width) // HEAD_WIDTH),
            transformer_layers=_count_blocks(state_dict, "transformer.resblocks."),
            quick_gelu=quick_gelu,
            name=name,
        )
    except KeyError as exc:
        raise CheckpointError(
            f"the weights lack {exc.args[0]!r}: this is not an OpenAI-layout CLIP state dict "
            "(expected keys such as 'visual.conv1.weight', 'token_embedding.weight', 'text_projection')"
        ) from None


# names OpenAI's TorchScript archives keep beside the weights
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
