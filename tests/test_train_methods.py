"""The training loop with the real CoOp and CoCoOp (vlprompt.methods) on a tiny random CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_standins import Interrupt, clustered_features, interrupt_after

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.training.config import TrainConfig
from vlprompt.evaluation.metrics import evaluate
from vlprompt.methods import METHODS
from vlprompt.harness.rundir import RunDir, load_params
from vlprompt.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSNAMES = ["banded", "dotted", "striped", "zigzagged"]


def _build(name: str, seed: int, **config):
    spec = METHODS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the run's seed fixes the initialisation
        return spec.build(build_tiny_clip("vit", seed=0), CLASSNAMES, spec.config_cls(**config))


def _loss(method, feats) -> float:
    with torch.no_grad():
        return F.cross_entropy(method(feats.features), feats.labels).item()


@pytest.mark.parametrize(("name", "config", "train_config", "per_class"), [
    ("coop", {"n_ctx": 4}, TrainConfig(epochs=4, batch_size=8, lr=0.01, precision="fp32"), 6),
    ("cocoop", {"n_ctx": 2}, TrainConfig(epochs=3, batch_size=1, lr=0.01, precision="fp32"), 2),
    ("kgcoop", {"template": "a {} pattern."}, TrainConfig(epochs=4, batch_size=8, lr=0.01, precision="fp32"), 6),
    ("prograd", {"n_ctx": 6}, TrainConfig(epochs=4, batch_size=8, lr=0.01, precision="fp32"), 6),
    ("tcp", {"class_token_layer": 1}, TrainConfig(epochs=4, batch_size=8, lr=0.01, optimizer="adam", adam_eps=1e-3,
                                                  precision="fp32"), 6),
])
def test_real_method_trains_resumes_exactly_and_changes_only_its_parameters(tmp_path, name, config, train_config,
                                                                           per_class):
    feats = clustered_features(num_classes=len(CLASSNAMES), per_class=per_class, dim=64)
    straight = _build(name, seed=1, **config)
    clip_before = {k: v.clone() for k, v in straight.clip.state_dict().items()}
    learned_before = {k: v.clone() for k, v in straight.state_dict().items()}
    loss_before = _loss(straight, feats)
    with RunDir.create_or_open(tmp_path / "straight", {"method": name, "dataset": "dtd"}) as run:
        train(straight, feats, train_config, run_dir=run)
    assert _loss(straight, feats) < loss_before
    assert all(not torch.equal(v, learned_before[k]) for k, v in straight.state_dict().items())
    assert all(torch.equal(v, clip_before[k]) for k, v in straight.clip.state_dict().items())

    with RunDir.create_or_open(tmp_path / "resumed", {"method": name, "dataset": "dtd"}) as run:
        with pytest.raises(Interrupt):
            train(_build(name, seed=1, **config), feats, train_config, run_dir=run, on_epoch_end=interrupt_after(2))
    resumed = _build(name, seed=7, **config)  # a different start: the checkpoint must replace it
    with RunDir.create_or_open(tmp_path / "resumed", {"method": name, "dataset": "dtd"}, resume=True) as run:
        train(resumed, feats, train_config, run_dir=run)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
        assert torch.equal(load_params(tmp_path / "resumed")[key], value), key

    # evaluation through the method's classifier agrees with the training path
    metrics = evaluate(straight.classifier(), feats.features, feats.labels, CLASSNAMES)
    with torch.no_grad():
        predicted = straight(feats.features).argmax(1)
    assert metrics["accuracy"] == 100 * int((predicted == feats.labels).sum()) / feats.labels.numel()
