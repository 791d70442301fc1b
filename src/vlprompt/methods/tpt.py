"""TPT (Shu et al., NeurIPS 2022): test-time prompt tuning of a frozen CLIP, one test image at a time.

For each test image the evaluation hands the classifier the frozen image tower's features of ``V`` views: view 0 is
the image itself (CLIP's evaluation transform) and views 1..V-1 are augmented (random resized crop and flip, plus
AugMix on datasets other than ImageNet and its variants, as the official code). TPT then

1. scores every view with the prompts of the current context (CoOp's end layout, ``[SOT][ctx][class].[EOT]``),
2. keeps the ``int(V * selection)`` views whose predictions have the lowest entropy (:func:`select_confident`),
3. takes ``steps`` AdamW steps on the context minimising the entropy of their mean prediction
   (:func:`average_entropy`; the views are chosen once, before the first step, as the official code does),
4. classifies view 0 alone with the tuned context, and starts the next image from the initial context again.

Only the context is tuned (fp32 master copy; the towers run under the evaluation's autocast). The image features do
not depend on the prompt, so each view goes through the image tower once (all views of an image in one call); the
text side uses the fast path (:func:`vlprompt.methods.coop.encode_context`). The initial context is the word
embeddings of ``ctx_init`` ("a photo of a": with zero steps TPT is zero-shot CLIP with "a photo of a {}."), random
N(0, 0.02^2), or a learned CoOp context (``init_prompt``: TPT+CoOp; with zero steps TPT is that CoOp prompt).

Each image's adaptation starts from a fresh copy of the initial context and a fresh optimiser (and, under fp16
autocast, a fresh loss scaler), so an image's prediction depends on nothing but the image, its views and the initial
context: the test set's order changes no prediction. The views of an image are drawn from generators seeded by
(``view_seed``, the image's path, the view number); ``view_seed`` is drawn at build time from torch's RNG (which
the pipeline seeds from the run's seed) and saved with the context, so a run's views are reproducible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.backbone.transforms import AugMixTransform, EvalTransform
from vlprompt.errors import ConfigError
from vlprompt.methods.base import CosineClassifier, FrozenClipMethod, cosine_logits, logit_scale_of
from vlprompt.methods.configs import TPTConfig
from vlprompt.methods.coop import CoOp, encode_context
from vlprompt.methods.prompt_file import load_prompt
from vlprompt.methods.prompt_layout import initial_context, prepare_prompts

__all__ = ["TPT", "TPTConfig", "Adaptation", "TestTimeClassifier", "TestViews", "average_entropy", "build_tpt",
           "select_confident"]

GRAD_SCALE = 1000.0
"""Initial loss scale of a step under fp16 autocast (the official ``GradScaler(init_scale=1000)``)."""


def select_confident(logits: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` rows of ``logits`` ``[V, K]`` whose softmax has the lowest entropy, most confident
    first (a stable sort: equal entropies keep the view order)."""
    log_probs = logits.float().log_softmax(dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return torch.argsort(entropy, stable=True)[:keep]


def average_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean prediction of ``logits`` ``[n, K]``: ``H(p)`` with ``p = mean_i softmax(logits_i)``.

    Computed in log space as the official code does (``log p = logsumexp_i log_softmax(logits_i) - log n``, clamped
    at the dtype's smallest finite value so that a zero probability contributes 0, not NaN), in fp32.
    """
    log_probs = logits.float().log_softmax(dim=-1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp_min(torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()


@dataclass(frozen=True)
class TestViews:
    """The views a test-time method needs of every test image: ``count`` views, view 0 ``original(image)``, view
    ``v >= 1`` ``transform(image, view_generator(seed, image path, v))``
    (:func:`vlprompt.features.extract.augmented_views` with ``original``)."""

    count: int
    seed: int
    transform: Callable[..., Tensor]
    original: Callable[..., Tensor]


@dataclass(frozen=True)
class Adaptation:
    """One image's adaptation: the tuned context ``[M, width]``, the views the objective kept (None without steps)
    and the objective before each step."""

    ctx: Tensor
    selected: Tensor | None
    losses: tuple[Tensor, ...]


class TPT(FrozenClipMethod):
    """Test-time prompt tuning over K classes; its learned state is the initial context (and the views' seed).

    ``classifier()`` maps the views' features ``[V, B, D]`` of B images to logits ``[B, K]``, adapting to each image;
    ``self(image_features)`` gives the initial context's logits ``[B, K]`` (no adaptation: that needs the views).
    """

    method_name = "tpt"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: TPTConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None, ctx: Tensor | None = None,
                 view_seed: int | None = None) -> None:
        config = config or TPTConfig()
        if not isinstance(config, TPTConfig):
            raise ConfigError(f"TPT needs a TPTConfig, got {type(config).__name__}")
        if config.augmix == "auto":  # no dataset named: the official rule gives AugMix to all but ImageNet's family
            config = config.for_dataset(None, "")
        super().__init__(clip, classnames, config)
        self._tokenizer = tokenizer or get_tokenizer()
        if ctx is None and config.init_prompt:
            ctx = read_coop_context(clip, config.init_prompt)
        if ctx is not None:
            if ctx.ndim != 2 or ctx.shape[1] != clip.config.transformer_width:
                raise ConfigError(f"a TPT context must be [M, {clip.config.transformer_width}], got "
                                  f"{tuple(ctx.shape)}")
            _, self.n_ctx, self.layout = prepare_prompts(clip, self.classnames, "", int(ctx.shape[0]), "end",
                                                         self._tokenizer)
        else:
            phrase, self.n_ctx, self.layout = prepare_prompts(clip, self.classnames, config.ctx_init, config.n_ctx,
                                                              "end", self._tokenizer)
            ctx = initial_context(clip, phrase, self.n_ctx, config.ctx_init,
                                  (self.n_ctx, clip.config.transformer_width), self._tokenizer)
        self.ctx = nn.Parameter(ctx.detach().to(device=clip.device, dtype=torch.float32).clone())
        if view_seed is None:  # from torch's RNG, which build_method_for seeds from the run's seed
            view_seed = int(torch.randint(0, 2**62, (1,)).item())
        self.register_buffer("view_seed", torch.tensor(int(view_seed), dtype=torch.int64))

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layout = self.layout.apply(fn)

    # -- text side ----------------------------------------------------------------------------------------------------
    def text_features(self, ctx: Tensor | None = None) -> Tensor:
        """Class text features ``[K, D]`` (not normalised) of the context ``ctx`` ``[M, width]`` (default: the initial
        one), through the fast text path as CoOp's."""
        ctx = self.ctx if ctx is None else ctx
        return encode_context(self.clip, self.layout, ctx[None, None], fast=self.config.fast_text)[0]

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits ``[B, K]`` (fp32) of image features ``[B, D]`` with the initial context (no adaptation)."""
        text = self.text_features()
        return cosine_logits(image_features.to(text.device), text, logit_scale_of(self.clip))

    # -- test time ----------------------------------------------------------------------------------------------------
    def test_views(self) -> TestViews:
        """The views the evaluation computes of each test image (see the module docstring)."""
        size = self.clip.config.image_resolution
        return TestViews(count=self.config.tta_views, seed=int(self.view_seed),
                         transform=AugMixTransform(size, mix=self.config.augmix == "on"),
                         original=EvalTransform(size))

    def adapt(self, views: Tensor) -> Adaptation:
        """Tune a fresh copy of the initial context on one image's view features ``[V, D]`` (``tta_steps`` AdamW steps
        of :func:`average_entropy` over the :func:`select_confident` views); the method itself is left unchanged.

        Runs with gradients even when called under ``torch.inference_mode`` (as the evaluation calls it), under the
        caller's autocast; fp16 autocast scales the loss (a fresh scaler per image, initial scale 1000).
        """
        config = self.config
        with torch.inference_mode(False), torch.enable_grad():  # normal tensors: autograd may save them
            logit_scale = logit_scale_of(self.clip)
            ctx = self.ctx.detach().clone().requires_grad_(True)
            if config.tta_steps == 0:
                return Adaptation(ctx.detach(), None, ())
            views = views.to(ctx.device).clone()  # a normal tensor, also when the caller is in inference mode
            optimizer = torch.optim.AdamW([ctx], lr=config.tta_lr, weight_decay=config.tta_weight_decay)
            device_type = ctx.device.type
            fp16 = torch.is_autocast_enabled(device_type) and \
                torch.get_autocast_dtype(device_type) == torch.float16
            scaler = torch.amp.GradScaler(device_type, init_scale=GRAD_SCALE, enabled=fp16)
            selected: Tensor | None = None
            losses = []
            for _ in range(config.tta_steps):
                logits = cosine_logits(views, self.text_features(ctx), logit_scale)  # [V, K]
                if selected is None:
                    selected = select_confident(logits.detach(), config.kept_views)
                loss = average_entropy(logits[selected])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.detach())
        return Adaptation(ctx.detach(), selected, tuple(losses))

    def predict_views(self, views: Tensor, fixed: CosineClassifier | None = None) -> Tensor:
        """Logits ``[1, K]`` of the original image (view 0 of ``views`` ``[V, D]``) after :meth:`adapt`; ``fixed``:
        the initial context's classifier, used as it is when there are no steps."""
        if self.config.tta_steps == 0:
            classifier = fixed if fixed is not None else self.classifier().fixed
        else:
            ctx = self.adapt(views).ctx
            with torch.no_grad():
                classifier = _cosine_classifier(self.text_features(ctx), self.clip)
        return classifier(views[:1])

    @torch.no_grad()
    def classifier(self) -> TestTimeClassifier:
        return TestTimeClassifier(self, _cosine_classifier(self.text_features(), self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> TPT:
        """The same initial context (and views' seed) on another class list."""
        return TPT(self.clip, classnames, self.config, tokenizer=self._tokenizer, ctx=self.ctx.detach(),
                   view_seed=int(self.view_seed))


@dataclass(frozen=True)
class TestTimeClassifier:
    """TPT's evaluation classifier: the views' features ``[V, B, D]`` of B images -> logits ``[B, K]``, each image
    adapted on its own views (:meth:`TPT.predict_views`). ``fixed``: the initial context's classifier."""

    method: TPT
    fixed: CosineClassifier

    def __call__(self, views: Tensor) -> Tensor:
        if views.ndim != 3:
            raise ConfigError(f"TPT classifies the features of each image's augmented views [V, B, D], got shape "
                              f"{tuple(views.shape)}; evaluate it through vlprompt (it computes the views)")
        return torch.cat([self.method.predict_views(views[:, b], self.fixed) for b in range(views.shape[1])])


def _cosine_classifier(text: Tensor, clip: CLIP) -> CosineClassifier:
    """The classifier CoOp's ``classifier()`` builds from class text features (normalised once, fp32)."""
    return CosineClassifier(F.normalize(text.detach().float(), dim=-1), logit_scale_of(clip))


def read_coop_context(clip: CLIP, path: str | os.PathLike[str]) -> Tensor:
    """The unified context ``[M, width]`` of a CoOp prompt file learned on ``clip`` (TPT+CoOp's initialisation);
    the backbone fingerprint is checked (:func:`vlprompt.methods.prompt_file.load_prompt`)."""
    source = Path(path)
    if source.is_dir():
        raise ConfigError(f"init_prompt {str(source)!r} is a folder: give the CoOp prompt file in it (a run folder "
                          "keeps it as prompt.safetensors)")
    learned = load_prompt(source, clip)
    if not isinstance(learned, CoOp) or learned.config.csc or learned.config.class_token_position != "end":
        name = getattr(learned, "method_name", type(learned).__name__)
        raise ConfigError(f"init_prompt {str(source)!r} holds a {name} prompt; TPT starts from a unified CoOp context "
                          "with the class name at the end (csc off, class_token_position end)")
    return learned.ctx.detach().float().clone()


def build_tpt(clip: CLIP, classnames: Sequence[str], config: TPTConfig | None = None) -> TPT:
    """Registry builder of :class:`TPT`."""
    return TPT(clip, classnames, config)
