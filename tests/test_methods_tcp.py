"""TCP: the class-aware tokens and where they enter the text tower, checked against an independent forward written
from the tokenised prompts; the knowledge term; novel classes; Adam as the recipe says.

Tolerances: the independent forward runs the same fp32 operations over all 77 positions (the method runs up to the
last EOT): features agree to ~1e-6 (summation order only), compared to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_standins import clustered_features

from vlprompt.backbone.tokenizer import get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.prompt_file import load_prompt, save_prompt
from vlprompt.methods.tcp import TCP, TCPConfig
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSNAMES = ["banded", "dotted", "striped", "zigzagged"]
CONFIG = TCPConfig(class_token_layer=1, template="a photo of a {}, a texture.", prompt_template="{}, a type of pattern.")


def _perturbed(method: TCP) -> TCP:
    """Move every learned tensor away from its initialisation (the tests must not pass by a zero or a symmetry)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in method.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return method


def _independent_features(clip, method: TCP, classnames: list[str], layer: int) -> torch.Tensor:
    """Text features written from the tokenised prompts "X X X X <prompt_template(name)>": context at positions 1-4,
    the class tokens W2 QuickGELU(W1 c + b1) + b2 of the hand-crafted feature c replacing them before block ``layer``."""
    tokenizer = get_tokenizer()
    ids = tokenizer([f"X X X X {method.config.prompt_template.format(name)}" for name in classnames],
                    context_length=77)
    crafted = tokenizer([method.config.template.format(name) for name in classnames], context_length=77)
    with torch.no_grad():
        c = F.normalize(clip.encode_text(crafted), dim=-1)
        w1, b1 = method.meta_net.linear1.weight, method.meta_net.linear1.bias
        w2, b2 = method.meta_net.linear2.weight, method.meta_net.linear2.bias
        hidden = c @ w1.t() + b1
        tokens = ((hidden * torch.sigmoid(1.702 * hidden)) @ w2.t() + b2).view(len(classnames), 4, -1)
        x = clip.token_embedding(ids)
        x[:, 1:5] = method.ctx
        x = x + clip.positional_embedding
        for index, block in enumerate(clip.transformer.resblocks):
            if index == layer:
                x[:, 1:5] = tokens
            x = block(x, causal=True)
        return clip.ln_final(x[torch.arange(len(classnames)), ids.argmax(-1)]) @ clip.text_projection


@pytest.mark.parametrize("fast_text", [True, False])
def test_text_features_match_an_independent_forward(clip, fast_text):
    import dataclasses

    method = _perturbed(TCP(clip, CLASSNAMES, dataclasses.replace(CONFIG, fast_text=fast_text)))
    with torch.no_grad():
        ours = method.text_features()
    expected = _independent_features(clip, method, CLASSNAMES, layer=1)
    assert ours.shape == (4, clip.config.embed_dim)
    assert (ours - expected).abs().max() < 1e-5


def test_tokens_at_the_first_layer_leave_the_context_without_influence(clip):
    """Replaced at block 0's input, the context positions are overwritten before any attention reads them."""
    method = _perturbed(TCP(clip, CLASSNAMES, TCPConfig(class_token_layer=0)))
    method.ctx.grad = None
    method.text_features().sum().backward()
    assert method.ctx.grad is None or float(method.ctx.grad.abs().max()) == 0.0
    assert float(method.meta_net.linear2.weight.grad.abs().max()) > 0
    deeper = _perturbed(TCP(clip, CLASSNAMES, TCPConfig(class_token_layer=1)))
    deeper.text_features().sum().backward()
    assert float(deeper.ctx.grad.abs().max()) > 0  # from layer 1 on, block 0 carries the context forward


def test_prompts_learned_state_and_the_knowledge_term(clip):
    method = TCP(clip, CLASSNAMES, CONFIG)
    tokenizer = get_tokenizer()
    ids = method.layout.layout_ids()
    assert tokenizer.decode(ids[1, : int(method.layout.eot_index[1]) + 1].tolist()) == \
        "<|startoftext|>x x x x dotted , a type of pattern . <|endoftext|>"
    dim, width = clip.config.embed_dim, clip.config.transformer_width
    assert {k: tuple(v.shape) for k, v in method.state_dict().items()} == {
        "ctx": (4, width), "meta_net.linear1.weight": (dim // 4, dim), "meta_net.linear1.bias": (dim // 4,),
        "meta_net.linear2.weight": (4 * width, dim // 4), "meta_net.linear2.bias": (4 * width,)}
    method.train()
    features = torch.randn(5, dim, generator=torch.Generator().manual_seed(0))
    logits = method(features)
    with torch.no_grad():
        text = F.normalize(method.text_features(), dim=-1)
        expected_logits = clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()
        cos = (text * method.handcrafted).sum(-1)
    assert (logits - expected_logits).abs().max() < 1e-4
    assert abs(method.regularizer().item() - 8.0 * (1.0 - float(cos.mean()))) < 1e-5


def test_novel_classes_get_tokens_from_their_own_embeddings(clip, tmp_path):
    method = _perturbed(TCP(clip, CLASSNAMES, CONFIG))
    novel = ["cat", "golden retriever", "sea or lake"]
    moved = method.with_classnames(novel)
    with torch.no_grad():
        ours = moved.text_features()
    assert (ours - _independent_features(clip, method, novel, layer=1)).abs().max() < 1e-5
    path = save_prompt(method, tmp_path / "tcp.safetensors")
    loaded = load_prompt(path, clip, classnames=novel)
    assert isinstance(loaded, TCP) and loaded.classnames == novel
    with torch.no_grad():
        assert (loaded.text_features() - ours).abs().max() == 0


def test_training_with_the_recipes_adam_lowers_the_loss(clip):
    feats = clustered_features(num_classes=len(CLASSNAMES), per_class=6, dim=clip.config.embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the initialisation draws from torch's RNG: fixed here, whatever ran before
        method = TCP(clip, CLASSNAMES, CONFIG)
    with torch.no_grad():
        before = F.cross_entropy(method(feats.features), feats.labels).item()
    config = TrainConfig(epochs=8, batch_size=8, lr=0.01, optimizer="adam", adam_eps=1e-3, precision="fp32")
    result = train(method, feats, config)
    with torch.no_grad():
        after = F.cross_entropy(method(feats.features), feats.labels).item()
    assert after < before and len(result.history) == 8


def test_bad_configurations_are_refused(clip):
    with pytest.raises(ConfigError, match="class_token_layer 8 is not a text block"):
        TCP(clip, CLASSNAMES, TCPConfig())  # the tiny CLIP has 2 text blocks; the official layer 8 needs 9+
    with pytest.raises(ConfigError, match="TCPConfig"):
        TCP(clip, CLASSNAMES, object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reduction"):
        TCP(clip, CLASSNAMES, TCPConfig(class_token_layer=1, reduction=1000))
