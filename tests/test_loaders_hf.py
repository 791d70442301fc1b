"""Hugging Face checkpoints: our CLIP agrees with transformers' CLIPModel, the independent reference (tests only).

transformers is never imported by the library: the HF loader reads config.json and the weights itself.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from clip_formats import hf_config, save_hf, save_openai_state_dict, token_ids
from support import assert_fp32_close, assert_same_state

from vlprompt.backbone.convert import hf_to_openai, openai_to_hf
from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5  # fp32: same maths, different kernels (fused vs split q/k/v, SDPA vs eager attention)


def pixels(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


IDS = token_ids([320, 1125, 539, 320, 1929, 269], [3306], [], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])


@pytest.fixture(scope="module")
def prompts():
    """Real token ids from our CLIP tokenizer (start, BPE ids, end, zero padding)."""
    from vlprompt.backbone.tokenizer import tokenize

    return tokenize(["a photo of a dog.", "a centered satellite photo of annual crop land.", "DTD texture."])


def hf_features(hf, images=None, ids=None):
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
    with torch.inference_mode():
        if images is not None:
            out = hf.get_image_features(pixel_values=images)
        else:
            out = hf.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def ours(model, images=None, ids=None):
    with torch.inference_mode():
        return model.encode_image(images) if images is not None else model.encode_text(ids)


def test_library_does_not_import_transformers():
    import subprocess

    code = ("import sys, vlprompt; from vlprompt.backbone import loaders, convert, download; "
            "print('transformers' in sys.modules, 'huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_native_hf_checkpoint_matches_transformers(tmp_path, act, prompts):
    """A randomly initialised transformers CLIPModel (4 heads of 32: not OpenAI's 64-wide heads), saved by
    save_pretrained, loaded by us: same image and text features."""
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         hidden_act=act),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=64,
    )
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    model = load_clip(tmp_path)
    assert model.config.quick_gelu is (act == "quick_gelu")
    assert model.config.vision_heads == 4 and model.config.transformer_heads == 4
    assert model.source["kind"] == "hf" and model.source["format"] == "model.safetensors"
    images = pixels(32)
    image_gap = (ours(model, images=images) - hf_features(hf, images=images)).abs().max()
    text_gap = max((ours(model, ids=ids) - hf_features(hf, ids=ids)).abs().max() for ids in (IDS, prompts))
    assert image_gap < TOLERANCE and text_gap < TOLERANCE
    assert hf_features(hf, images=images).abs().max() > 0.1  # features are not trivially small
    assert torch.allclose(model.logit_scale, hf.logit_scale)


def test_openai_format_vit_agrees_with_hf_path(tmp_path, prompts):
    """Our tiny ViT saved in OpenAI's layout and via transformers' save_pretrained: same weights, same outputs,
    and transformers itself computes the same features from the HF folder."""
    tiny = build_tiny_clip("vit", seed=7)
    from_openai = load_clip(save_openai_state_dict(tiny, tmp_path / "openai.pt"))
    from_hf = load_clip(save_hf(tiny, tmp_path / "hf"))
    for key, value in from_openai.state_dict().items():
        assert torch.equal(from_hf.state_dict()[key], value), key  # the conversion only renames, splits and transposes
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = pixels(32, seed=1)
    # two loaded models with bit-identical weights (above) in other memory: outputs equal up to rounding order
    assert_fp32_close(ours(from_hf, images=images), ours(from_openai, images=images))
    assert (ours(from_openai, images=images) - hf_features(hf, images=images)).abs().max() < TOLERANCE
    assert (ours(from_openai, ids=prompts) - hf_features(hf, ids=prompts)).abs().max() < TOLERANCE


def test_openai_format_resnet_text_tower_agrees_with_hf(tmp_path):
    """HF has no modified-ResNet CLIP, but a ResNet CLIP's text tower is HF's CLIPTextModelWithProjection."""
    tiny = build_tiny_clip("resnet", seed=2)
    model = load_clip(save_openai_state_dict(tiny, tmp_path / "rn.pt"))
    # the tiny ViT and ResNet share their text tower's shape, so the ViT's HF text config fits
    text_config = hf_config(build_tiny_clip("vit").config).text_config
    text_config.projection_dim = tiny.config.embed_dim
    hf = transformers.CLIPTextModelWithProjection(text_config).eval()
    weights = openai_to_hf(model.state_dict(), text_only=True)
    del weights["logit_scale"]  # a CLIPModel weight, not the text model's
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all(key.endswith("position_ids") for key in missing)
    with torch.inference_mode():
        reference = hf(input_ids=IDS).text_embeds
    assert (ours(model, ids=IDS) - reference).abs().max() < TOLERANCE
    with pytest.raises(CheckpointError, match="ResNet CLIP has no Hugging Face counterpart"):
        openai_to_hf(model.state_dict())


@pytest.mark.parametrize("eos_token_id", [2, 49407])
def test_eot_position_with_eot_padding(tmp_path, eos_token_id):
    """HF reads the text feature at argmax(ids) for legacy configs (eos_token_id 2), else at the first EOT; ours at
    argmax, the first maximal id. With HF's tokenizer padding (EOT repeated) both pick the first EOT."""
    tiny = build_tiny_clip("vit", seed=4)
    hf = transformers.CLIPModel(hf_config(tiny.config, eos_token_id=eos_token_id)).eval()
    hf.load_state_dict(openai_to_hf(tiny.state_dict()), strict=False)
    ids = IDS.clone()
    for row in ids:
        eot = int((row == 49407).nonzero()[0])
        row[eot:] = 49407
    assert (ours(tiny, ids=ids) - hf_features(hf, ids=ids)).abs().max() < TOLERANCE
    # padding after EOT never matters (causal): the same model and shapes, and the later positions enter the sums
    # only as exact zeros (attention weight 0), so the features are bit-identical
    assert torch.equal(ours(tiny, ids=ids), ours(tiny, ids=IDS))


def test_name_conversion_round_trip():
    tiny = build_tiny_clip("vit", seed=1)
    state = tiny.state_dict()
    back = hf_to_openai(openai_to_hf(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], value) for key, value in state.items())


def test_pytorch_model_bin_folder(tmp_path):
    tiny = build_tiny_clip("vit", seed=6)
    model = load_clip(save_hf(tiny, tmp_path, safe_serialization=False))
    assert model.source["format"] == "pytorch_model.bin"
    assert_same_state(model, tiny)
    assert_fp32_close(ours(model, ids=IDS), ours(tiny, ids=IDS))


def test_sharded_safetensors_folder(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny = build_tiny_clip("vit", seed=6)
    save_hf(tiny, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_clip(tmp_path)
    assert_same_state(model, tiny)
    assert_fp32_close(ours(model, images=pixels(32)), ours(tiny, images=pixels(32)))


def test_hf_named_file_beside_its_config(tmp_path):
    tiny = build_tiny_clip("vit", seed=6)
    save_hf(tiny, tmp_path)
    model = load_clip(tmp_path / "model.safetensors")
    assert model.source["kind"] == "hf"
    assert_same_state(model, tiny)
    assert_fp32_close(ours(model, ids=IDS), ours(tiny, ids=IDS))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="Hugging Face transformers names; load the folder"):
        load_clip(tmp_path / "model.safetensors")


def fake_hub_cache(root, repo_id, folder):
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    return snapshot


def test_hub_id_read_from_cache_when_offline(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    tiny = build_tiny_clip("vit", seed=8)
    fake_hub_cache(tmp_path / "hub", "someone/tiny-clip", save_hf(tiny, tmp_path / "saved"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_clip("someone/tiny-clip", cache_dir=tmp_path / "hub")
    assert model.source["hub_id"] == "someone/tiny-clip" and model.config.name == "someone/tiny-clip"
    assert_same_state(model, tiny)
    assert_fp32_close(ours(model, ids=IDS), ours(tiny, ids=IDS))
    with pytest.raises(CheckpointError, match="neither in the local Hugging Face cache nor downloadable now"):
        load_clip("someone/absent-clip", cache_dir=tmp_path / "hub")


# ----------------------------------------------------------------------------------------------------------------------
# bad folders


@pytest.fixture()
def hf_dir(tmp_path):
    return save_hf(build_tiny_clip("vit", seed=9), tmp_path / "hf")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="folder without config.json"):
        load_clip(tmp_path)


def test_folder_without_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        load_clip(hf_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"model_type": "siglip"}, "describes a 'siglip' model"),
     ({"text_config__hidden_act": "gelu_new", "vision_config__hidden_act": "gelu_new"}, "unsupported activations"),
     ({"text_config__hidden_act": "gelu"}, "unsupported activations"),
     ({"vision_config__layer_norm_eps": 1e-6}, "unsupported vision layer_norm_eps")],
)
def test_unsupported_hf_settings(hf_dir, changes, message):
    edit_config(hf_dir, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_clip(hf_dir)


def test_broken_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        load_clip(hf_dir)


def test_truncated_hf_weights(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        load_clip(hf_dir)


def test_quick_gelu_contradicting_config(hf_dir):
    with pytest.raises(ConfigError, match="contradicts"):
        load_clip(hf_dir, quick_gelu=False)
