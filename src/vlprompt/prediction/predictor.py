"""Top-k predictions of a learned (or zero-shot) classifier on images: files, folders, PIL images or tensors.

:class:`Predictor` wraps a method (CoOp, CoCoOp, zero-shot, ensemble, linear probe): its classifier is built once
(text features computed once), images are preprocessed with CLIP's evaluation transform at the backbone's resolution,
encoded by the frozen image tower, and scored; probabilities are the softmax of the method's logits (which include
CLIP's logit scale, as in the papers).

Inputs: a path to an image file, a folder (its image files, recursively, in sorted order; hidden files skipped), a PIL
image, or a tensor holding a raw image ``[3, H, W]`` / a batch ``[N, 3, H, W]`` (uint8 0-255 or float 0-1; the tensor
evaluation transform resizes and normalises it). A file that cannot be read raises a DatasetError naming every such
file, unless ``skip_bad`` is set: then it is left out and reported in :attr:`PredictionReport.skipped`.

A test-time method (TPT) is given the views it asks for (``method.test_views()``) of each image, as the evaluation
computes them; an image's views are drawn from generators seeded by the method's view seed and the image's source
(the path as given, or ``"<image N>"``), so a file predicts the same whatever else is predicted with it (but its
views differ from those of an evaluation, which names images by their path inside the dataset). Tensors are turned
into 8-bit PIL images first (the augmentations work on PIL images).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vlprompt.backbone.transforms import EvalTransform, TensorEvalTransform, load_image, view_generator
from vlprompt.common.io import read_text
from vlprompt.common.options import check_choice
from vlprompt.common.precision import autocast_for, resolve_precision
from vlprompt.common.vocab import DEFAULT_TEMPLATE, PRECISION_CHOICES
from vlprompt.data.classnames import same_name_message, same_named
from vlprompt.data.listing import format_offenders, is_hidden, is_image_name
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.evaluation.metrics import predict_topk
from vlprompt.methods import METHODS, Training, get_method
from vlprompt.methods.configs import EnsembleConfig, ZeroShotConfig
from vlprompt.methods.prompt_file import load_prompt

if TYPE_CHECKING:
    from vlprompt.backbone.model import CLIP

IMAGE_BATCH = 32
"""Images decoded and encoded at a time."""

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """The ``k`` most probable classes of one image, best first."""

    source: str                      # the file's path, or "<image N>" for an in-memory image (N counts from 0)
    labels: tuple[str, ...]
    probs: tuple[float, ...]

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.labels[0]

    @property
    def prob(self) -> float:
        """The probability of :attr:`label`."""
        return self.probs[0]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.source,
                "top_k": [{"label": label, "probability": prob} for label, prob in zip(self.labels, self.probs)]}


@dataclass
class PredictionReport:
    """Predictions of the readable images, and ``(source, reason)`` of the images left out (``skip_bad``)."""

    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": [p.to_dict() for p in self.predictions],
                "skipped": [{"image": source, "reason": reason} for source, reason in self.skipped]}


# ------------------------------------------------------------------------------------------------------ inputs


def expand_inputs(inputs: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One entry per image: folders are replaced by their image files (recursive, sorted), a batch tensor
    ``[N, 3, H, W]`` by its N images; a single path / image / tensor may be given without a list.

    An empty input list, or a folder without image files, is a DatasetError.
    """
    single = isinstance(inputs, str | os.PathLike | Image.Image) or (isinstance(inputs, torch.Tensor))
    items: list[ImageInput] = [inputs] if single else list(inputs)
    if not items:
        raise DatasetError("no images given: pass image files, folders of images, PIL images or tensors")
    expanded: list[ImageInput] = []
    for item in items:
        if isinstance(item, str | os.PathLike) and Path(item).is_dir():
            files = list(_image_files(Path(item)))
            if not files:
                raise DatasetError(f"folder {item} holds no image files (looked for .jpg, .png, ... recursively)")
            expanded.extend(files)
        elif isinstance(item, torch.Tensor) and item.ndim == 4:
            expanded.extend(item.unbind(0))
        elif isinstance(item, str | os.PathLike | Image.Image | torch.Tensor):
            expanded.append(item)
        else:
            raise ConfigError(f"cannot predict on a {type(item).__name__}: give image paths, folders, PIL images "
                              "or image tensors [3, H, W]")
    return expanded


def _image_files(folder: Path) -> Iterator[str]:
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if path.is_file() and is_image_name(path.name) and not any(is_hidden(part) for part in relative):
            yield str(path)


def _source(item: ImageInput, index: int) -> str:
    return os.fspath(item) if isinstance(item, str | os.PathLike) else f"<image {index}>"


# --------------------------------------------------------------------------------------------------- predictor


class Predictor:
    """Classify images with a method: ``Predictor(method).predict(images, top_k=5)``.

    ``device`` defaults to the backbone's; ``precision`` ("auto", "fp32", "bf16", "fp16") is the autocast of the
    image tower and classifier; "auto" (the default, as training, extraction and :func:`vlprompt.api.evaluate`) is
    resolved on construction (:func:`vlprompt.common.precision.resolve_precision`: bf16 where this machine's cached
    probe finds it faster, CUDA: where supported), so :attr:`precision` is the concrete one used. Build one from a
    prompt file with :meth:`from_prompt`, or any class list (zero-shot) with
    :meth:`zero_shot`; :func:`vlprompt.harness.pipeline.run_predictor` builds one from a run folder.
    """

    def __init__(self, method: Any, *, device: str | torch.device | None = None, precision: str = "auto",
                 batch_size: int = IMAGE_BATCH) -> None:
        if not hasattr(method, "classifier") or not hasattr(method, "clip"):
            raise ConfigError(f"Predictor needs a vlprompt method (with .clip and .classifier()), got "
                              f"{type(method).__name__}")
        check_choice("precision", precision, PRECISION_CHOICES)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.method = method
        self.clip: CLIP = method.clip
        self.classnames: list[str] = list(method.classnames)
        self.device = torch.device(device) if device is not None else self.clip.device
        self.precision: str = resolve_precision(precision, self.device)  # concrete: "auto" measured here
        self.batch_size = batch_size
        resolution = self.clip.config.image_resolution
        self._pil_transform = EvalTransform(resolution)
        self._tensor_transform = TensorEvalTransform(resolution)
        self._views = _test_views(method)  # a test-time method's views of each image, else None
        self._classifier = method.classifier()  # text features computed once, here

    # -- constructors -------------------------------------------------------------------------------------------------
    @classmethod
    def from_prompt(cls, path: str | os.PathLike[str], clip: CLIP, *, classnames: Sequence[str] | None = None,
                    **kwargs: Any) -> Predictor:
        """The method saved in a prompt file, on ``clip`` (which must be its backbone); ``classnames`` moves a
        unified context to other classes."""
        return cls(load_prompt(path, clip, classnames=classnames), **kwargs)

    @classmethod
    def zero_shot(cls, clip: CLIP, classnames: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
                  templates: Sequence[str] | None = None, **kwargs: Any) -> Predictor:
        """Zero-shot CLIP on any class list: one ``template``, or prompt ensembling over ``templates``."""
        names = parse_classnames(classnames)
        if templates:
            method = get_method("ensemble").build(clip, names, EnsembleConfig(templates=tuple(templates)))
        else:
            method = get_method("zeroshot").build(clip, names, ZeroShotConfig(template=template))
        return cls(method, **kwargs)

    # -- prediction ---------------------------------------------------------------------------------------------------
    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5) -> list[Prediction]:
        """The ``top_k`` classes of each image (see the module docstring for inputs); an unreadable file raises a
        DatasetError naming every unreadable file."""
        return self.predict_report(images, top_k, skip_bad=False).predictions

    def predict_report(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, *,
                       skip_bad: bool = False) -> PredictionReport:
        """As :meth:`predict`; with ``skip_bad`` unreadable files are left out and listed in ``skipped``."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        items = expand_inputs(images)
        report = PredictionReport()
        bad: list[tuple[str, str]] = []
        # images decoded at a time; a test-time method's images bring their views (batch_size rows at most)
        size = self.batch_size if self._views is None else max(1, self.batch_size // self._views.count)
        for start in range(0, len(items), size):
            chunk = list(enumerate(items[start:start + size], start=start))
            pixels, sources, failed = self._decode(chunk)
            bad.extend(failed)
            if bad and not skip_bad:
                continue  # keep decoding to name every unreadable file at once
            if pixels:
                report.predictions.extend(self._classify(pixels, sources, top_k))
        if bad and not skip_bad:
            listed = [f"{source} ({reason})" for source, reason in bad]
            raise DatasetError(f"{len(bad)} of {len(items)} images cannot be read: {format_offenders(listed)}; "
                               "fix or remove them, or skip them (--skip-bad / skip_bad=True)")
        report.skipped = bad
        if not report.predictions:
            raise DatasetError(f"none of the {len(items)} images could be read, nothing to predict")
        return report

    def _decode(self, chunk: Iterable[tuple[int, ImageInput]]) -> tuple[list[torch.Tensor], list[str],
                                                                         list[tuple[str, str]]]:
        pixels: list[torch.Tensor] = []
        sources: list[str] = []
        bad: list[tuple[str, str]] = []
        for index, item in chunk:
            source = _source(item, index)
            try:
                if self._views is not None:
                    tensor = self._test_views(item, source)
                elif isinstance(item, torch.Tensor):
                    tensor = self._tensor_transform(_check_tensor(item, source))
                else:
                    image: Image.Image = load_image(item) if isinstance(item, str | os.PathLike) else item
                    tensor = self._pil_transform(image)
            except DatasetError as exc:
                bad.append((source, str(exc)))
                continue
            pixels.append(tensor)
            sources.append(source)
        return pixels, sources, bad

    def _test_views(self, item: ImageInput, source: str) -> torch.Tensor:
        """The views ``[V, 3, R, R]`` of one image for a test-time method (view 0: the evaluation transform)."""
        views = self._views
        assert views is not None
        if isinstance(item, torch.Tensor):
            image = _tensor_to_pil(_check_tensor(item, source))
        else:
            image = load_image(item) if isinstance(item, str | os.PathLike) else item
        rows = [views.original(image)]
        rows += [views.transform(image, view_generator(views.seed, source, v)) for v in range(1, views.count)]
        return torch.stack(rows)

    def _classify(self, pixels: list[torch.Tensor], sources: list[str], top_k: int) -> list[Prediction]:
        if self._views is not None:  # [V, 3, R, R] per image: one tower call per image, features [V, B, D]
            with torch.inference_mode(), autocast_for(self.device, self.precision):
                features = torch.stack([self.method.encode_images(views.to(self.device, dtype=self.clip.dtype))
                                        .float() for views in pixels], dim=1)
        else:
            batch = torch.stack(pixels).to(self.device, dtype=self.clip.dtype)
            with torch.inference_mode(), autocast_for(self.device, self.precision):
                features = self.method.encode_images(batch).float()  # the prompted tower for image-in-the-loop ones
        ranked = predict_topk(self._classifier, features, self.classnames, top_k, device=self.device,
                              precision=self.precision, progress=False)
        return [Prediction(source, tuple(name for name, _ in row), tuple(prob for _, prob in row))
                for source, row in zip(sources, ranked, strict=True)]


def _test_views(method: Any) -> Any:
    """``method.test_views()`` for a method declared ``Training.TEST_TIME`` in the registry, else None."""
    spec = METHODS.get(getattr(method, "method_name", ""))
    return method.test_views() if spec is not None and spec.training is Training.TEST_TIME else None


def _tensor_to_pil(item: torch.Tensor) -> Image.Image:
    """An image tensor ``[3, H, W]`` (uint8 0-255 or float 0-1) as an RGB PIL image (floats rounded to 8 bits)."""
    pixels = item.detach().cpu()
    if pixels.dtype != torch.uint8:
        pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _check_tensor(item: torch.Tensor, source: str) -> torch.Tensor:
    if item.ndim != 3 or item.shape[0] != 3:
        raise DatasetError(f"{source}: an image tensor must be [3, H, W] (or a batch [N, 3, H, W]), got shape "
                           f"{tuple(item.shape)}")
    return item


def parse_classnames(classes: str | Sequence[str]) -> list[str]:
    """Class names from a comma-separated string (a trailing comma is allowed) or a sequence, stripped. ConfigError
    for an empty list, an empty entry (``" , dog"``) and a name given twice (``"cat,cat"``, also ``"Cat,cat"``: CLIP
    reads them alike)."""
    names = classes.split(",") if isinstance(classes, str) else list(classes)
    cleaned = [str(name).strip() for name in names]
    if isinstance(classes, str) and len(cleaned) > 1 and not cleaned[-1]:
        cleaned.pop()  # a trailing comma ends the list; an empty entry anywhere else is a mistake
    if not any(cleaned):
        raise ConfigError("the class list is empty: give at least one class name (e.g. --classes 'cat,dog')")
    empty = [str(number) for number, name in enumerate(cleaned, start=1) if not name]
    if empty:
        raise ConfigError(f"the class list {', '.join(cleaned)!r} has empty entries (number {', '.join(empty)}): "
                          "remove the extra commas, or give those names")
    shared = same_named(cleaned)
    if shared:
        raise ConfigError(same_name_message(shared, "the class list"))
    return cleaned


def read_classes_file(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one per line (blank lines and lines starting with '#' ignored)."""
    try:
        text = read_text(path, "the class list file", ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"cannot read the class list file {path}: it does not exist") from None
    lines = [line.strip() for line in text.splitlines()]
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise ConfigError(f"the class list file {path} holds no class names (one per line)")
    return names


__all__ = [
    "Prediction",
    "PredictionReport",
    "Predictor",
    "expand_inputs",
    "parse_classnames",
    "read_classes_file",
]
