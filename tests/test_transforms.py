"""Image loading and CLIP's eval / train transforms (no torchvision)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from support import FIXTURES, noise_image

from vlprompt.backbone.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CropBox,
    EvalTransform,
    TensorEvalTransform,
    TensorTrainTransform,
    TrainTransform,
    center_crop_box,
    load_image,
    pil_to_tensor,
    resized_shape,
    sample_resized_crop,
    to_rgb,
    view_generator,
)
from vlprompt.errors import ConfigError, DatasetError

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)

# PIL resizes in two passes into uint8 images; the tensor path does the same passes in float32 without rounding.
# Worst case per pixel, in [0, 1] units: 0.5/255 (first pass rounding) x 1.25 (largest sum of |weights| of the
# bicubic a=-0.5 filter, reached when upsampling by 2: -1/16, 9/16, 9/16, -1/16) + 0.5/255 (second pass rounding)
# = 1.125/255. Measured on the fixture photographs: max 1.039/255 at 224 px, 1.120/255 at 336 px (upsampling from
# 300 px); mean 0.28/255. The small extra margin covers float32 arithmetic and PIL's 22-bit fixed-point weights.
MAX_DIFF = 1.13 / 255
MEAN_DIFF = 0.35 / 255


def _fixture_images(count: int) -> list[Path]:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    paths = sorted(FIXTURES.rglob("*.jpg"))
    assert len(paths) >= count
    return paths[:: max(1, len(paths) // count)][:count]


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def _assert_normalised_range(x: torch.Tensor) -> None:
    low = ((0 - MEAN) / STD).view(3)
    high = ((1 - MEAN) / STD).view(3)
    per_channel = x.transpose(0, -3).reshape(3, -1)
    assert (per_channel.min(dim=1).values >= low - 1e-6).all()
    assert (per_channel.max(dim=1).values <= high + 1e-6).all()


def _as_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------------------------------
# geometry


def test_resized_shape_and_center_crop_follow_torchvision() -> None:
    assert resized_shape(500, 333, 224) == (336, 224)  # longer side int(224 * 500 / 333) = int(336.34)
    assert resized_shape(333, 500, 224) == (224, 336)
    assert resized_shape(300, 300, 336) == (336, 336)
    assert resized_shape(640, 427, 224) == (335, 224)  # int(335.74): truncated, not rounded
    assert center_crop_box(336, 224, 224) == CropBox(56, 0, 224, 224)
    # round((h - size) / 2) with Python's round-half-to-even, as torchvision: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert center_crop_box(225, 224, 224).top == 0
    assert center_crop_box(227, 224, 224).top == 2
    assert center_crop_box(224, 229, 224).left == 2
    with pytest.raises(ConfigError, match="cannot centre-crop"):
        center_crop_box(100, 300, 224)


@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_eval_crop_offset_is_exact_when_no_resize_needed(kind: str) -> None:
    img = noise_image(224, 301)  # shorter side already 224: no resampling, output = crop at left round(77 / 2) = 38
    expected = pil_to_tensor(img)[:, :, 38 : 38 + 224]
    out = EvalTransform()(img) if kind == "pil" else TensorEvalTransform()(_as_uint8_tensor(img))
    assert torch.allclose(_unnormalize(out), expected, atol=1e-6)
    assert not torch.allclose(_unnormalize(out), pil_to_tensor(img)[:, :, 39 : 39 + 224], atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# evaluation transform


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (224, 224), (17, 9), (1, 1)])
def test_eval_shapes_dtypes_and_range(size: int, shape: tuple[int, int]) -> None:
    img = noise_image(*shape)
    pil_out = EvalTransform(size)(img)
    tensor_out = TensorEvalTransform(size)(_as_uint8_tensor(img))
    for out in (pil_out, tensor_out):
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        _assert_normalised_range(out)
    # random noise is the worst case for bicubic overshoot, so only the loose bound of the filter gain applies here
    assert (_unnormalize(pil_out) - _unnormalize(tensor_out)).abs().max().item() <= MAX_DIFF


def test_eval_pil_and_tensor_agree_on_real_photos() -> None:
    paths = _fixture_images(12)
    for size in (224, 336):
        pil_t, tensor_t = EvalTransform(size), TensorEvalTransform(size)
        diffs = []
        for path in paths:
            img = load_image(path)
            diff = (_unnormalize(pil_t(img)) - _unnormalize(tensor_t(_as_uint8_tensor(img)))).abs()
            diffs.append(diff)
            assert diff.max().item() <= MAX_DIFF, path
            assert diff.mean().item() <= MEAN_DIFF, path
        assert max(d.max().item() for d in diffs) > 0.5 / 255  # the rounding difference is real, not zero


def test_tensor_eval_accepts_uint8_float_batches_and_lists() -> None:
    images = [noise_image(300, 400, s) for s in range(3)]
    transform = TensorEvalTransform()
    as_uint8 = torch.stack([_as_uint8_tensor(i) for i in images])
    batch = transform(as_uint8)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    assert torch.allclose(transform(as_uint8.float() / 255), batch, atol=1e-6)
    assert torch.allclose(transform(as_uint8[1]), batch[1], atol=1e-6)
    mixed = [_as_uint8_tensor(noise_image(300, 400, 0)), _as_uint8_tensor(noise_image(500, 260, 5))]
    out = transform(mixed)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out[0], batch[0], atol=1e-6)
    assert torch.allclose(out[1], transform(mixed[1]), atol=1e-6)
    original = as_uint8.float() / 255
    kept = original.clone()
    transform(original)
    assert torch.equal(original, kept)  # the input is not modified
    assert transform(torch.empty(0, 3, 50, 50)).shape == (0, 3, 224, 224)


def test_eval_converts_non_rgb_pil_images() -> None:
    grey = Image.new("L", (300, 240), 128)
    out = EvalTransform()(grey)
    assert torch.allclose(_unnormalize(out), torch.full((3, 224, 224), 128 / 255), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# training transform


def test_train_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    img = noise_image(300, 400)
    transform = TrainTransform()
    first = transform(img, torch.Generator().manual_seed(3))
    assert first.shape == (3, 224, 224) and first.dtype == torch.float32
    _assert_normalised_range(first)
    assert torch.equal(first, transform(img, torch.Generator().manual_seed(3)))
    assert torch.equal(first, transform(img, 3))  # an int is a seed
    assert not torch.allclose(first, transform(img, 4))
    assert torch.equal(transform(img, view_generator(1, 7, 0)), transform(img, view_generator(1, 7, 0)))
    assert not torch.allclose(transform(img, view_generator(1, 7, 0)), transform(img, view_generator(1, 7, 1)))


def test_train_never_touches_the_global_rng() -> None:
    images = torch.rand(2, 3, 100, 120)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    TrainTransform()(noise_image(100, 120), 5)
    TensorTrainTransform()(images, 5)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ConfigError, match="generator"):
        TrainTransform()(noise_image(10, 10), None)  # type: ignore[arg-type]


def test_view_generator_depends_only_on_seed_item_view() -> None:
    def draw(seed: int, item: int, view: int) -> list[float]:
        return torch.rand(4, generator=view_generator(seed, item, view)).tolist()

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({tuple(draw(*key)) for key in [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3), (1, 23, 0)]}) == 5
    by_path = torch.rand(4, generator=view_generator(1, "banded/banded_0024.jpg", 0)).tolist()
    assert by_path == torch.rand(4, generator=view_generator(1, "banded/banded_0024.jpg", 0)).tolist()
    assert by_path != torch.rand(4, generator=view_generator(1, "banded/banded_0085.jpg", 0)).tolist()


def test_train_pil_and_tensor_draw_the_same_boxes() -> None:
    images = [noise_image(260, 390, 1), noise_image(410, 300, 2), noise_image(300, 300, 3)]
    pil_gen = torch.Generator().manual_seed(11)
    pil_out = torch.stack([TrainTransform()(img, pil_gen) for img in images])
    tensor_out = TensorTrainTransform()([_as_uint8_tensor(img) for img in images], torch.Generator().manual_seed(11))
    assert tensor_out.shape == (3, 3, 224, 224)
    assert (_unnormalize(pil_out) - _unnormalize(tensor_out)).abs().max().item() <= MAX_DIFF
    same_size = torch.stack([_as_uint8_tensor(noise_image(260, 390, s)) for s in range(3)])
    batched = TensorTrainTransform()(same_size, 8)
    gen = torch.Generator().manual_seed(8)
    one_by_one = torch.stack([TensorTrainTransform()(image, gen) for image in same_size])
    assert torch.equal(batched, one_by_one)  # the batch is cut into the same per-image views: the same computation


def test_train_flip_is_a_mirror() -> None:
    img = noise_image(224, 224)
    transform = TrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)  # whole image, no resampling
    out = _unnormalize(transform(img, 0))
    assert torch.allclose(out, pil_to_tensor(img).flip(-1), atol=1e-6)
    kept = _unnormalize(TrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)(img, 0))
    assert torch.allclose(kept, pil_to_tensor(img), atol=1e-6)
    tensor_out = _unnormalize(TensorTrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)(
        _as_uint8_tensor(img), 0))  # fmt: skip
    assert torch.allclose(tensor_out, out, atol=1e-6)


@pytest.mark.parametrize(
    "shape", [(224, 224), (480, 640), (640, 300), (1000, 50), (40, 900), (1, 1), (2, 3), (7, 5)]
)
def test_crop_boxes_inside_image_and_within_bounds(shape: tuple[int, int]) -> None:
    height, width = shape
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    gen = torch.Generator().manual_seed(sum(shape))
    area = height * width
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback = CropBox((height - round(width / ratio[0])) // 2, 0, round(width / ratio[0]), width)
    elif in_ratio > ratio[1]:
        fallback = CropBox(0, (width - round(height * ratio[1])) // 2, height, round(height * ratio[1]))
    else:
        fallback = CropBox(0, 0, height, width)
    sampled = 0
    for _ in range(500):
        box = sample_resized_crop(height, width, gen, scale, ratio)
        assert 0 <= box.top and box.top + box.height <= height
        assert 0 <= box.left and box.left + box.width <= width
        assert box.height >= 1 and box.width >= 1
        if box == fallback:
            continue
        sampled += 1
        # sides are round(sqrt(A * r)) and round(sqrt(A / r)) with A / area in scale and r in ratio: allow +-0.5 px
        w, h = box.width, box.height
        assert (w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-9
        assert (w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-9
        assert (w + 0.5) / (h - 0.5) >= ratio[0]
        assert (w - 0.5) / (h + 0.5) <= ratio[1]
    if shape in [(224, 224), (480, 640), (640, 300)]:
        assert sampled >= 495  # the fallback is rare for ordinary images
    if shape in [(1000, 50), (40, 900)]:
        assert sampled == 0  # no box of area >= 8% fits these within the ratio range: always the clamped centre


def test_crop_sampling_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    fractions, ratios = [], []
    for _ in range(2000):
        box = sample_resized_crop(400, 400, gen)
        fractions.append(box.height * box.width / 400**2)
        ratios.append(box.width / box.height)
    assert min(fractions) < 0.1 and max(fractions) > 0.95
    assert 0.45 < float(np.mean(fractions)) < 0.6  # uniform area on [0.08, 1] (mean 0.54), minus rejected large boxes
    assert abs(float(np.mean(np.log(ratios)))) < 0.02  # log-uniform ratio, symmetric around 1
    flips = [TrainTransform().sample_params(400, 400, gen)[1] for _ in range(2000)]
    assert 0.46 < float(np.mean(flips)) < 0.54


# --------------------------------------------------------------------------------------------------------------------
# parameters, describe, validation


def test_describe_is_stable_and_distinct() -> None:
    assert EvalTransform().describe() == (
        "clip-eval/pil-bicubic/v1(size=224,resize=shorter,crop=center,"
        "mean=(0.48145466,0.4578275,0.40821073),std=(0.26862954,0.26130258,0.27577711))"
    )
    assert TrainTransform().describe() == (
        "clip-train/pil-bicubic/v1(size=224,crop=random-resized,scale=(0.08,1.0),"
        "ratio=(0.75,1.3333333333333333),flip_p=0.5,"
        "mean=(0.48145466,0.4578275,0.40821073),std=(0.26862954,0.26130258,0.27577711))"
    )
    names = {
        t.describe()
        for t in [EvalTransform(), EvalTransform(336), TensorEvalTransform(), TrainTransform(), TensorTrainTransform(),
                  TrainTransform(flip_p=0.0), TrainTransform(scale=(0.5, 1.0))]
    }  # fmt: skip
    assert len(names) == 7
    assert EvalTransform(336) == EvalTransform(336) and hash(EvalTransform()) == hash(EvalTransform())
    from_json = TrainTransform(
        mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], scale=[0.5, 1], ratio=[1, 1]  # type: ignore[arg-type]
    )
    assert from_json.scale == (0.5, 1.0) and hash(from_json) == hash(TrainTransform(
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=(0.5, 1.0), ratio=(1.0, 1.0)))  # fmt: skip
    assert TrainTransform() != TensorTrainTransform()


def test_invalid_parameters_and_inputs() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="size"):
            EvalTransform(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scale"):
        TrainTransform(scale=(0.9, 0.1))
    with pytest.raises(ConfigError, match="ratio"):
        TensorTrainTransform(ratio=(0.0, 1.0))
    with pytest.raises(ConfigError, match="flip_p"):
        TrainTransform(flip_p=1.5)
    with pytest.raises(ConfigError, match="std"):
        EvalTransform(std=(0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="mean"):
        EvalTransform(mean=(0.5, 0.5))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scale"):
        TrainTransform(scale="big")  # type: ignore[arg-type]
    transform = TensorEvalTransform()
    with pytest.raises(ConfigError, match=r"permute\(2, 0, 1\)"):
        transform(torch.zeros(50, 60, 3, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="dtype"):
        transform(torch.zeros(3, 50, 60, dtype=torch.int32))
    with pytest.raises(ConfigError, match="shape"):
        transform(torch.zeros(50, 60))
    with pytest.raises(ConfigError, match="tensor"):
        transform("image.jpg")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# loading and mode conversion


def _rgb_at(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel((x, y))  # type: ignore[return-value]


def test_mode_conversion_of_saved_files(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 3), 100).save(grey)
    assert _rgb_at(load_image(grey), 0, 0) == (100, 100, 100)

    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 2570, 32896, 65535]], dtype=np.uint16)).save(sixteen)
    img = load_image(sixteen)
    assert img.size == (4, 1)
    assert [_rgb_at(img, x, 0)[0] for x in range(4)] == [0, 10, 128, 255]  # v / 257

    as_int = tmp_path / "int32.tiff"
    Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32)).save(as_int)
    assert [_rgb_at(load_image(as_int), x, 0)[0] for x in range(4)] == [0, 255, 255, 0]

    as_float = tmp_path / "float.tiff"
    Image.fromarray(np.array([[0.0, 100.4, 254.6, 300.0]], dtype=np.float32)).save(as_float)
    assert [_rgb_at(load_image(as_float), x, 0)[0] for x in range(4)] == [0, 100, 255, 255]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png")
    img = load_image(tmp_path / "palette.png")
    assert (_rgb_at(img, 0, 0), _rgb_at(img, 1, 0)) == ((255, 0, 0), (0, 0, 255))
    palette.save(tmp_path / "palette_alpha.png", transparency=0)  # index 0 (red) is transparent
    img = load_image(tmp_path / "palette_alpha.png")
    assert (_rgb_at(img, 0, 0), _rgb_at(img, 1, 0)) == ((255, 255, 255), (0, 0, 255))
    palette.save(tmp_path / "palette.gif", transparency=0)
    assert _rgb_at(load_image(tmp_path / "palette.gif"), 0, 0) == (255, 255, 255)

    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.save(tmp_path / "cmyk.tiff")
    img = load_image(tmp_path / "cmyk.tiff")
    assert (_rgb_at(img, 0, 0), _rgb_at(img, 1, 0)) == ((255, 255, 255), (0, 255, 255))

    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert _rgb_at(img, 0, 0) == (255, 255, 255)  # fully transparent -> white background
    assert _rgb_at(img, 1, 0) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in _rgb_at(img, 2, 0))  # half black over white: 255 * 127 / 255

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert (_rgb_at(img, 0, 0), _rgb_at(img, 1, 0)) == ((255, 255, 255), (40, 40, 40))

    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    img = load_image(tmp_path / "bits.png")
    assert (_rgb_at(img, 0, 0), _rgb_at(img, 1, 0)) == ((0, 0, 0), (255, 255, 255))


def test_to_rgb_in_memory() -> None:
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    assert _rgb_at(to_rgb(Image.new("I;16B", (1, 1), 65535)), 0, 0) == (255, 255, 255)
    assert _rgb_at(to_rgb(Image.new("RGBa", (1, 1), (0, 0, 0, 0))), 0, 0) == (255, 255, 255)
    premultiplied = Image.new("La", (2, 1))
    premultiplied.putdata([(0, 0), (40, 255)])
    assert [_rgb_at(to_rgb(premultiplied), x, 0) for x in range(2)] == [(255, 255, 255), (40, 40, 40)]
    assert _rgb_at(to_rgb(Image.new("YCbCr", (1, 1), (255, 128, 128))), 0, 0) == (255, 255, 255)


@pytest.mark.parametrize(
    ("orientation", "size", "top_left_is_red"),
    [(1, (40, 20), True), (3, (40, 20), False), (6, (20, 40), True), (8, (20, 40), False)],
)
def test_exif_orientation_is_applied(
    tmp_path: Path, orientation: int, size: tuple[int, int], top_left_is_red: bool
) -> None:
    # stored: 40 x 20, left half red, right half blue
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented_{orientation}.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == size
    red, _, blue = _rgb_at(loaded, 2, 2)
    assert (red > 200 and blue < 60) if top_left_is_red else (blue > 200 and red < 60)
    # orientation 6 displays the stored image turned 90 degrees clockwise: the left (red) half goes to the top
    if orientation == 6:
        top, bottom = _rgb_at(loaded, 10, 5), _rgb_at(loaded, 10, 35)
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_unreadable_files_raise_dataset_error_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.jpg"
    noise_image(64, 80).save(good, quality=90)
    data = good.read_bytes()
    cases = {
        "half.jpg": data[: len(data) // 2],
        "no_end.jpg": data[:-2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
    }
    png = tmp_path / "good.png"
    noise_image(64, 80).save(png)
    cases["half.png"] = png.read_bytes()[: png.stat().st_size // 2]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError) as info:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
        if name.startswith(("half", "no_end")):
            assert "truncated" in str(info.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(DatasetError, match=str(tmp_path)):
        load_image(tmp_path)  # a folder
    # Some code may have told Pillow to accept truncated files; a truncated JPEG still fails here.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError, match="truncated"):
        load_image(tmp_path / "half.jpg")
    assert load_image(good).size == (80, 64)


def test_real_fixture_loads() -> None:
    path = _fixture_images(1)[0]
    img = load_image(path)
    assert img.mode == "RGB" and min(img.size) >= 300
    assert not math.isnan(float(EvalTransform()(img).mean()))


def test_import_is_light() -> None:
    code = "import sys, vlprompt.backbone.transforms; print('torch' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
