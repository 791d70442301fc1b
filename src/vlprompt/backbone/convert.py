"""Weight-name conversions between checkpoint layouts and ours (OpenAI's names), and what a layout's metadata means.

- Hugging Face ``transformers`` ``CLIPModel`` (ViT image tower only; HF has no modified-ResNet CLIP):
  :func:`hf_to_openai`, :func:`openai_to_hf`, :func:`config_from_hf`.
- open_clip's OpenAI-architecture models keep OpenAI's names; :func:`normalize_state_dict` unwraps training
  checkpoints (``{"state_dict": ...}``, ``module.`` prefixes) and drops the non-weight entries, and
  :func:`quick_gelu_from_model_name` reads the activation from an open_clip model name.
- :func:`official_name` recognises the architecture of OpenAI's released models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vlprompt.backbone.download import OPENAI_CHECKPOINTS, resolve_short_name
from vlprompt.backbone.model import HEAD_WIDTH, NON_WEIGHT_KEYS, CLIPConfig, config_from_state_dict
from vlprompt.errors import CheckpointError

# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face transformers <-> OpenAI names

# whole tensors whose names differ (HF name -> ours)
_HF_TENSORS: dict[str, str] = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's name has the typo
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# nn.Linear weights [out, in] that OpenAI stores as projection matrices [in, out]
_HF_TRANSPOSED: dict[str, str] = {
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
}
# transformer stacks and, inside a block, module names (HF -> ours); q/k/v projections are fused into in_proj
_HF_STACKS: dict[str, str] = {
    "text_model.encoder.layers.": "transformer.resblocks.",
    "vision_model.encoder.layers.": "visual.transformer.resblocks.",
}
_HF_BLOCK: dict[str, str] = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_IGNORED = re.compile(r"(^|\.)position_ids$")  # buffers older HF checkpoints saved


def is_hf_layout(keys: Any) -> bool:
    """Whether weight names are those of ``transformers``' ``CLIPModel``."""
    return any(key.startswith(("text_model.", "vision_model.")) for key in keys)


def hf_to_openai(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ``transformers`` ``CLIPModel`` state dict to OpenAI's names (q/k/v fused, projections transposed).

    Raises :class:`CheckpointError` for names that have no counterpart (another architecture) or incomplete q/k/v.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if _HF_IGNORED.search(key):
            continue
        if key in _HF_TENSORS:
            out[_HF_TENSORS[key]] = tensor
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = tensor.t().contiguous()
        elif (converted := _hf_block_key(key)) is not None:
            ours, part = converted
            if part is None:
                out[ours] = tensor
            else:  # ours = "<block>.attn.in_proj_<weight|bias>", part = "q_proj" | "k_proj" | "v_proj"
                qkv.setdefault(ours, {})[part] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} weight(s) of this Hugging Face checkpoint have no counterpart in OpenAI's CLIP "
            f"architecture, e.g. {', '.join(sorted(unknown)[:5])}: only transformers' CLIPModel (ViT) is supported"
        )
    for ours, parts in qkv.items():
        if set(parts) != set(_QKV):
            missing = sorted(set(_QKV) - set(parts))
            raise CheckpointError(f"the Hugging Face checkpoint lacks the {'/'.join(missing)} weights for {ours}")
        shapes = {name: tuple(parts[name].shape) for name in _QKV}
        if len(set(shapes.values())) != 1:
            listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise CheckpointError(f"the q/k/v projections fused into {ours} have different shapes ({listed}): the "
                                  "checkpoint is damaged or not a CLIP checkpoint; download or save it again")
        out[ours] = _cat([parts[name] for name in _QKV])
    return out


def _cat(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors, dim=0)


def _hf_block_key(key: str) -> tuple[str, str | None] | None:
    """(our name, q/k/v part or None) for a weight inside an HF transformer block, else None."""
    for hf_stack, our_stack in _HF_STACKS.items():
        if not key.startswith(hf_stack):
            continue
        index, _, rest = key[len(hf_stack):].partition(".")
        if not index.isdigit():
            return None
        module, _, leaf = rest.rpartition(".")
        if leaf not in ("weight", "bias"):
            return None
        prefix = f"{our_stack}{index}."
        if module in _HF_BLOCK:
            return f"{prefix}{_HF_BLOCK[module]}.{leaf}", None
        attn, _, part = module.partition(".")
        if attn == "self_attn" and part in _QKV:
            return f"{prefix}attn.in_proj_{leaf}", part
        return None
    return None


def openai_to_hf(state_dict: Mapping[str, Tensor], *, text_only: bool = False) -> dict[str, Tensor]:
    """Rename an OpenAI-named ViT CLIP state dict to ``transformers``' ``CLIPModel`` names (inverse of
    :func:`hf_to_openai`). With ``text_only=True`` the image tower is left out, which also allows ResNet models
    (whose text tower is the same as HF's ``CLIPTextModelWithProjection``).
    """
    tensors = {ours: hf for hf, ours in _HF_TENSORS.items()}
    transposed = {ours: hf for hf, ours in _HF_TRANSPOSED.items()}
    blocks = {ours: hf for hf, ours in _HF_BLOCK.items()}
    if not text_only and "visual.proj" not in state_dict:
        raise CheckpointError("a ResNet CLIP has no Hugging Face counterpart: transformers' CLIPModel has a ViT image "
                              "tower only (pass text_only=True to convert the text tower alone)")
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if _is_non_weight(key) or (text_only and key.startswith("visual.")):
            continue
        if key in tensors:
            out[tensors[key]] = tensor
        elif key in transposed:
            out[transposed[key]] = tensor.t().contiguous()
        else:
            out.update(_openai_block_to_hf(key, tensor, blocks))
    return out


def _openai_block_to_hf(key: str, tensor: Tensor, blocks: Mapping[str, str]) -> dict[str, Tensor]:
    for hf_stack, our_stack in _HF_STACKS.items():
        if not key.startswith(our_stack):
            continue
        index, _, rest = key[len(our_stack):].partition(".")
        module, _, leaf = rest.rpartition(".")
        prefix = f"{hf_stack}{index}."
        if module in blocks:
            return {f"{prefix}{blocks[module]}.{leaf}": tensor}
        if module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
            kind = leaf.removeprefix("in_proj_")
            return {f"{prefix}self_attn.{part}.{kind}": chunk for part, chunk in zip(_QKV, tensor.chunk(3, dim=0))}
    raise CheckpointError(f"{key!r} is not a weight of OpenAI's CLIP architecture")


def config_from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Tensor], *,
                   name: str | None = None) -> CLIPConfig:
    """Our config for a converted HF checkpoint: sizes from the weights, heads and activation from ``config.json``.

    Raises :class:`CheckpointError` for HF settings our CLIP cannot reproduce (another model type, an activation
    other than quick_gelu/gelu or different ones per tower, a LayerNorm epsilon other than 1e-5, an MLP ratio
    other than 4).
    """
    model_type = hf_config.get("model_type", "clip")
    if model_type != "clip":
        raise CheckpointError(f"config.json describes a {model_type!r} model, not a CLIP model (model_type 'clip')")
    text = dict(hf_config.get("text_config") or {})
    vision = dict(hf_config.get("vision_config") or {})
    acts = {tower: cfg.get("hidden_act", "quick_gelu") for tower, cfg in (("text", text), ("vision", vision))}
    if set(acts.values()) - {"quick_gelu", "gelu"} or acts["text"] != acts["vision"]:
        raise CheckpointError(f"unsupported activations {acts}: our CLIP supports 'quick_gelu' or 'gelu' (exact), "
                              "the same in both towers")
    for tower, cfg in (("text", text), ("vision", vision)):
        eps = cfg.get("layer_norm_eps", 1e-5)
        if eps is not None and abs(float(eps) - 1e-5) > 1e-12:
            raise CheckpointError(f"unsupported {tower} layer_norm_eps {eps}: our CLIP uses 1e-5 as OpenAI's does")
    config = config_from_state_dict(state_dict, quick_gelu=acts["text"] == "quick_gelu", name=name)
    _check_mlp_ratio(state_dict)
    _check_hf_sizes(hf_config, text, vision, config)
    text_heads = int(text.get("num_attention_heads", config.transformer_width // HEAD_WIDTH))
    vision_heads = int(vision.get("num_attention_heads", config.vision_width // HEAD_WIDTH))
    return CLIPConfig(**{
        **config.to_dict(),
        "transformer_heads": text_heads,
        "vision_heads_override": vision_heads if vision_heads != config.vision_width // HEAD_WIDTH else None,
    })


def _check_hf_sizes(hf_config: Mapping[str, Any], text: Mapping[str, Any], vision: Mapping[str, Any],
                    config: CLIPConfig) -> None:
    """CheckpointError when a size stated in ``config.json`` disagrees with the weights (which are what is used)."""
    stated = [
        ("vision_config.image_size", vision.get("image_size"), config.image_resolution),
        ("vision_config.patch_size", vision.get("patch_size"), config.vision_patch_size),
        ("vision_config.hidden_size", vision.get("hidden_size"), config.vision_width),
        ("vision_config.num_hidden_layers", vision.get("num_hidden_layers"), config.vision_layers),
        ("text_config.hidden_size", text.get("hidden_size"), config.transformer_width),
        ("text_config.num_hidden_layers", text.get("num_hidden_layers"), config.transformer_layers),
        ("text_config.max_position_embeddings", text.get("max_position_embeddings"), config.context_length),
        ("text_config.vocab_size", text.get("vocab_size"), config.vocab_size),
        ("projection_dim", hf_config.get("projection_dim"), config.embed_dim),
    ]
    wrong = [f"{key} is {value!r} but the weights have {actual}" for key, value, actual in stated
             if value is not None and value != actual]
    if wrong:
        raise CheckpointError(f"config.json disagrees with the weights ({'; '.join(wrong)}): the folder mixes files of "
                              "different models; put the config.json that belongs to these weights beside them")


def _check_mlp_ratio(state_dict: Mapping[str, Tensor]) -> None:
    for key, tensor in state_dict.items():
        if key.endswith("mlp.c_fc.weight") and tensor.shape[0] != 4 * tensor.shape[1]:
            raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}: our CLIP needs an MLP 4x as wide as the "
                                  "transformer (intermediate_size = 4 * hidden_size)")


# ----------------------------------------------------------------------------------------------------------------------
# OpenAI / open_clip state dicts

_WRAPPER_KEYS = ("state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class Normalized(NamedTuple):
    """A checkpoint's weights with how they were found: the wrapper key, the stripped prefix, the dropped entries."""

    weights: dict[str, Tensor]
    wrapper: str | None
    prefix: str | None
    dropped: list[str]

    @property
    def looks_like_open_clip(self) -> bool:
        """Traces of an open_clip training checkpoint: a wrapper, a DDP prefix or a saved ``attn_mask`` buffer."""
        return (self.wrapper is not None or self.prefix == "module."
                or any(key.endswith("attn_mask") for key in self.dropped))


def normalize_state_dict(obj: Any, origin: str) -> Normalized:
    """Weights of a loaded checkpoint object, unwrapped, without the non-weight entries.

    Accepts a mapping of tensors or a training checkpoint wrapping one under ``"state_dict"`` /
    ``"model_state_dict"``; strips a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix carried by every
    name; drops ``attn_mask`` buffers, HF ``position_ids`` and the non-weight entries of OpenAI's TorchScript
    archives. Raises :class:`CheckpointError` naming ``origin`` if the object holds no state dict.
    """
    wrapper = None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj, wrapper = obj[key], key
                break
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty mapping" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{origin} holds {what}, not a state dict (a mapping from weight names to tensors)")
    not_tensors = [key for key, value in obj.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if not_tensors:
        hint = "" if wrapper else " (a training checkpoint must keep the weights under 'state_dict')"
        raise CheckpointError(f"{origin} is not a state dict of tensors: entries such as {not_tensors[:3]!r} are not "
                              f"tensors{hint}")
    weights = dict(obj)
    stripped = None
    for prefix in _PREFIXES:
        if all(key.startswith(prefix) for key in weights):
            weights = {key[len(prefix):]: value for key, value in weights.items()}
            stripped = stripped or prefix
    dropped = [key for key in weights if _is_non_weight(key)]
    for key in dropped:
        del weights[key]
    return Normalized(weights, wrapper, stripped, dropped)


def _is_non_weight(key: str) -> bool:
    return key in NON_WEIGHT_KEYS or key == "attn_mask" or key.endswith(".attn_mask") or bool(_HF_IGNORED.search(key))


def quick_gelu_from_model_name(model_name: str) -> bool:
    """Activation of a model name: open_clip's ``"...-quickgelu"`` and OpenAI's names (``"ViT-B/16"``) use
    QuickGELU; other open_clip names (``"ViT-B-16"``, ``"RN50"``) are built with ``nn.GELU`` by open_clip."""
    if model_name.casefold().endswith("-quickgelu"):
        return True
    return "/" in model_name  # OpenAI spells its names with a slash; open_clip with dashes


def official_architecture(model_name: str) -> CLIPConfig | None:
    """Architecture of an OpenAI model named by OpenAI's or open_clip's name (``"ViT-B-16-quickgelu"``), else None."""
    base = re.sub(r"-quickgelu$", "", model_name.strip(), flags=re.IGNORECASE)
    canonical = resolve_short_name(base)
    if canonical is None:
        return None
    return CLIPConfig(**OPENAI_CHECKPOINTS[canonical].architecture, name=canonical)


def same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    """Whether two configs describe the same weights' shapes and heads (ignoring activation and name)."""
    ignore = {"quick_gelu", "name"}
    return ({k: v for k, v in a.to_dict().items() if k not in ignore}
            == {k: v for k, v in b.to_dict().items() if k not in ignore})


def official_name(config: CLIPConfig) -> str | None:
    """OpenAI's name (``"ViT-B/16"``) if ``config`` is exactly one of OpenAI's released models (QuickGELU)."""
    if not config.quick_gelu:
        return None
    for name, entry in OPENAI_CHECKPOINTS.items():
        if same_architecture(config, CLIPConfig(**entry.architecture)):
            return name
    return None
