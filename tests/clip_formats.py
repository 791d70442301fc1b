"""Test helpers: save a (tiny) CLIP in each real checkpoint format, so loaders can be tested without real weights.

Import from tests as ``from clip_formats import save_torchscript, ...`` (pytest puts ``tests/`` on ``sys.path``).

- :func:`save_openai_state_dict`: ``torch.save(model.state_dict())`` with OpenAI's names, as OpenAI's
  ``build_model`` takes them.
- :func:`save_torchscript`: a TorchScript archive like OpenAI's ``RN50.pt`` / ``ViT-B-16.pt``: a traced model whose
  ``state_dict()`` holds OpenAI-named weights plus the non-weight entries ``input_resolution``, ``context_length``
  and ``vocab_size``.
- :func:`save_hf`: a Hugging Face folder written by ``transformers``' own ``CLIPModel.save_pretrained`` (ViT only).
- :func:`save_open_clip`: an open_clip training checkpoint (``{"epoch", "name", "state_dict", "optimizer"}``, DDP
  ``module.`` prefixes, the ``attn_mask`` buffer older open_clip versions saved), or the plain released form.

``transformers`` is imported only by :func:`save_hf` / :func:`hf_config`: it is a test-only reference.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from vlprompt.backbone.convert import openai_to_hf
from vlprompt.backbone.model import CLIP, CLIPConfig
from vlprompt.common.io import atomic_write

SOT, EOT = 49406, 49407  # CLIP's start- and end-of-text token ids (EOT is the largest id of the vocabulary)


def token_ids(*sequences: list[int], length: int = 77) -> torch.Tensor:
    """Token id rows ``[SOT, *words, EOT, 0, 0, ...]`` padded to ``length``, as CLIP's tokenizer returns them."""
    rows = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, words in zip(rows, sequences):
        ids = [SOT, *words, EOT]
        row[: len(ids)] = torch.tensor(ids)
    return rows


def save_openai_state_dict(model: CLIP, path: str | Path) -> Path:
    """``torch.save`` of the model's state dict (OpenAI's names), written atomically."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return atomic_write(path, lambda handle: torch.save(state, handle))


class _Archive(torch.nn.Module):
    """OpenAI's archive layout: the CLIP's submodules and parameters under their own names, plus the non-weight
    entries ``input_resolution``, ``context_length`` and ``vocab_size`` (which CLIP itself has as properties)."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        config = model.config
        self.register_buffer("input_resolution", torch.tensor(config.image_resolution))
        self.register_buffer("context_length", torch.tensor(config.context_length))
        self.register_buffer("vocab_size", torch.tensor(config.vocab_size))
        self._model = (model,)  # a tuple: not registered a second time

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._model[0](images, ids)


def save_torchscript(model: CLIP, path: str | Path) -> Path:
    """A TorchScript archive with OpenAI's weight names, made by tracing a copy of ``model``.

    The copy's submodules and parameters are re-registered, under the same names, on a container that also holds
    ``input_resolution``, ``context_length`` and ``vocab_size`` buffers (as OpenAI's archives do); tracing its
    ``forward(images, ids)`` (the two logit matrices, as OpenAI's) records the calls into those shared modules, so
    the archive's ``state_dict()`` has exactly OpenAI's names plus those three entries.
    """
    clone = copy.deepcopy(model).eval().requires_grad_(False)
    config = clone.config
    size = config.image_resolution
    images = torch.zeros(2, 3, size, size, dtype=clone.dtype)
    ids = torch.zeros(2, config.context_length, dtype=torch.long)
    ids[:, 0], ids[:, 1] = SOT, EOT
    with torch.no_grad():
        traced = torch.jit.trace(_Archive(clone), (images, ids), check_trace=False)
    return atomic_write(path, lambda handle: torch.jit.save(traced, handle))


def hf_config(config: CLIPConfig, **text_overrides: Any) -> Any:
    """The ``transformers.CLIPConfig`` of one of our (ViT) configs."""
    import transformers

    if not config.is_vit:
        raise ValueError("transformers' CLIPModel has a ViT image tower only")
    act = "quick_gelu" if config.quick_gelu else "gelu"
    text = dict(vocab_size=config.vocab_size, hidden_size=config.transformer_width,
                intermediate_size=4 * config.transformer_width, num_hidden_layers=config.transformer_layers,
                num_attention_heads=config.transformer_heads, max_position_embeddings=config.context_length,
                hidden_act=act, **text_overrides)
    vision = dict(hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
                  num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                  image_size=config.image_resolution, patch_size=config.vision_patch_size, hidden_act=act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.embed_dim)


def to_hf_model(model: CLIP) -> Any:
    """A ``transformers.CLIPModel`` (eval mode) holding ``model``'s weights (ViT only)."""
    import transformers

    hf = transformers.CLIPModel(hf_config(model.config)).eval()
    state = {key: value.detach().float() for key, value in openai_to_hf(model.state_dict()).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise AssertionError(f"conversion to HF names is incomplete: missing {missing}, unexpected {unexpected}")
    return hf


def save_hf(model: CLIP, directory: str | Path, *, safe_serialization: bool = True) -> Path:
    """A Hugging Face CLIP folder (``config.json`` + ``model.safetensors``) written by ``CLIPModel.save_pretrained``.

    ``safe_serialization=False`` writes ``pytorch_model.bin`` instead (as older transformers did), where the
    installed transformers still supports it.
    """
    directory = Path(directory)
    hf = to_hf_model(model)
    if safe_serialization:
        hf.save_pretrained(directory)
    else:  # transformers 5 always writes safetensors: write the legacy .bin by hand beside its config.json
        hf.config.save_pretrained(directory)
        state = {key: value.contiguous() for key, value in hf.state_dict().items()}
        atomic_write(directory / "pytorch_model.bin", lambda handle: torch.save(state, handle))
    return directory


def save_open_clip(model: CLIP, path: str | Path, *, training_checkpoint: bool = True) -> Path:
    """An open_clip checkpoint of an OpenAI-architecture model (open_clip keeps OpenAI's weight names).

    With ``training_checkpoint=True`` it is what open_clip's training script saves under DDP:
    ``{"epoch", "name", "state_dict": {"module.<name>": ...}, "optimizer"}``; otherwise a plain state dict as in
    open_clip's released files. Both carry the text tower's causal ``attn_mask`` buffer (persisted by open_clip
    before it became non-persistent), which is not a weight.
    """
    length = model.config.context_length
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    state["attn_mask"] = torch.full((length, length), float("-inf")).triu_(1)
    if training_checkpoint:
        state = {
            "epoch": 3,
            "name": "tiny-run",
            "state_dict": {f"module.{key}": value for key, value in state.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.2, "params": [0, 1]}]},
        }
    return atomic_write(path, lambda handle: torch.save(state, handle))


def write_hf_folder(model: CLIP, directory: str | Path) -> Path:
    """A Hugging Face CLIP folder (``config.json`` + ``model.safetensors``) of a ViT CLIP, written without
    ``transformers``: the weights renamed by :func:`openai_to_hf`, the sizes stated as ``save_pretrained`` states
    them (the fields the loader reads)."""
    import json

    from safetensors.torch import save_file

    config = model.config
    if not config.is_vit:
        raise ValueError("transformers' CLIPModel has a ViT image tower only")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    act = "quick_gelu" if config.quick_gelu else "gelu"
    text = {"hidden_size": config.transformer_width, "intermediate_size": 4 * config.transformer_width,
            "num_hidden_layers": config.transformer_layers, "num_attention_heads": config.transformer_heads,
            "max_position_embeddings": config.context_length, "vocab_size": config.vocab_size, "hidden_act": act,
            "layer_norm_eps": 1e-5}
    vision = {"hidden_size": config.vision_width, "intermediate_size": 4 * config.vision_width,
              "num_hidden_layers": config.vision_layers, "num_attention_heads": config.vision_heads,
              "image_size": config.image_resolution, "patch_size": config.vision_patch_size, "hidden_act": act,
              "layer_norm_eps": 1e-5}
    document = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
                "text_config": text, "vision_config": vision}
    (directory / "config.json").write_text(json.dumps(document, indent=2), encoding="utf-8")
    weights = {key: value.detach().float().contiguous() for key, value in openai_to_hf(model.state_dict()).items()}
    save_file(weights, str(directory / "model.safetensors"))
    return directory
