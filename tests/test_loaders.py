"""load_clip on files: round trips through every format, activation choice, precision, and every documented error.

A loaded model promises its weights bit for bit (compared exactly); its outputs are the same float32 maths on weights
that may lie elsewhere in memory (safetensors and assign=True loading keep the file's offsets), which can send a
vectorised kernel down another path, so outputs are compared with support.assert_fp32_close."""

from __future__ import annotations

import json

import pytest
import torch
from clip_formats import save_open_clip, save_openai_state_dict, save_torchscript, token_ids
from support import assert_fp32_close, assert_same_state

from vlprompt.backbone.loaders import load_clip, read_checkpoint_file
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import CheckpointError, ConfigError, VlpromptError

KINDS = ("vit", "resnet")


def inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_resolution
    images = torch.randn(3, 3, size, size, generator=generator)
    ids = token_ids([320, 1125, 539, 320, 1929, 269], [3306], [])
    return images, ids


def features(model, images, ids):
    with torch.inference_mode():
        return model.encode_image(images).float(), model.encode_text(ids).float()


@pytest.fixture(scope="module", params=KINDS)
def tiny(request):
    return build_tiny_clip(request.param, seed=3).requires_grad_(False)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model saved in each file format."""
    folder = tmp_path_factory.mktemp("formats")
    return {
        "state_dict": save_openai_state_dict(tiny, folder / "model.pt"),
        "torchscript": save_torchscript(tiny, folder / "archive.pt"),
        "open_clip": save_open_clip(tiny, folder / "open_clip.pt"),
        "open_clip_plain": save_open_clip(tiny, folder / "open_clip_plain.bin", training_checkpoint=False),
    }


# ----------------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "open_clip", "open_clip_plain"])
def test_round_trip_identical_outputs(tiny, saved, fmt):
    loaded = load_clip(saved[fmt], model_name="tiny-quickgelu" if fmt.startswith("open_clip") else None)
    assert loaded.config == tiny.config.__class__(**{**tiny.config.to_dict(), "name": loaded.config.name})
    assert_same_state(loaded, tiny)
    images, ids = inputs(tiny)
    for ours, theirs in zip(features(loaded, images, ids), features(tiny, images, ids)):
        assert_fp32_close(ours, theirs)


def test_formats_are_recorded(saved):
    assert load_clip(saved["state_dict"]).source["format"] == "torch"
    archive = load_clip(saved["torchscript"]).source
    assert (archive["kind"], archive["format"], archive["quick_gelu"]) == ("openai", "torchscript", True)
    open_clip = load_clip(saved["open_clip"], model_name="tiny").source
    assert (open_clip["kind"], open_clip["model_name"], open_clip["quick_gelu"]) == ("open_clip", "tiny", False)
    assert json.loads(json.dumps(archive)) == archive  # JSON-able, for run records


def test_torchscript_archive_has_openai_entries(tiny, saved):
    state = torch.jit.load(str(saved["torchscript"])).state_dict()
    extras = set(state) - set(tiny.state_dict())
    assert extras == {"input_resolution", "context_length", "vocab_size"}
    assert int(state["input_resolution"]) == tiny.config.image_resolution
    assert read_checkpoint_file(saved["torchscript"])[1] == "torchscript"


def test_loaded_model_is_frozen_eval_and_named(saved):
    model = load_clip(saved["state_dict"])
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.name == "model"  # no official architecture: the file's name
    assert load_clip(saved["open_clip"], model_name="tiny-quickgelu").config.name == "tiny-quickgelu"


def test_safetensors_state_dict(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    loaded = load_clip(path)
    assert loaded.source["format"] == "safetensors"
    assert_same_state(loaded, tiny)
    images, ids = inputs(tiny)
    # The weights are bit-identical but lie at the file's 8-byte offsets: on an AMD EPYC (AVX-512) the ResNet's image
    # features then differ from the original's by 6e-8 (1 ulp of sums rounded in another order): a tolerance.
    for ours, theirs in zip(features(loaded, images, ids), features(tiny, images, ids)):
        assert_fp32_close(ours, theirs)


def test_wrapped_and_prefixed_state_dict_in_openai_layout(tiny, tmp_path):
    # a DDP fine-tuning checkpoint of an OpenAI model: explicit activation needed (open_clip traces)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.state_dict().items()}, "epoch": 1}, path)
    with pytest.raises(ConfigError, match="model_name="):
        load_clip(path)
    loaded = load_clip(path, quick_gelu=True)
    assert_same_state(loaded, tiny)
    images, ids = inputs(tiny)
    assert_fp32_close(features(loaded, images, ids)[1], features(tiny, images, ids)[1])


# ----------------------------------------------------------------------------------------------------------------------
# activation: QuickGELU vs GELU


@pytest.mark.parametrize("kind", KINDS)
def test_open_clip_gelu_vs_quickgelu(kind, tmp_path):
    quick = build_tiny_clip(kind, seed=5).requires_grad_(False)
    gelu = build_tiny_clip(kind, seed=5, quick_gelu=False).requires_grad_(False)  # same weights, nn.GELU
    path = save_open_clip(quick, tmp_path / "epoch_3.pt")
    images, ids = inputs(quick)

    as_gelu = load_clip(path, model_name="tiny")  # open_clip name without -quickgelu: nn.GELU
    as_quick = load_clip(path, model_name="tiny-quickgelu")
    assert (as_gelu.config.quick_gelu, as_quick.config.quick_gelu) == (False, True)
    assert_same_state(as_gelu, gelu)
    assert_same_state(as_quick, quick)
    for a, b in zip(features(as_gelu, images, ids), features(gelu, images, ids)):
        assert_fp32_close(a, b)
    for a, b in zip(features(as_quick, images, ids), features(quick, images, ids)):
        assert_fp32_close(a, b)
    # the activation really is applied: text features differ (and ViT image features; ResNet images use ReLU)
    text_gap = (features(as_gelu, images, ids)[1] - features(as_quick, images, ids)[1]).abs().max()
    assert text_gap > 1e-3
    image_gap = (features(as_gelu, images, ids)[0] - features(as_quick, images, ids)[0]).abs().max()
    if kind == "vit":
        assert image_gap > 1e-3
    else:  # the same maths, but two loaded models' weights: up to rounding order
        assert_fp32_close(features(as_gelu, images, ids)[0], features(as_quick, images, ids)[0])
    # explicit quick_gelu overrides the name
    assert load_clip(path, model_name="tiny", quick_gelu=True).config.quick_gelu is True


def test_model_name_must_match_architecture(saved):
    with pytest.raises(CheckpointError, match=r"'ViT-B-16' is a ViT \(12 layers, width 768, patch 16"):
        load_clip(saved["open_clip"], model_name="ViT-B-16")


def test_official_architecture_gets_official_name(tmp_path):
    """A ViT-B/32-shaped state dict is named after OpenAI's release (unless a GELU open_clip name says otherwise).

    The weights are stride-0 views of one zero, so the file is a few kB and loading costs no real memory.
    """
    from vlprompt.backbone.download import OPENAI_CHECKPOINTS
    from vlprompt.backbone.model import CLIP, CLIPConfig

    with torch.device("meta"):
        shapes = CLIP(CLIPConfig(**OPENAI_CHECKPOINTS["ViT-B/32"].architecture)).state_dict()
    zero = torch.zeros((), dtype=torch.float16)
    path = tmp_path / "b32.pt"
    torch.save({key: zero.expand(value.shape) for key, value in shapes.items()}, path)
    assert path.stat().st_size < 200_000
    model = load_clip(path, precision="fp16")
    assert model.config.name == "ViT-B/32" and model.source["kind"] == "openai"
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    assert load_clip(path, precision="fp16", model_name="ViT-B-32").config.name == "ViT-B-32"  # GELU: not OpenAI's


# ----------------------------------------------------------------------------------------------------------------------
# precision and device


@pytest.mark.parametrize(("precision", "dtype", "tolerance"), [("bf16", torch.bfloat16, 0.05), ("fp16", torch.float16,
                                                                                                  0.01)])
def test_reduced_precision_agrees_with_fp32(tiny, saved, precision, dtype, tolerance):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per op), fp16 11 bits (2^-12); over the tiny
    models' ~10 chained ops on features of magnitude ~1-3 that bounds the error well under 5% / 1% of the scale."""
    model = load_clip(saved["torchscript"], precision=precision)
    assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    assert model.source["precision"] == precision
    images, ids = inputs(tiny)
    for low, full in zip(features(model, images, ids), features(tiny, images, ids)):
        scale = full.abs().max()
        assert (low - full).abs().max() <= tolerance * scale
        assert (low - full).abs().max() > 0  # really computed in reduced precision


@pytest.mark.parametrize("precision", ["fp64", "float32", "amp", None, 16])
def test_bad_precision(saved, precision):
    with pytest.raises(ConfigError, match="unknown precision"):
        load_clip(saved["state_dict"], precision=precision)


def test_bad_options(saved):
    with pytest.raises(ConfigError, match="quick_gelu must be"):
        load_clip(saved["state_dict"], quick_gelu="yes")
    with pytest.raises(ConfigError, match="model_name must be"):
        load_clip(saved["state_dict"], model_name="")
    with pytest.raises(ConfigError, match="must be a name or a path"):
        load_clip(3)


def test_bad_device(saved):
    with pytest.raises(ConfigError, match="invalid device"):
        load_clip(saved["state_dict"], device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_clip(saved["state_dict"], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda(tiny, saved, precision):
    model = load_clip(saved["torchscript"], device="cuda", precision=precision)
    assert model.device.type == "cuda"
    images, ids = inputs(tiny)
    with torch.inference_mode():
        image, text = model.encode_image(images.cuda()).float().cpu(), model.encode_text(ids.cuda()).float().cpu()
    reference = features(tiny, images, ids)
    tolerance = {"fp32": 1e-4, "fp16": 0.01, "bf16": 0.05}[precision]
    assert (image - reference[0]).abs().max() <= tolerance * reference[0].abs().max()
    assert (text - reference[1]).abs().max() <= tolerance * reference[1].abs().max()


# ----------------------------------------------------------------------------------------------------------------------
# bad files


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "open_clip"])
def test_truncated_file(saved, tmp_path, fmt):
    data = saved[fmt].read_bytes()
    path = tmp_path / f"cut-{fmt}.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*cut-{fmt}\.pt \({len(data) // 2} bytes\).*truncated"):
        load_clip(path, quick_gelu=True)


def test_truncated_safetensors(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors .*truncated, corrupt"):
        load_clip(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"noise\.pt \(4096 bytes\)"):
        load_clip(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(CheckpointError, match=r"empty\.pt is empty \(0 bytes\)"):
        load_clip(path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="neither a known model name"):
        load_clip("/no/such/file.pt")
    with pytest.raises(CheckpointError, match="neither a known model name"):
        load_clip("no-such-dir/weights.safetensors")  # looks like a path, not a hub id


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds list, not a state dict"):
        load_clip(path)
    path = tmp_path / "mixed.pt"
    torch.save({"visual.proj": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_clip(path)


def test_missing_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["transformer.resblocks.1.attn.out_proj.weight"]
    del state["ln_final.bias"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing\.pt does not fit .* 2 missing weight\(s\): "
                                              r"ln_final\.bias, transformer\.resblocks\.1\.attn\.out_proj\.weight"):
        load_clip(path)


def test_missing_essential_key(tiny, tmp_path):
    state = {k: v for k, v in tiny.state_dict().items() if k != "text_projection"}
    path = tmp_path / "no-proj.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"no-proj\.pt: the weights lack 'text_projection'"):
        load_clip(path)


def test_wrong_shape(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["transformer.resblocks.0.mlp.c_fc.bias"] = torch.zeros(7)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.0\.mlp\.c_fc\.bias has shape \(7,\), "
                                              r"expected \(512,\)"):
        load_clip(path)


def test_unexpected_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["visual.attn_pool.query"] = torch.zeros(4, 8)  # an architecture we do not implement
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected weight\(s\): visual\.attn_pool\.query"):
        load_clip(path)


def test_non_finite_weights(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["ln_final.weight"][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"hold NaN or infinite values: ln_final\.weight"):
        load_clip(path)


def test_errors_are_user_errors():
    assert issubclass(CheckpointError, VlpromptError) and issubclass(ConfigError, VlpromptError)
