"""Linear probe: the reference's C search, the fitted Linear reproducing sklearn, and input checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.methods.linear_probe import LinearProbe, LinearProbeConfig, search_c

D = 16  # image feature width of the tiny CLIP built below (small: the sweep makes 20+ sklearn fits)


@dataclass
class Features:
    features: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("vit", seed=0, embed_dim=D)


def _blobs(per_class: int, classes: int, seed: int, spread: float = 1.5) -> Features:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, D, generator=torch.Generator().manual_seed(100)) * 0.6
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), D, generator=generator) / math.sqrt(D) * 4
    return Features(features, labels)


def test_search_follows_the_reference_procedure(clip):
    train, val = _blobs(4, 3, seed=1), _blobs(4, 3, seed=2)
    method = LinearProbe(clip, ["a", "b", "c"])
    info = method.fit(train, val)
    coarse = info["coarse"]
    assert [c for c, _ in coarse] == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    accuracies = [acc for _, acc in coarse]
    peak = coarse[int(np.argmax(accuracies))][0]
    refine = info["refine"]
    assert len(refine) == 8
    assert refine[0][0] == pytest.approx(peak / 10) and refine[0][2] == pytest.approx(peak * 10)
    chosen = None
    for (left, acc_left, right, acc_right), following in zip(refine, [*refine[1:], None], strict=True):
        middle = 10 ** ((math.log10(left) + math.log10(right)) / 2)
        chosen = right if acc_left < acc_right else left
        if following is not None:  # the interval halves towards the better end
            expected = (middle, right) if acc_left < acc_right else (left, middle)
            assert following[0] == pytest.approx(expected[0]) and following[2] == pytest.approx(expected[1])
    assert info["c"] == chosen
    # every accuracy in the record is a real validation accuracy of that C
    x_train, x_val = train.features.double().numpy(), val.features.double().numpy()
    for c, acc in coarse[:3]:
        model = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x_train, train.labels.numpy())
        assert acc == pytest.approx(100 * np.mean(model.predict(x_val) == val.labels.numpy()))


def test_fitted_layer_reproduces_sklearn(clip):
    train, val = _blobs(6, 4, seed=3), _blobs(3, 4, seed=4)
    method = LinearProbe(clip, ["a", "b", "c", "d"])
    info = method.fit(train, val)
    reference = LogisticRegression(solver="lbfgs", max_iter=1000, C=info["c"]).fit(
        train.features.double().numpy(), train.labels.numpy())
    expected = torch.from_numpy(reference.decision_function(val.features.double().numpy())).float()
    logits = method(val.features)
    # fp32 weights vs sklearn's float64: relative error ~1e-7 of |logits| (<= ~50 here)
    assert (logits - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())
    assert torch.allclose(method.classifier()(val.features), logits)
    assert info["val_accuracy"] == pytest.approx(100 * (logits.argmax(1) == val.labels).float().mean().item())
    assert list(method.state_dict()) == ["linear.weight", "linear.bias"]


def test_separable_classes_are_learned(clip):
    train, val = _blobs(8, 5, seed=5, spread=0.2), _blobs(8, 5, seed=6, spread=0.2)
    method = LinearProbe(clip, list("abcde"))
    info = method.fit(train, val)
    assert info["val_accuracy"] == 100.0 and info["converged"]


def test_two_classes_give_the_sigmoid_probabilities(clip):
    train, test = _blobs(6, 2, seed=7), _blobs(5, 2, seed=8)
    method = LinearProbe(clip, ["no", "yes"], LinearProbeConfig(c=0.5))
    info = method.fit(train)
    assert info["c"] == 0.5 and info["val_accuracy"] is None
    reference = LogisticRegression(solver="lbfgs", max_iter=1000, C=0.5).fit(
        train.features.double().numpy(), train.labels.numpy())
    probabilities = torch.softmax(method(test.features), dim=1)
    expected = torch.from_numpy(reference.predict_proba(test.features.double().numpy())).float()
    assert (probabilities - expected).abs().max().item() < 1e-5


def test_normalize_option_feeds_unit_features(clip):
    train = _blobs(4, 3, seed=9)
    method = LinearProbe(clip, ["a", "b", "c"], LinearProbeConfig(c=1.0, normalize=True))
    method.fit(train)
    scaled = Features(train.features * 10.0, train.labels)
    assert torch.allclose(method(train.features), method(scaled.features), atol=1e-5)


def test_search_c_directly_memoises_fits():
    data = _blobs(4, 3, seed=10)
    x, y = data.features.double().numpy(), data.labels.numpy()
    c, model, accuracy, record = search_c(x, y, x, y, LinearProbeConfig(search_steps=0))
    assert record["refine"] == [] and c in LinearProbeConfig().c_grid
    assert accuracy == pytest.approx(100 * np.mean(model.predict(x) == y))


def test_bad_input(clip):
    method = LinearProbe(clip, ["a", "b", "c"])
    train = _blobs(2, 3, seed=11)
    with pytest.raises(ConfigError, match="validation split"):
        method.fit(train)
    with pytest.raises(DatasetError, match="no training features"):
        method.fit(Features(train.features[:4], train.labels[:4]), train)
    with pytest.raises(DatasetError, match="augmented views"):
        method.fit(Features(train.features[None], train.labels), train)
    with pytest.raises(DatasetError, match="outside"):
        method.fit(Features(train.features, train.labels + 1), train)
    with pytest.raises(DatasetError, match="width"):
        method.fit(Features(train.features[:, :10], train.labels), train)
    with pytest.raises(ConfigError, match="class list is empty"):
        LinearProbe(clip, [])
    with pytest.raises(ConfigError, match="positive"):
        LinearProbeConfig(c=-1.0)
    with pytest.raises(ConfigError, match="cannot classify"):
        method.with_classnames(["x", "y", "z"])
