"""IVLP, MaPLe and PromptSRC: where each prompt enters, the coupling maps, the self-regulation terms and the
aggregation weights against independent computations; the exact special cases of the issue.

Tolerances (tiny CLIP, fp32, features of magnitude ~1-4, relative precision 1.2e-7): paths that only reorder sums
(fast vs plain text path, image features in different batch shapes) differ by a few 1e-6, hence ``ATOL = 2e-5``;
paths that run the same operations on the same shapes are compared exactly.
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F


from vlprompt.methods.recipe import RecipeContext
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.backbone.tokenizer import get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS, Training
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.deep_prompt import gaussian_epoch_weights
from vlprompt.methods.ivlp import IVLP, IVLPConfig
from vlprompt.methods.maple import MaPLe, MaPLeConfig
from vlprompt.methods.promptsrc import PromptSRC, PromptSRCConfig, self_regulation
from vlprompt.methods.templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_60
from vlprompt.training.config import TrainConfig
from vlprompt.methods.base import TrainOutput
from vlprompt.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 2e-5
NAMES = ["banded", "golden retriever", "sea or lake", "x"]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("vit", seed=0, layers=3, text_layers=3)


def _images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= atol * scale, (a - b).abs().max()


# ------------------------------------------------------------------------------------------------ registry, configs


def test_registry_declares_image_training_and_the_official_recipes():
    for name in ("ivlp", "maple", "promptsrc"):
        assert METHODS[name].training is Training.IMAGES and METHODS[name].transfers
    base2novel = RecipeContext(16, "dtd", "base")
    assert {k: METHODS["maple"].train_defaults(base2novel)[k] for k in ("batch_size", "epochs", "lr")} == \
        {"batch_size": 4, "epochs": 5, "lr": 0.0035}
    for name in ("ivlp", "promptsrc"):
        assert {k: METHODS[name].train_defaults(base2novel)[k] for k in ("batch_size", "epochs", "lr")} == \
            {"batch_size": 4, "epochs": 20, "lr": 0.0025}
    maple, src = MaPLeConfig().for_recipe(base2novel), PromptSRCConfig().for_recipe(base2novel)
    assert (maple.n_ctx, maple.ctx_init, maple.prompt_depth) == (2, "a photo of a", 9)
    assert (src.n_ctx_text, src.n_ctx_vision, src.prompt_depth_text, src.prompt_depth_vision) == (4, 4, 9, 9)
    assert (src.text_loss_weight, src.image_loss_weight, src.logit_loss_weight) == (25.0, 10.0, 1.0)
    assert (src.gpa, src.gpa_mean, src.gpa_std, src.text_templates) == (True, 15.0, 1.0, "imagenet60")
    with pytest.raises(ConfigError, match="gpa_std must be a positive number"):
        PromptSRCConfig(gpa_std=0)
    with pytest.raises(ConfigError, match="n_ctx_vision must be an integer >= 0"):
        IVLPConfig(n_ctx_vision=-1)


def test_the_60_templates_are_the_official_list():
    assert len(IMAGENET_TEMPLATES_60) == 60 == len(set(IMAGENET_TEMPLATES_60))
    assert IMAGENET_TEMPLATES_60[0] == "a photo of a {}." and IMAGENET_TEMPLATES_60[-1] == "itap of the {}."
    assert set(IMAGENET_TEMPLATES_60) == set(IMAGENET_TEMPLATES[:60])
    assert "itap of a {}." not in IMAGENET_TEMPLATES_60 and "a toy {}." not in IMAGENET_TEMPLATES_60


def test_depths_and_backbones_are_checked_at_build(clip):
    with pytest.raises(ConfigError, match="text prompt depth must be between 1 and the text tower's 3 layers, got 9"):
        IVLP(clip, NAMES)
    with pytest.raises(ConfigError, match="vision prompt depth must be at most the image tower's 3 layers"):
        IVLP(clip, NAMES, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=4))
    resnet = build_tiny_clip("resnet", seed=0)
    with pytest.raises(ConfigError, match="ResNet image tower, which has no token sequence"):
        MaPLe(resnet, NAMES, MaPLeConfig(prompt_depth=2))
    text_only = IVLP(resnet, NAMES, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=0))  # no vision prompts: fine
    assert text_only(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(ConfigError, match="n_ctx 5 exceeds the 4 token"):
        IVLP(clip, NAMES, IVLPConfig(n_ctx_text=5, prompt_depth_text=2, prompt_depth_vision=2))


# ------------------------------------------------------------------------------------------------ IVLP


def test_ivlp_at_depth_1_without_vision_prompts_is_coop(clip):
    """The issue's special case: logits and gradients equal CoOp's with the same context (fp32 rounding)."""
    images = _images()
    ivlp = IVLP(clip, NAMES, IVLPConfig(prompt_depth_text=1, n_ctx_vision=0, prompt_depth_vision=0))
    coop = CoOp(clip, NAMES, CoOpConfig(ctx_init="a photo of a"))
    assert torch.equal(ivlp.ctx, coop.ctx) and [n for n, _ in ivlp.named_parameters()] == ["ctx"]
    ivlp_logits = ivlp(images)
    coop_logits = coop(clip.encode_image(images))
    _close(ivlp_logits, coop_logits)
    labels = torch.tensor([0, 1, 2, 3])
    (ivlp_grad,) = torch.autograd.grad(F.cross_entropy(ivlp_logits, labels), [ivlp.ctx])
    (coop_grad,) = torch.autograd.grad(F.cross_entropy(coop_logits, labels), [coop.ctx])
    _close(ivlp_grad, coop_grad)
    assert ivlp_grad.abs().max() > 1e-4


def _manual_text(clip, method, deep_text):
    """Class text features with the deep prompts written into positions 1..n before each block (index assignment)."""
    layout = method.layout
    x = layout.assemble(method.ctx[None, None], layout.length)[0] + clip.positional_embedding
    n = method.n_ctx
    for layer, block in enumerate(clip.transformer.resblocks):
        if 1 <= layer <= len(deep_text):
            x = x.clone()
            x[:, 1:1 + n] = deep_text[layer - 1]
        x = block(x, causal=True)
    return clip.text_features_from_hidden(x, layout.eot_index)


def _manual_image(clip, images, first, deep_vision):
    """Image features with ``first`` appended before ln_pre and the last n positions overwritten before blocks 1.."""
    visual = clip.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    if first is not None:
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], 1)
    x = visual.ln_pre(x)
    for layer, block in enumerate(visual.transformer.resblocks):
        if 1 <= layer <= len(deep_vision):
            n = deep_vision[layer - 1].shape[0]
            x = x.clone()
            x[:, -n:] = deep_vision[layer - 1]
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


@pytest.mark.parametrize("fast", [True, False])
def test_ivlp_prompts_enter_each_layer_as_the_official_code_puts_them(clip, fast):
    ivlp = _seeded(lambda: IVLP(clip, NAMES, IVLPConfig(prompt_depth_text=3, prompt_depth_vision=2, n_ctx_vision=3,
                                                        fast_text=fast)))
    assert [name for name, _ in ivlp.named_parameters()] == ["ctx", "deep.vision_first", "deep.text.0",
                                                             "deep.text.1", "deep.vision.0"]
    images = _images(3, seed=1)
    text = _manual_text(clip, ivlp, list(ivlp.deep.text))
    _close(ivlp.text_features(), text)
    assert torch.equal(ivlp.image_features(images), _manual_image(clip, images, ivlp.deep.vision_first,
                                                                  list(ivlp.deep.vision)))
    # the deep prompts start as N(0, 0.02^2) and the context as the words "a photo of a"
    words = clip.token_embedding(get_tokenizer()("a photo of a", context_length=77))[0, 1:5]
    assert torch.equal(ivlp.ctx, words.float())
    spread = torch.cat([p.flatten() for p in ivlp.deep.text]).std().item()
    assert 0.01 < spread < 0.03


def test_ivlp_text_features_are_encoded_once_per_step_whatever_the_batch(clip, monkeypatch):
    """The K class prompts go through the text tower once per forward, not once per image."""
    import vlprompt.methods.deep_prompt as deep_prompt

    ivlp = IVLP(clip, NAMES, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=2))
    calls = []
    original = deep_prompt.encode_shared_prefix

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(deep_prompt, "encode_shared_prefix", counting)
    ivlp(_images(8))
    assert len(calls) == 1 and calls[0][0] == 1  # one shared prefix (B = 1), for all 8 images


# ------------------------------------------------------------------------------------------------ MaPLe


def test_maple_couplings_make_the_vision_prompts_from_the_text_prompts(clip):
    maple = _seeded(lambda: MaPLe(clip, NAMES, MaPLeConfig(prompt_depth=3)))
    prompts = maple.prompts()
    # independent: W t + b of each coupling, written out
    assert torch.equal(prompts.vision_first, maple.ctx @ maple.proj.weight.t() + maple.proj.bias)
    for tokens, made, layer in zip(maple.text, prompts.vision, maple.projections, strict=True):
        torch.testing.assert_close(made, tokens @ layer.weight.t() + layer.bias, rtol=0, atol=1e-6)
    # the deep couplings start as copies of one Linear (the official _get_clones), the first one is separate
    assert torch.equal(maple.projections[0].weight, maple.projections[1].weight)
    assert not torch.equal(maple.proj.weight, maple.projections[0].weight)
    # the text context is the first two words of "a photo of a"; "of a" stays in every prompt
    words = clip.token_embedding(get_tokenizer()("a photo of a", context_length=77))[0, 1:3]
    assert torch.equal(maple.ctx, words.float())
    ids = get_tokenizer()(["a photo of a banded."], context_length=77)
    assert torch.equal(maple.layout.token_ids[0], ids[0])
    width_t, width_v, n = clip.config.transformer_width, clip.config.vision_width, 2
    expected = n * width_t + (width_t * width_v + width_v) * 3 + 2 * n * width_t
    assert sum(p.numel() for p in maple.parameters()) == expected
    # gradients reach every coupling
    maple(_images()).logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in maple.parameters())


def test_maple_without_couplings_is_ivlp_on_the_text_side(clip):
    """With its couplings zeroed (vision prompts all zero), MaPLe's text side is IVLP's with the same text prompts,
    and its image side is IVLP's with zero vision prompts."""
    maple = _seeded(lambda: MaPLe(clip, NAMES, MaPLeConfig(prompt_depth=3)))
    with torch.no_grad():
        for linear in (maple.proj, *maple.projections):
            linear.weight.zero_()
            linear.bias.zero_()
    ivlp = IVLP(clip, NAMES, IVLPConfig(n_ctx_text=2, n_ctx_vision=2, prompt_depth_text=3, prompt_depth_vision=3))
    with torch.no_grad():
        ivlp.ctx.copy_(maple.ctx)
        for mine, theirs in zip(ivlp.deep.text, maple.text, strict=True):
            mine.copy_(theirs)
        for tokens in (ivlp.deep.vision_first, *ivlp.deep.vision):
            tokens.zero_()
    assert torch.equal(maple.text_features(), ivlp.text_features())
    images = _images(seed=3)
    assert torch.equal(maple.image_features(images), ivlp.image_features(images))
    # (a MaPLe text side is the same computation whatever the couplings hold)
    fresh = _seeded(lambda: MaPLe(clip, NAMES, MaPLeConfig(prompt_depth=3)))
    assert torch.equal(fresh.text_features(), maple.text_features())


# ------------------------------------------------------------------------------------------------ PromptSRC


def _promptsrc(clip, **overrides):
    options = {"prompt_depth_text": 2, "prompt_depth_vision": 2, **overrides}
    return _seeded(lambda: PromptSRC(clip, NAMES, PromptSRCConfig(**options)))


def test_promptsrc_text_targets_are_the_mean_over_the_60_templates(clip):
    src = _promptsrc(clip)
    tokenizer = get_tokenizer()
    with torch.no_grad():
        per_template = torch.stack([clip.encode_text(tokenizer([t.format(n) for n in NAMES], context_length=77))
                                    for t in IMAGENET_TEMPLATES_60])
    _close(src.text_targets(), F.normalize(per_template.mean(0), dim=-1))


def test_promptsrc_regularisation_terms_against_an_independent_computation(clip):
    generator = torch.Generator().manual_seed(5)
    batch, classes, dim = 3, 4, 8
    logits, frozen_logits = torch.randn(batch, classes, generator=generator) * 5, torch.randn(batch, classes) * 5
    text, image = torch.randn(classes, dim, generator=generator), torch.randn(batch, dim, generator=generator)
    frozen_text = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    frozen_image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    got = self_regulation(logits, text, image, frozen_logits, frozen_text, frozen_image, text_weight=25.0,
                          image_weight=10.0, logit_weight=1.0)
    unit_text = text / text.norm(dim=1, keepdim=True)
    unit_image = image / image.norm(dim=1, keepdim=True)
    l1_text = (unit_text - frozen_text).abs().sum() / (classes * dim)
    l1_image = (unit_image - frozen_image).abs().sum() / (batch * dim)
    kl = 0.0
    for b in range(batch):
        p = [math.exp(v) for v in frozen_logits[b].tolist()]
        q = [math.exp(v) for v in logits[b].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    want = 25.0 * l1_text + 10.0 * l1_image + kl / (batch * classes)
    assert got.item() == pytest.approx(float(want), rel=1e-5)


def test_promptsrc_training_forward_adds_the_terms_of_the_frozen_clip(clip):
    src = _promptsrc(clip)
    images = _images(seed=7)
    src.train()
    output = src(images)
    assert isinstance(output, TrainOutput)
    with torch.no_grad():
        frozen_image = F.normalize(clip.encode_image(images), dim=-1)
        targets = src.text_targets()
        scale = clip.logit_scale.exp()
        want = self_regulation(output.logits, src.text_features(), src.image_features(images), scale * frozen_image
                               @ targets.t(), targets, frozen_image, text_weight=25.0, image_weight=10.0,
                               logit_weight=1.0)
    _close(output.regularizer.detach(), want)
    src.eval()
    assert torch.equal(src(images), output.logits.detach())


def test_gaussian_aggregation_weights():
    weights = gaussian_epoch_weights(20, 15.0, 1.0)
    density = [statistics.NormalDist(15.0, 1.0).pdf(e) for e in range(1, 21)]
    assert weights == pytest.approx([d / sum(density) for d in density], rel=1e-12)
    assert sum(weights) == pytest.approx(1.0) and max(weights) == weights[14]
    few_shot = gaussian_epoch_weights(50, 30.0, 30.0)
    assert few_shot[29] == max(few_shot) and few_shot[0] > 0.4 * few_shot[29]


def test_promptsrc_aggregates_the_prompts_of_every_epoch(clip):
    """After training, the prompts are sum_e w_e * prompts after epoch e (recorded independently)."""
    src = _promptsrc(clip, gpa_mean=2.0, gpa_std=1.5)
    train_set = _image_train_set()
    snapshots = []
    original = src.finish_epoch

    def record(epoch, epochs):
        snapshots.append([p.detach().clone() for p in src.parameters()])
        original(epoch, epochs)

    src.finish_epoch = record
    train(src, train_set, TrainConfig(epochs=3, batch_size=4, lr=0.05, precision="fp32"))
    weights = gaussian_epoch_weights(3, 2.0, 1.5)
    for index, param in enumerate(src.parameters()):
        expected = sum(w * snap[index] for w, snap in zip(weights, snapshots, strict=True))
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7)
    assert not torch.equal(snapshots[-1][0], src.ctx.detach())


def test_promptsrc_without_regularisation_and_aggregation_takes_ivlps_steps(clip):
    train_set = _image_train_set()
    config = TrainConfig(epochs=3, batch_size=4, lr=0.05, precision="fp32")
    src = _promptsrc(clip, text_loss_weight=0.0, image_loss_weight=0.0, logit_loss_weight=0.0, gpa=False)
    ivlp = _seeded(lambda: IVLP(clip, NAMES, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=2)))
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), ivlp.parameters(), strict=True))
    ran_src = train(src, train_set, config)
    ran_ivlp = train(ivlp, train_set, config)
    assert [s.loss for s in ran_src.history] == [s.loss for s in ran_ivlp.history]
    for (name, a), b in zip(src.named_parameters(), ivlp.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ivlp.ctx, IVLP(clip, NAMES, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=2)).ctx)


def test_with_classnames_keeps_the_learned_prompts(clip):
    src = _promptsrc(clip)
    with torch.no_grad():
        src.ctx.add_(1.0)
    moved = src.with_classnames(["cat", "dog"])
    assert torch.equal(moved.ctx, src.ctx) and moved.num_classes == 2
    assert all(torch.equal(a, b) for a, b in zip(moved.state_dict().values(), src.state_dict().values(), strict=True))
    copied = copy.deepcopy(src)
    assert copied.clip is src.clip and torch.equal(copied.ctx, src.ctx)


# ------------------------------------------------------------------------------------------------ helpers


def _image_train_set():
    """4 classes x 2 images written as PNG files (tiny CLIP resolution), with a pool of 2 augmented views."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from vlprompt.data.types import Item
    from vlprompt.training.sources import ImageTrainSet

    folder = Path(tempfile.mkdtemp(prefix="vlprompt-images-"))
    generator = torch.Generator().manual_seed(0)
    items = []
    for label in range(4):
        for index in range(2):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
            name = f"c{label}_{index}.png"
            Image.fromarray(pixels).save(folder / name)
            items.append(Item(name, label))
    return ImageTrainSet(folder, items, resolution=32, views=2, pool_seed=0, num_workers=0)
