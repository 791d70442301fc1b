"""CLIP's image loading and preprocessing, without torchvision.

* :func:`load_image` / :func:`to_rgb`: any image file or PIL image to an RGB PIL image (EXIF orientation applied).
* :class:`EvalTransform` (PIL) and :class:`TensorEvalTransform` (tensors, batches, any device): CLIP's test
  transform: bicubic resize of the shorter side to ``size``, centre crop ``size`` x ``size``, [0, 1] float tensor,
  normalisation with CLIP's mean and std.
* :class:`TrainTransform` (PIL) and :class:`TensorTrainTransform`: CoOp's training transform: random resized crop
  (torchvision's sampling algorithm), bicubic resize to ``size``, random horizontal flip, [0, 1] tensor, normalisation.
  Randomness comes only from the ``generator`` argument; :func:`view_generator` derives one per (seed, image, view).
* :class:`AugMixTransform` (PIL): TPT's augmented test views, the training crop and flip followed by AugMix.

Geometry follows torchvision, so results match the papers' reference code: the longer side after resizing is
``int(size * long / short)``; the centre crop starts at ``round((h - size) / 2)``; crop sampling draws its numbers in
torchvision's order. The PIL transforms resize with PIL's bicubic filter (``a = -0.5``, uint8 output, as CLIP's
preprocessing does); the tensor transforms use ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``,
the same filter computed in float32, in PIL's two passes (horizontal, then vertical) each clamped to [0, 1] like
PIL's uint8 intermediate images, but not rounded. The two therefore differ by PIL's rounding alone: at most
1.125/255 per pixel before normalisation (0.5/255 from the first pass times the filter's gain of at most 1.25, plus
0.5/255 from the second), 0.28/255 on average on real photographs; the tests measure it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlprompt.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIZE = 224
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------------------------------
# loading and mode conversion


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as an RGB PIL image with its EXIF orientation applied.

    Raises :class:`DatasetError` naming the file when it is missing, unreadable, empty, not an image, or truncated.
    Truncated files always fail: Pillow refuses them by default, and a JPEG that Pillow completed with a fake end
    marker because some code set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is refused too. Colour modes are converted
    by :func:`to_rgb`. A URL is refused as such (images are not fetched). An image larger than Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (but below twice that, where Pillow refuses it) is decoded with a logged warning
    instead of Pillow's raw ``DecompressionBombWarning``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = os.fspath(path)
    if _URL.match(name):
        raise DatasetError(f"'{name}' is a URL: vlprompt does not download images; save the image to a file and give "
                           "its path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(name)
        with opened:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and opened.width * opened.height > limit:
                logger.warning("image file '%s' is very large (%d x %d pixels, more than Pillow's limit of %d): "
                               "decoding it takes much memory and time", name, opened.width, opened.height, limit)
            opened.load()
            if getattr(opened, "_ended", False):  # JpegImagePlugin's mark of a premature end of file
                raise DatasetError(f"image file '{name}' is truncated; re-download or remove it")
            upright = ImageOps.exif_transpose(opened)
            try:
                return to_rgb(upright)
            except DatasetError as exc:
                raise DatasetError(f"image file '{name}': {exc}") from None
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"image file '{name}' does not exist") from None
    except UnidentifiedImageError:
        raise DatasetError(
            f"'{name}' is not an image file Pillow can read (empty, corrupt or of an unsupported format)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"image file '{name}' is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        if "truncated" in str(exc):
            raise DatasetError(f"image file '{name}' is truncated ({exc}); re-download or remove it") from None
        raise DatasetError(f"cannot read image file '{name}': {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB (the same object when it is RGB without transparency already).

    * Transparency (modes LA, La, RGBA, RGBa, PA, palette or grey/RGB images with a ``transparency`` entry) is
      composited on white: a transparent background shows as white, as on a web page, instead of whatever colour
      the invisible pixels happen to hold (often black, which ``convert("RGB")`` would expose).
    * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit ``I`` (Pillow's mode for 16-bit PNGs in
      older versions) are taken as 0..65535 and scaled to 0..255 (``round(v / 257)``, clipped).
    * Float grey ``F`` uses Pillow's own scale for it (0..255, as ``convert("L")`` does), rounded and clipped.
    * 1-bit, L, P, CMYK (naive conversion, no ICC profile), YCbCr, LAB, HSV: Pillow's ``convert("RGB")``.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _grey_to_rgb(img)
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in img.info:
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")  # Pillow has no La -> RGBA
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DatasetError(f"cannot convert an image of mode {mode!r} to RGB: {exc}") from None


def _grey_to_rgb(img: Image.Image) -> Image.Image:
    import numpy as np
    from PIL import Image

    values = np.asarray(img).astype(np.float64)
    if img.mode != "F":
        values = values / 257.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# geometry (torchvision's conventions)


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size`` (torchvision: longer = int(size * long / short))."""
    if height <= 0 or width <= 0:
        raise DatasetError(f"cannot resize an empty image of {width}x{height} pixels")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_box(height: int, width: int, size: int) -> CropBox:
    """The centred ``size`` x ``size`` box of an image at least that large (offsets ``round((h - size) / 2)``)."""
    if height < size or width < size:
        raise ConfigError(f"cannot centre-crop {size}x{size} pixels from a {width}x{height} image")
    return CropBox(round((height - size) / 2), round((width - size) / 2), size, size)


def sample_resized_crop(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """torchvision's ``RandomResizedCrop.get_params`` with an explicit generator.

    Up to 10 tries: area fraction uniform in ``scale``, aspect ratio (width / height) log-uniform in ``ratio``,
    sides rounded; the first box that fits gets a uniform position. Otherwise the centred box of the whole image,
    with its aspect ratio clamped to ``ratio``.
    """
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        aspect = torch.exp(log_aspect).item()
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            return CropBox(top, left, crop_h, crop_w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def view_generator(seed: int, item: int | str, view: int = 0) -> torch.Generator:
    """A generator seeded from (seed, item, view number) alone, so an augmented view is reproducible whatever the
    order, batching or number of workers. ``item`` names the image: its index or, more robust when the item list
    changes, its relative path (an int and its decimal string name the same item)."""
    import torch

    digest = hashlib.blake2b(f"vlprompt-view:{seed}:{item}:{view}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    import torch

    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise ConfigError(
        "the training transform needs a generator (torch.Generator) or an int seed, "
        f"got {type(generator).__name__}; it never draws from the global random state"
    )


# --------------------------------------------------------------------------------------------------------------------
# shared pieces


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"transform size must be a positive int (224, or 336 for ViT-L/14@336px), got {size!r}")


def _check_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean and std need 3 values each and std > 0, got mean={mean!r}, std={std!r}")


def _freeze_floats(obj: object, *names: str) -> None:
    """Store the named fields of a frozen dataclass as tuples of floats (lists from a JSON config stay hashable)."""
    for name in names:
        try:
            values = tuple(float(v) for v in getattr(obj, name))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a sequence of numbers, got {getattr(obj, name)!r}") from None
        object.__setattr__(obj, name, values)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 tensor ``[3, H, W]`` in [0, 1] (torchvision's ``ToTensor``)."""
    import numpy as np
    import torch

    array = np.array(to_rgb(img), dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel, for ``[3, H, W]`` or ``[N, 3, H, W]`` (returns a new tensor)."""
    import torch

    shape = (3, 1, 1)
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return images.sub(m).div_(s)


def _resize_pil(img: Image.Image, height: int, width: int) -> Image.Image:
    from PIL import Image

    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.BICUBIC)


def _image_batches(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """The input as float32 ``[n, 3, H, W]`` batches in [0, 1] (one per image size given), and whether a single
    ``[3, H, W]`` image was given. Does not modify the input."""
    import torch

    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [_to_float(images).unsqueeze(0)], True
        if images.dim() == 4:
            return [_to_float(images)], False
        raise ConfigError(
            f"expected an image tensor [3, H, W] or a batch [N, 3, H, W], got shape {tuple(images.shape)}"
        )
    if isinstance(images, Sequence) and all(isinstance(image, torch.Tensor) for image in images):
        for image in images:
            if image.dim() != 3:
                raise ConfigError(
                    f"expected a sequence of [3, H, W] image tensors, got one of shape {tuple(image.shape)}"
                )
        return [_to_float(image).unsqueeze(0) for image in images], False
    raise ConfigError(f"expected a tensor or a sequence of [3, H, W] tensors, got {type(images).__name__}")


def _to_float(images: torch.Tensor) -> torch.Tensor:
    import torch

    if images.shape[-3] != 3:
        raise ConfigError(
            f"expected channels-first RGB images [3, H, W] or [N, 3, H, W], got shape {tuple(images.shape)} "
            "(for [H, W, 3] arrays use .permute(2, 0, 1); repeat grey images to 3 channels)"
        )
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255)
    if images.dtype.is_floating_point:
        return images.to(torch.float32)
    raise ConfigError(f"expected uint8 [0, 255] or float [0, 1] image tensors, got dtype {images.dtype}")


def _resize_tensor(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of float ``[n, 3, H, W]`` images in PIL's way, without its rounding.

    PIL resizes in two passes, horizontal then vertical, each into an 8-bit image; so does this, clamping each
    pass to [0, 1] (which keeps bicubic overshoot at sharp edges from reaching the second pass, as PIL's uint8
    intermediate image does) but not rounding. Without the clamp between the passes, edge pixels differ from PIL
    by up to 11/255; with it, by PIL's rounding alone (at most 1.125/255, see the tests).
    """
    import torch.nn.functional as F

    if images.shape[-1] != width:
        images = F.interpolate(
            images, size=(images.shape[-2], width), mode="bicubic", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    if images.shape[-2] != height:
        images = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return images.clamp(0.0, 1.0)


def _empty_output(images: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    import torch

    device = images.device if isinstance(images, torch.Tensor) else None
    return torch.empty(0, 3, size, size, device=device)


# --------------------------------------------------------------------------------------------------------------------
# evaluation transform


@dataclass(frozen=True)
class _EvalParams:
    """Parameters of CLIP's test transform (resize shorter side, centre crop, normalise), shared by both versions."""

    size: int = DEFAULT_SIZE
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check_size(self.size)
        _freeze_floats(self, "mean", "std")
        _check_stats(self.mean, self.std)

    def _describe(self, kind: str) -> str:
        return (
            f"clip-eval/{kind}/v1(size={self.size},resize=shorter,crop=center,"
            f"mean={_fmt(self.mean)},std={_fmt(self.std)})"
        )


@dataclass(frozen=True)
class EvalTransform(_EvalParams):
    """CLIP's test transform on PIL images: resize shorter side (PIL bicubic), centre crop, tensor, normalise.

    ``__call__(img) -> float32 [3, size, size]``. Non-RGB images go through :func:`to_rgb` first.
    """

    def describe(self) -> str:
        """A stable string naming the transform and its parameters (usable as a cache key)."""
        return self._describe("pil-bicubic")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        height, width = resized_shape(img.height, img.width, self.size)
        img = _resize_pil(img, height, width)
        box = center_crop_box(height, width, self.size)
        img = img.crop((box.left, box.top, box.left + box.width, box.top + box.height))
        return normalize(pil_to_tensor(img), self.mean, self.std)


@dataclass(frozen=True)
class TensorEvalTransform(_EvalParams):
    """CLIP's test transform on tensors: resize shorter side (torch bicubic, antialiased), centre crop, normalise.

    Input: uint8 [0, 255] or float [0, 1], one image ``[3, H, W]``, a batch ``[N, 3, H, W]``, or a sequence of
    ``[3, H, W]`` images of any sizes. Output: float32 ``[3, size, size]`` for one image, else ``[N, 3, size, size]``,
    on the input's device.
    """

    def describe(self) -> str:
        """A stable string naming the transform and its parameters (usable as a cache key)."""
        return self._describe("torch-bicubic-aa")

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        batches, single = _image_batches(images)
        out = []
        for batch in batches:
            height, width = resized_shape(batch.shape[-2], batch.shape[-1], self.size)
            batch = _resize_tensor(batch, height, width)
            box = center_crop_box(height, width, self.size)
            out.append(batch[..., box.top : box.top + box.height, box.left : box.left + box.width])
        if not out or out[0].shape[0] == 0:
            return _empty_output(images, self.size)
        result = normalize(torch.cat(out), self.mean, self.std)
        return result[0] if single else result


# --------------------------------------------------------------------------------------------------------------------
# training transform


@dataclass(frozen=True)
class _TrainParams:
    size: int = DEFAULT_SIZE
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check_size(self.size)
        _freeze_floats(self, "mean", "std", "scale", "ratio")
        _check_stats(self.mean, self.std)
        if len(self.scale) != 2 or len(self.ratio) != 2:
            raise ConfigError(f"scale and ratio need 2 values each, got scale={self.scale!r}, ratio={self.ratio!r}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale!r}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {self.ratio!r}")
        if not 0 <= self.flip_p <= 1:
            raise ConfigError(f"flip_p must be in [0, 1], got {self.flip_p!r}")

    def _describe(self, kind: str) -> str:
        return (
            f"clip-train/{kind}/v1(size={self.size},crop=random-resized,scale={_fmt(self.scale)},"
            f"ratio={_fmt(self.ratio)},flip_p={float(self.flip_p)!r},mean={_fmt(self.mean)},std={_fmt(self.std)})"
        )

    def sample_params(self, height: int, width: int, generator: torch.Generator) -> tuple[CropBox, bool]:
        """The crop box and whether to flip, drawn in torchvision's order (RandomResizedCrop, then the flip)."""
        import torch

        box = sample_resized_crop(height, width, generator, self.scale, self.ratio)
        flip = bool(torch.rand(1, generator=generator).item() < self.flip_p)
        return box, flip


@dataclass(frozen=True)
class TrainTransform(_TrainParams):
    """CoOp's training transform on PIL images: random resized crop (PIL bicubic), random flip, tensor, normalise.

    ``__call__(img, generator) -> float32 [3, size, size]``; ``generator`` is a ``torch.Generator`` or an int seed.
    """

    def describe(self) -> str:
        """A stable string naming the transform and its parameters (usable as a cache key)."""
        return self._describe("pil-bicubic")

    def __call__(self, img: Image.Image, generator: torch.Generator | int) -> torch.Tensor:
        from PIL import Image

        img = to_rgb(img)
        box, flip = self.sample_params(img.height, img.width, _as_generator(generator))
        img = img.crop((box.left, box.top, box.left + box.width, box.top + box.height))
        img = _resize_pil(img, self.size, self.size)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(pil_to_tensor(img), self.mean, self.std)


@dataclass(frozen=True)
class TensorTrainTransform(_TrainParams):
    """CoOp's training transform on tensors (torch bicubic, antialiased); input as for :class:`TensorEvalTransform`.

    Each image of a batch gets its own crop and flip, drawn from ``generator`` in order, so a batch gives the same
    crop boxes and flips as the PIL transform called image by image with the same generator.
    """

    def describe(self) -> str:
        """A stable string naming the transform and its parameters (usable as a cache key)."""
        return self._describe("torch-bicubic-aa")

    def __call__(
        self, images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator | int
    ) -> torch.Tensor:
        import torch

        batches, single = _image_batches(images)
        gen = _as_generator(generator)
        out = []
        for batch in batches:
            for image in batch.split(1):
                box, flip = self.sample_params(image.shape[-2], image.shape[-1], gen)
                crop = image[..., box.top : box.top + box.height, box.left : box.left + box.width]
                crop = _resize_tensor(crop, self.size, self.size)
                out.append(crop.flip(-1) if flip else crop)
        if not out:
            return _empty_output(images, self.size)
        result = normalize(torch.cat(out), self.mean, self.std)
        return result[0] if single else result


# --------------------------------------------------------------------------------------------------------------------
# AugMix views (test-time prompt tuning)


def _level(generator: torch.Generator, severity: int) -> float:
    """An operation's strength, uniform in [0.1, severity) (AugMix's ``sample_level``)."""
    import torch

    return 0.1 + (severity - 0.1) * torch.rand(1, generator=generator).item()


def _sign(generator: torch.Generator) -> float:
    import torch

    return -1.0 if torch.rand(1, generator=generator).item() < 0.5 else 1.0


def _autocontrast(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.equalize(img)


def _posterize(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.posterize(img, 4 - int(_level(generator, severity) * 4 / 10))


def _rotate(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    from PIL import Image

    degrees = int(_level(generator, severity) * 30 / 10) * _sign(generator)
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR)


def _solarize(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.solarize(img, 256 - int(_level(generator, severity) * 256 / 10))


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    from PIL import Image

    return img.transform(img.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)


def _shear_x(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    shear = _level(generator, severity) * 0.3 / 10 * _sign(generator)
    return _affine(img, (1, shear, 0, 0, 1, 0))


def _shear_y(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    shear = _level(generator, severity) * 0.3 / 10 * _sign(generator)
    return _affine(img, (1, 0, 0, shear, 1, 0))


def _translate_x(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    shift = int(_level(generator, severity) * (img.width / 3) / 10) * _sign(generator)
    return _affine(img, (1, 0, shift, 0, 1, 0))


def _translate_y(img: Image.Image, generator: torch.Generator, severity: int) -> Image.Image:
    shift = int(_level(generator, severity) * (img.height / 3) / 10) * _sign(generator)
    return _affine(img, (1, 0, 0, 0, 1, shift))


AUGMIX_OPERATIONS = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x,
                     _translate_y)
"""AugMix's operations that do not overlap ImageNet-C's corruptions (Hendrycks et al., ICLR 2020; the list TPT's
official code draws from): strengths scale with the severity as AugMix's reference defines them (posterize to
``4 - level * 4 / 10`` bits, rotation up to ``3 * level`` degrees, solarize above ``256 - 25.6 * level``, shear up to
``0.03 * level``, translation up to ``level / 30`` of the side)."""


@dataclass(frozen=True)
class AugMixTransform(_TrainParams):
    """TPT's augmented view of an image (PIL): :class:`TrainTransform`'s random resized crop and flip, then, with
    ``mix``, AugMix: ``chains`` chains of 1..``max_depth`` operations drawn uniformly from
    :data:`AUGMIX_OPERATIONS` applied to the crop, their normalised images mixed with Dirichlet(1, ..., 1) weights,
    and the mixture blended with the normalised crop by ``m ~ Beta(1, 1)``: ``m * crop + (1 - m) * mixture``.

    ``__call__(img, generator) -> float32 [3, size, size]``: every random number comes from ``generator``.
    Without ``mix`` the view is :class:`TrainTransform`'s (the same crop and flip for the same generator).
    """

    mix: bool = True
    chains: int = 3
    max_depth: int = 3
    severity: int = 1

    def describe(self) -> str:
        """A stable string naming the transform and its parameters (usable as a cache key)."""
        base = self._describe("pil-bicubic")
        if not self.mix:
            return base
        return f"{base}+augmix/v1(chains={self.chains},max_depth={self.max_depth},severity={self.severity})"

    def __call__(self, img: Image.Image, generator: torch.Generator | int) -> torch.Tensor:
        import torch
        from PIL import Image

        gen = _as_generator(generator)
        img = to_rgb(img)
        box, flip = self.sample_params(img.height, img.width, gen)
        img = img.crop((box.left, box.top, box.left + box.width, box.top + box.height))
        img = _resize_pil(img, self.size, self.size)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = normalize(pil_to_tensor(img), self.mean, self.std)
        if not self.mix:
            return crop
        # Dirichlet(1, ..., 1) as normalised Exponential(1) draws; Beta(1, 1) is uniform
        exponential = -torch.log1p(-torch.rand(self.chains, generator=gen, dtype=torch.float64))
        weights = (exponential / exponential.sum().clamp_min(1e-300)).tolist()
        blend = torch.rand(1, generator=gen, dtype=torch.float64).item()
        mixture = torch.zeros_like(crop)
        for weight in weights:
            chain = img
            depth = int(torch.randint(1, self.max_depth + 1, (1,), generator=gen).item())
            for _ in range(depth):
                operation = AUGMIX_OPERATIONS[int(torch.randint(len(AUGMIX_OPERATIONS), (1,), generator=gen).item())]
                chain = operation(chain, gen, self.severity)
            mixture += weight * normalize(pil_to_tensor(chain), self.mean, self.std)
        return blend * crop + (1.0 - blend) * mixture
