"""CLIP-LoRA: low-rank q/k/v updates of both towers through the backbone's qkv_delta hook.

What the maths promises, exactly: with B = 0 the adapted model is zero-shot CLIP bit for bit (the same operations plus
an exact zero); a block's hooked q/k/v equal the projection by the explicitly merged weight W + s B A up to fp32
rounding; the learned state is the factors only, bound to the backbone; the merged checkpoint, loaded by load_clip,
gives the adapted model's features up to fp32 rounding; training follows the official recipe (AdamW, 500 x K steps,
cosine per step to 1e-6) and resumes to the uninterrupted factors bit for bit (CPU).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.data.types import Item
from vlprompt.errors import CheckpointError, ConfigError, OutputError
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RunDir
from vlprompt.methods import METHODS, Training
from vlprompt.methods.clip_lora import CLIPLoRA, lora_blocks, merged_weights, save_merged_clip
from vlprompt.methods.configs import CLIPLoRAConfig
from vlprompt.methods.prompt_file import load_prompt, save_prompt
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig
from vlprompt.training.config import TrainConfig, resolve_train_config
from vlprompt.training.loop import build_optimizer, lr_at_step, train
from vlprompt.training.sources import ImageTrainSet

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["banded", "dotted", "striped", "zigzagged"]


def _lora(clip, classnames=NAMES, **options) -> CLIPLoRA:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPLoRA(clip, classnames, CLIPLoRAConfig(**options))


def _images(count: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained_like(method: CLIPLoRA, seed: int = 1, std: float = 0.05) -> CLIPLoRA:
    """Non-zero B factors (what training produces), drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in [*method.text.values(), *method.vision.values()]:
            block.b.copy_(torch.randn(block.b.shape, generator=generator) * std)
    return method


# ---------------------------------------------------------------------------------------------------- declaration


def test_registry_and_the_official_recipe():
    spec = METHODS["clip_lora"]
    assert spec.training is Training.IMAGES and spec.transfers and spec.config_cls is CLIPLoRAConfig
    config = CLIPLoRAConfig()  # run_utils.py: --r 2 --alpha 1 --dropout_rate 0.25 --encoder both --position all
    assert (config.rank, config.lora_alpha, config.dropout, config.encoder, config.position, config.params,
            config.template) == (2, 1.0, 0.25, "both", "all", ("q", "k", "v"), "a photo of a {}.")
    resolved = resolve_train_config(TrainConfig(), method="clip_lora", shots=4, dataset="dtd")
    # lora.py: AdamW(weight_decay=1e-2, betas=(0.9, 0.999), lr=2e-4), total_iters = 500 * shots, batch 32,
    # CosineAnnealingLR(total_iters, eta_min=1e-6), no warm-up
    assert (resolved.steps, resolved.epochs, resolved.batch_size, resolved.optimizer, resolved.lr,
            resolved.weight_decay, resolved.adam_eps, resolved.warmup_epochs, resolved.min_lr) == (
        2000, None, 32, "adamw", 2e-4, 1e-2, 1e-8, 0, 1e-6)
    assert (resolved.views, resolved.crop_scale_min) == ("epochs", 0.08) and resolved.is_resolved
    # a length given replaces the method's, in either unit
    assert resolve_train_config(TrainConfig(epochs=3), method="clip_lora", shots=4, dataset="dtd").steps is None
    assert resolve_train_config(TrainConfig(steps=7), method="coop", shots=4, dataset="dtd").epochs is None
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(epochs=3, steps=7)


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"dropout": 1.0}, "dropout must be smaller than 1"),
    ({"params": ("q", "o")}, "params must be distinct projections among q, k, v"),
    ({"params": ()}, "params must be distinct"),
    ({"encoder": "image"}, "encoder must be one of both, text, vision"),
    ({"template": "no slot"}, "template"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        CLIPLoRAConfig(**options)


def test_positions_are_the_official_index_lists():
    # loralib/utils.py INDEX_POSITIONS_TEXT / INDEX_POSITIONS_VISION['ViT-B/16'] and ['ViT-L/14']
    official12 = {"all": list(range(12)), "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
                  "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5], "top3": [9, 10, 11]}
    for position, blocks in official12.items():
        assert lora_blocks(position, 12) == blocks, position
    assert lora_blocks("half-up", 24) == list(range(12, 24)) and lora_blocks("half-bottom", 24) == list(range(12))


def test_backbones_and_positions_are_checked_at_build(clip):
    resnet = build_tiny_clip("resnet", seed=0)
    with pytest.raises(ConfigError, match="ResNet image tower"):
        CLIPLoRA(resnet, NAMES)
    text_only = CLIPLoRA(resnet, NAMES, CLIPLoRAConfig(encoder="text"))
    assert len(text_only.text) == 2 and not len(text_only.vision)
    with pytest.raises(ConfigError, match="names no block of the 2-block text tower"):
        CLIPLoRA(clip, NAMES, CLIPLoRAConfig(position="bottom"))  # a third of 2 blocks is none


def test_factors_start_as_the_official_initialisation(clip):
    method = _lora(clip)
    width = clip.config.transformer_width
    assert sorted(method.state_dict()) == sorted(f"{tower}.{layer}.{factor}" for tower in ("text", "vision")
                                                 for layer in (0, 1) for factor in ("a", "b"))
    block = method.text["0"]
    assert block.a.shape == (3, 2, width) and block.b.shape == (3, width, 2)
    assert torch.count_nonzero(block.b) == 0  # B = 0: the model starts at zero-shot CLIP
    bound = 1.0 / math.sqrt(width)  # nn.Linear's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    largest = float(block.a.detach().abs().max())
    assert 0.8 * bound < largest <= bound
    assert method.scale == 1.0 / math.sqrt(2.0)  # alpha / sqrt(r) (loralib/layers.py), not alpha / r
    assert all(p.dtype == torch.float32 for p in method.parameters())


# ------------------------------------------------------------------------------------------------- exact special cases


def test_at_initialisation_the_logits_are_zero_shot_clips_bit_for_bit(clip):
    method = _lora(clip)
    zeroshot = ZeroShot(clip, NAMES, ZeroShotConfig(template="a photo of a {}."))
    images = _images()
    expected = zeroshot.classifier()(clip.encode_image(images))
    assert torch.equal(method.classifier()(method.encode_images(images)), expected)
    assert torch.equal(method.encode_images(images), clip.encode_image(images))
    # the training forward (dropout on, one text call for all classes) starts there too: B = 0 makes each update an
    # exact zero whatever the dropout masks; only the order of normalisation differs from the classifier's
    method.train()
    torch.testing.assert_close(method(images), expected, rtol=0.0, atol=1e-5 * float(expected.abs().max()))


def test_one_blocks_qkv_equal_the_projection_by_the_merged_weight(clip):
    """Independent check of the defining computation: q/k/v of an attention block through the hook against
    F.linear with the explicit weight W + s * B A (per projection), for each tower."""
    method = _trained_like(_lora(clip, params=("q", "v")))  # k has no update: its rows stay W_k
    method.eval()
    s = 1.0 / math.sqrt(2.0)
    towers = {"text": (clip.transformer, method.text_extension(), method.text),
              "vision": (clip.visual.transformer, method.vision_extension(), method.vision)}
    for tower, (transformer, extension, factors) in towers.items():
        attn = transformer.resblocks[1].attn
        width = attn.in_proj_weight.shape[1]
        x = torch.randn(3, 7, width, generator=torch.Generator().manual_seed(2))
        hooked = attn.qkv(x, extension.qkv_delta, 1)
        weight = attn.in_proj_weight.detach().clone()
        a, b = factors["1"].a.detach(), factors["1"].b.detach()
        weight[:width] += s * b[0] @ a[0]  # q: the first projection with an update
        weight[2 * width:] += s * b[1] @ a[1]  # v: the second
        q, k, v = F.linear(x, weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads = attn.heads
        shape = (3, 7, heads, width // heads)
        for got, want, name in zip(hooked, (q, k, v), "qkv", strict=True):
            # fp32: (W + sBA) x against W x + s B (A x): the same sums in another order, a few ulps of |W x| ~ 1
            torch.testing.assert_close(got, want.view(shape).transpose(1, 2), rtol=1e-5, atol=1e-5,
                                       msg=f"{tower} {name}")
        assert not torch.allclose(hooked[0], F.linear(x, attn.in_proj_weight, attn.in_proj_bias)[..., :width]
                                  .view(shape).transpose(1, 2), atol=1e-3)  # the update is there


def test_dropout_acts_on_the_update_input_in_training_only(clip):
    method = _trained_like(_lora(clip))
    block, x = method.text["0"], torch.randn(2, 5, clip.config.transformer_width)
    method.eval()
    plain = block.delta(x, method.scale, 0.25, training=False)
    assert torch.equal(plain, block.delta(x, method.scale, 0.0, training=True))  # no dropout: the same update
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        dropped = block.delta(x, method.scale, 0.25, training=True)
        torch.manual_seed(3)  # independent masks per projection, drawn in q, k, v order (one nn.Dropout each)
        masks = [F.dropout(torch.ones_like(x), 0.25, training=True) for _ in range(3)]
    width = x.shape[-1]
    for i in range(3):
        manual = ((x * masks[i]) @ block.a[i].detach().t()) @ block.b[i].detach().t() * method.scale
        torch.testing.assert_close(dropped[..., i * width:(i + 1) * width], manual, rtol=1e-6, atol=1e-7)
    assert not torch.equal(masks[0], masks[1])


# --------------------------------------------------------------------------------------------------- learned state


def test_evaluation_never_drops_whatever_the_mode(clip):
    method = _trained_like(_lora(clip))
    images = _images(3)
    method.train()
    training = method.classifier()(method.encode_images(images))
    method.eval()
    assert torch.equal(method.classifier()(method.encode_images(images)), training)


def test_saved_state_is_the_factors_only_and_bound_to_the_backbone(clip, tmp_path):
    method = _trained_like(_lora(clip))
    path = save_prompt(method, tmp_path / "lora.safetensors")
    from safetensors.torch import load_file

    saved = load_file(path)
    assert sorted(saved) == sorted(method.state_dict()) and all(k.endswith((".a", ".b")) for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in method.parameters())
    back = load_prompt(path, clip)
    images = _images()
    assert torch.equal(back.classifier()(back.encode_images(images)), method.classifier()(method.encode_images(images)))
    with pytest.raises(CheckpointError, match="was learned on backbone"):
        load_prompt(path, build_tiny_clip("vit", seed=1))


def test_with_classnames_keeps_the_factors(clip):
    method = _trained_like(_lora(clip))
    other = method.with_classnames(["lined", "porous"])
    assert other.classnames == ["lined", "porous"]
    for key, value in method.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    images = _images(3)
    assert torch.equal(other.encode_images(images), method.encode_images(images))


# ----------------------------------------------------------------------------------------------------------- merge


def test_a_merged_checkpoint_loads_with_load_clip_and_gives_the_adapted_features(clip, tmp_path):
    method = _trained_like(_lora(clip))
    method.eval()
    path = save_merged_clip(method, tmp_path / "merged.safetensors")
    merged = load_clip(path)
    images = _images()
    ids = method._token_ids
    with torch.no_grad():
        adapted_text = method.text_features()
    adapted_image = method.encode_images(images)
    with torch.no_grad():
        merged_text = merged.encode_text(ids)
        merged_image = merged.encode_image(images)
        base_image = clip.encode_image(images)
    # fp32: (W + sBA) x against W x + s B (A x) in every block: rounding of the order of 1e-7 relative per product,
    # carried through 2 blocks per tower; features are of size ~1, so 1e-5 of their largest entry bounds it, while
    # the updates themselves move the features by ~1e-2 (checked) -- a wrong merge cannot pass
    for got, want in ((merged_text, adapted_text), (merged_image, adapted_image)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert float((adapted_image - base_image).abs().max()) > 1e-3
    assert merged.fingerprint() != clip.fingerprint()
    weights = merged_weights(method)
    assert weights.keys() == clip.state_dict().keys()  # a plain CLIP state dict, nothing of the method's
    # the zero-shot classifier of the merged CLIP is the adapted classifier
    zeroshot = ZeroShot(merged, NAMES, ZeroShotConfig(template="a photo of a {}."))
    torch.testing.assert_close(zeroshot.classifier()(merged_image), method.classifier()(adapted_image),
                               rtol=1e-4, atol=1e-4)


def test_merging_refuses_to_overwrite_what_is_not_a_merge(clip, tmp_path):
    method = _trained_like(_lora(clip))
    foreign = tmp_path / "mine.safetensors"
    foreign.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        save_merged_clip(method, foreign)
    with pytest.raises(OutputError, match="not a merged checkpoint written by vlprompt merge"):
        save_merged_clip(method, foreign, overwrite=True)
    assert foreign.read_bytes() == b"precious"
    with pytest.raises(ConfigError, match=r"name it \*\.safetensors"):
        save_merged_clip(method, tmp_path / "merged.pt")
    ours = save_merged_clip(method, tmp_path / "merged.safetensors")
    first = ours.read_bytes()
    _trained_like(method, seed=5)
    save_merged_clip(method, ours, overwrite=True)  # an earlier merge may be replaced
    assert ours.read_bytes() != first
    with pytest.raises(ConfigError, match="only a CLIP-LoRA method can be merged"):
        merged_weights(ZeroShot(clip, NAMES))


def test_api_merge_takes_a_method_and_refuses_others(clip, tmp_path):
    import vlprompt.api as vp

    method = _trained_like(_lora(clip))
    written = vp.merge(method, tmp_path / "api.safetensors")
    assert written.is_file()
    with pytest.raises(ConfigError, match="not a clip_lora method"):
        vp.merge(ZeroShot(clip, NAMES), tmp_path / "zs.safetensors")


# -------------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[Item]]:
    """4 classes x 3 random photographs (PNG)."""
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    items = []
    for label in range(4):
        (folder / f"c{label}").mkdir()
        for index in range(3):
            pixels = (torch.rand(36 + 4 * index, 44, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"c{label}/{index}.png")
            items.append(Item(f"c{label}/{index}.png", label))
    return folder, items


def _set(images) -> ImageTrainSet:
    folder, items = images
    return ImageTrainSet(folder, items, resolution=32, views=4, pool_seed=0, num_workers=0)


# 12 images, batch 5: 2 steps an epoch; 7 steps = 4 epochs, the last cut to 1 step
STEPS = TrainConfig(steps=7, batch_size=5, optimizer="adamw", lr=0.01, weight_decay=1e-2, warmup_epochs=0,
                    min_lr=1e-6, precision="fp32")


def test_the_schedule_per_step_is_pytorchs_cosine_annealing():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=STEPS.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS.steps, eta_min=STEPS.min_lr)
    reference = []
    for _ in range(STEPS.steps):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    assert [lr_at_step(step, STEPS, 2) for step in range(STEPS.steps)] == pytest.approx(reference, rel=1e-12)
    assert isinstance(build_optimizer([torch.nn.Parameter(torch.zeros(1))], STEPS), torch.optim.AdamW)


def test_training_takes_exactly_the_given_steps_with_the_per_step_schedule(clip, images):
    method = _lora(clip)
    seen = []

    def record(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["lr"])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        result = train(method, _set(images), STEPS)
    finally:
        handle.remove()
    assert len(seen) == 7 and len(result.history) == 4
    assert seen == pytest.approx([lr_at_step(step, STEPS, 2) for step in range(7)], rel=1e-12)
    assert all(torch.count_nonzero(block.b) > 0 for block in [*method.text.values(), *method.vision.values()])


def test_resuming_an_interrupted_run_gives_the_uninterrupted_factors(clip, images, tmp_path):
    class Stop(Exception):
        pass

    def stop_after(epoch):
        def callback(stats):
            if stats.epoch == epoch:
                raise Stop

        return callback

    straight = _lora(clip)
    train(straight, _set(images), STEPS)
    config = RunConfig(method="clip_lora", dataset="dtd").to_dict()
    run = RunDir.create_or_open(tmp_path / "run", config)
    with pytest.raises(Stop):
        train(_lora(clip), _set(images), STEPS, run_dir=run, on_epoch_end=stop_after(2))
    run.close()
    run = RunDir.create_or_open(tmp_path / "run", config, resume=True)
    resumed = _lora(clip)
    result = train(resumed, _set(images), STEPS, run_dir=run)
    run.close()
    assert result.start_epoch == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_activation_checkpointing_replays_the_dropout_masks(clip, images):
    plain, recomputed = _lora(clip), _lora(clip)
    config = TrainConfig(steps=2, batch_size=6, optimizer="adamw", lr=0.01, warmup_epochs=0, precision="fp32")
    train(plain, _set(images), config)
    train(recomputed, _set(images), dataclasses_replace(config, activation_checkpointing=True))
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)
