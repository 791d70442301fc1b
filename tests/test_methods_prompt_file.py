"""Prompt files: exact round trips, metadata, refusal of another backbone, corrupt files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support import assert_fp32_close, assert_same_state

from vlprompt import __version__
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import CheckpointError, ConfigError
from vlprompt.methods import METHODS
from vlprompt.methods.cocoop import CoCoOp
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.prompt_file import load_prompt, read_prompt_header, save_prompt

CLASSNAMES = ["cat", "golden retriever", "sea or lake"]


def _trained(method):
    with torch.no_grad():
        for param in method.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05)
    return method


@pytest.mark.parametrize("name", ["zeroshot", "ensemble", "linear_probe", "coop", "cocoop"])
def test_round_trip_gives_identical_logits(clip, features, tmp_path, name):
    spec = METHODS[name]
    method = _trained(spec.build(clip, CLASSNAMES, spec.config_cls()))
    path = save_prompt(method, tmp_path / "prompt.safetensors")
    rng = torch.random.get_rng_state()
    loaded = load_prompt(path, clip)
    assert torch.equal(torch.random.get_rng_state(), rng)  # rebuilding does not advance the caller's RNG
    assert type(loaded) is type(method) and loaded.config == method.config and loaded.classnames == CLASSNAMES
    # loading promises the learned state bit for bit; the logits are the same float32 maths on state that loading
    # may place elsewhere in memory (another kernel path): equal up to rounding order
    assert_same_state(loaded, method)
    assert_fp32_close(loaded(features), method(features))


def test_metadata_records_the_method_and_backbone(clip, tmp_path):
    method = _trained(CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=3, csc=True, class_token_position="middle")))
    path = save_prompt(method, tmp_path / "coop.safetensors")
    header = read_prompt_header(path)
    assert header.method == "coop"
    assert header.config == {"n_ctx": 3, "ctx_init": "", "csc": True, "class_token_position": "middle",
                             "fast_text": True}
    assert header.classnames == CLASSNAMES
    assert header.backbone == "tiny-vit" and header.backbone_fingerprint == clip.fingerprint()
    assert header.vlprompt_version == __version__
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["ctx"]
        assert torch.equal(handle.get_tensor("ctx"), method.ctx.detach())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_another_backbone_is_refused_naming_both(clip, tmp_path):
    path = save_prompt(CoCoOp(clip, CLASSNAMES), tmp_path / "cocoop.safetensors")
    other = build_tiny_clip("resnet", seed=3)
    with pytest.raises(CheckpointError) as error:
        load_prompt(path, other)
    message = str(error.value)
    assert "'tiny-vit'" in message and "'tiny-resnet'" in message
    assert clip.fingerprint()[:12] in message and other.fingerprint()[:12] in message
    # same architecture, different weights: refused too
    with pytest.raises(CheckpointError, match="learned on backbone"):
        load_prompt(path, build_tiny_clip("vit", seed=1))


def test_loading_onto_other_classnames(clip, features, tmp_path):
    method = _trained(CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2)))
    path = save_prompt(method, tmp_path / "coop.safetensors")
    moved = load_prompt(path, clip, classnames=["sea or lake", "cat"])
    assert moved.classnames == ["sea or lake", "cat"]
    assert (moved(features) - method(features)[:, [2, 0]]).abs().max().item() < 1e-5
    csc = save_prompt(CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2, csc=True)), tmp_path / "csc.safetensors")
    with pytest.raises(ConfigError, match="class-specific"):
        load_prompt(csc, clip, classnames=["dog"])


def test_corrupt_and_foreign_files(clip, tmp_path):
    path = save_prompt(CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2)), tmp_path / "coop.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match="corrupt"):
            load_prompt(bad, clip)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prompt(tmp_path / "missing.safetensors", clip)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a vlprompt prompt file"):
        read_prompt_header(foreign)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    damaged = tmp_path / "damaged.safetensors"
    save_file({"ctx": torch.zeros(5, clip.config.transformer_width)}, str(damaged), metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match"):
        load_prompt(damaged, clip)
    metadata["config"] = json.dumps({"n_ctx": 2, "colour": "red"})
    save_file({"ctx": torch.zeros(2, 4)}, str(damaged), metadata=metadata)
    with pytest.raises(CheckpointError, match="invalid coop config"):
        load_prompt(damaged, clip)
