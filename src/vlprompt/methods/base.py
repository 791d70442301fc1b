"""What every method shares: the frozen CLIP held outside the module tree, class-name checks, cosine logits."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.model import CLIP
from vlprompt.common.vocab import seeded_torch
from vlprompt.errors import ConfigError


class TrainOutput(NamedTuple):
    """What a method's training forward may return instead of bare logits: the logits (the loop adds the
    cross-entropy) and a regulariser, a scalar that is a mean over the batch given (the loop weights it by that
    batch's size within the global batch, so under DDP the averaged gradient is the global batch's)."""

    logits: torch.Tensor
    regularizer: torch.Tensor



def check_classnames(classnames: Sequence[str]) -> list[str]:
    """The class names as a list, or a :class:`ConfigError` if the list is empty or holds a non-string / blank name.

    Names are used as given (the data layer already turns ``_`` into spaces); repeated names are allowed (ImageNet
    has two "crane" classes).
    """
    if isinstance(classnames, str):
        raise ConfigError(f"class names must be a list of strings, not one string ({classnames!r})")
    names = list(classnames)
    if not names:
        raise ConfigError("the class list is empty: a classifier needs at least one class name")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"class name #{index} is {name!r}; every class needs a non-empty name")
    return names


def class_positions(source: Sequence[str], target: Sequence[str], what: str) -> list[int]:
    """Where each class of ``target`` sits in ``source``: a classifier learned over ``source``'s classes (a cache of
    their keys, class-wise weights) moved to a subset of them in any order (ImageNet-A / -R keep 200 of ImageNet's
    classes; names repeated in ``source`` are matched in order). A :class:`ConfigError` names the classes ``what``
    cannot classify."""
    source, target = list(source), list(target)
    if target == source:
        return list(range(len(source)))
    where: dict[str, list[int]] = {}
    for index, name in enumerate(source):
        where.setdefault(name, []).append(index)
    unknown = [name for name in target if name not in where]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ConfigError(f"{what} was learned on {len(source)} classes and cannot classify {len(unknown)} other "
                          f"class(es) ({shown}): it classifies only (a subset of) its training classes; novel classes "
                          "and other datasets need a method that transfers (zero-shot, CoOp, CLIP-Adapter, ...)")
    if all(len(where[name]) == 1 for name in target):
        return [where[name][0] for name in target]
    # a repeated name (ImageNet's two "crane" classes): match the target as an ordered subsequence of the source, as
    # ImageNet-A / -R keep ImageNet's (sorted-wnid) class order
    positions, start = [], 0
    for name in target:
        found = next((index for index in where[name] if index >= start), None)
        if found is None:
            repeated = sorted({n for n in target if len(where[n]) > 1})
            raise ConfigError(f"{what}: the class name(s) {', '.join(map(repr, repeated))} occur more than once among "
                              "its training classes and the classes asked for are not in the training order, so "
                              "they cannot be matched by name")
        positions.append(found)
        start = found + 1
    return positions


def cosine_logits(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """``logit_scale * normalize(image) @ normalize(text).T`` in fp32 (also under autocast): [B, D] x [K, D] -> [B, K].

    ``text_features`` may also be per image, [B, K, D]; then each image is scored against its own K features.
    """
    with torch.autocast(device_type=image_features.device.type, enabled=False):  # fp32 even under autocast
        image = F.normalize(image_features.float(), dim=-1)
        text = F.normalize(text_features.float(), dim=-1)
        if text.ndim == 3:
            return logit_scale * torch.einsum("bd,bkd->bk", image, text)
        return logit_scale * image @ text.t()


def logit_scale_of(clip: CLIP) -> Tensor:
    """``exp(clip.logit_scale)`` as a detached fp32 scalar (CLIP's temperature is frozen)."""
    return clip.logit_scale.detach().float().exp()


@dataclass(frozen=True)
class CosineClassifier:
    """Evaluation classifier: fixed normalised text features [K, D] and CLIP's logit scale; image features -> logits.

    Image features are moved to the text features' device; logits come back there, in fp32.
    """

    text_features: Tensor
    logit_scale: Tensor

    def __call__(self, image_features: Tensor) -> Tensor:
        features = image_features.to(self.text_features.device)
        return cosine_logits(features, self.text_features, self.logit_scale.to(features.device))


class FrozenClipMethod(nn.Module):
    """Base of the methods: holds the frozen CLIP without registering it, so ``parameters()`` and ``state_dict()``
    hold only the method's learned state.

    The CLIP is frozen in place (``requires_grad_(False)``, eval mode) so backward never computes its gradients.
    Device and dtype moves of the method (``.to()``, ``.cuda()``, ``.half()``) also apply to the CLIP and to the
    frozen tensors a subclass lists in :meth:`_apply_frozen`; ``.train()`` / ``.eval()`` do not touch the CLIP.
    """

    method_name: str = ""

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Any) -> None:
        super().__init__()
        if not isinstance(clip, CLIP):
            raise ConfigError(f"methods need a vlprompt CLIP model, got {type(clip).__name__}")
        object.__setattr__(self, "_clip", clip)  # plain attribute: not a registered submodule
        clip.requires_grad_(False)
        clip.eval()
        self.classnames: list[str] = check_classnames(classnames)
        self.config = config

    @property
    def clip(self) -> CLIP:
        """The frozen CLIP (not part of this module's parameters or state dict)."""
        clip: CLIP = self.__dict__["_clip"]
        return clip

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FrozenClipMethod:  # type: ignore[override]
        super()._apply(fn, recurse)
        self.clip._apply(fn, recurse)
        self._apply_frozen(fn)
        return self

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a device/dtype move to the subclass's frozen (unregistered) tensors; nothing by default."""

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenClipMethod:
        """A deep copy of the learned state that shares the (frozen, possibly large) CLIP and the tokenizer."""
        for shared in (self.clip, self.__dict__.get("_tokenizer")):
            if shared is not None:
                memo[id(shared)] = shared
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def classifier(self) -> Callable[[Tensor], Tensor]:
        """Evaluation callable: image features [B, D] -> logits [B, K], with text features computed once here."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """The image features [B, D] :meth:`classifier` scores, of pre-processed images [B, 3, R, R]: the frozen
        image tower's here; image-in-the-loop methods run their prompted tower."""
        return self.clip.encode_image(images)

    def with_classnames(self, classnames: Sequence[str]) -> FrozenClipMethod:
        """The same method for another class list (cross-dataset evaluation)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, classes={self.num_classes}, backbone={self.clip.config.name!r}"


def rebuilt_on(method: FrozenClipMethod, classnames: Sequence[str], **kwargs: Any) -> Any:
    """``method``'s class built on ``classnames`` (same CLIP, config and ``kwargs``) carrying ``method``'s learned
    state: ``with_classnames`` of a method whose state does not depend on the classes (deep prompts, LoRA factors).
    The throw-away initialisation draws from a forked RNG, so the caller's random stream is untouched."""
    with seeded_torch(method.clip.device, None):
        clone = type(method)(method.clip, classnames, method.config, **kwargs)
    clone.load_state_dict(method.state_dict())
    clone.train(method.training)
    return clone
