"""The training loop: schedule, batches, learning, reproducibility, resume, divergence, precision, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train_standins import Features, Interrupt, LinearHead, clustered_features, interrupt_after, tiny_prompt
from torch import nn

from vlprompt.training.config import TrainConfig
from vlprompt.errors import CheckpointError, ConfigError, DatasetError, VlpromptError
from vlprompt.harness.rundir import RunDir, load_params
from vlprompt.common.vocab import derive_seed
from vlprompt.features.extract import epoch_view_indices
from vlprompt.training.loop import (TrainingDiverged, epoch_batches, lr_at_epoch, lr_schedule,
                            train)

CONFIG = TrainConfig(epochs=4, batch_size=8, precision="fp32")
pytestmark = pytest.mark.usefixtures("single_thread")


def _open(path, **kwargs) -> RunDir:
    return RunDir.create_or_open(path, {"method": "coop", "dataset": "dtd", "protocol": "test"}, **kwargs)


# -------------------------------------------------------------------------------------------------------- schedule


def test_lr_schedule_lists_the_reference_rates():
    # warm-up epoch at 1e-5, then the cosine starts at the full rate (it is not stepped during the warm-up)
    assert lr_schedule(TrainConfig(epochs=4)) == pytest.approx(
        [1e-5, 0.002, 0.002 * (0.5 + 0.5 * math.sqrt(0.5)), 0.001], rel=1e-12)
    assert lr_schedule(TrainConfig(epochs=3, warmup_epochs=0, lr=1.0)) == pytest.approx([1.0, 0.75, 0.25], rel=1e-12)


def test_lr_schedule_equals_dassl_stepping_of_torch_cosine():
    """Dassl: CosineAnnealingLR(T_max=epochs) inside a constant warm-up that steps it only after the warm-up."""
    config = TrainConfig(epochs=10, warmup_epochs=2, lr=0.002, warmup_lr=1e-5)
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=config.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    reference = []
    for epoch in range(config.epochs):
        if epoch < config.warmup_epochs:
            reference.append(config.warmup_lr)
            continue
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    assert lr_schedule(config) == pytest.approx(reference, rel=1e-12)
    assert lr_at_epoch(9, config) > 0.0  # the last epoch never reaches zero


def test_epoch_batches_follow_the_reference_loader():
    batches = epoch_batches(10, 4, seed=1, epoch=0)
    assert [b.numel() for b in batches] == [4, 4]  # the incomplete last batch is dropped
    assert len(set(torch.cat(batches).tolist())) == 8
    assert [b.numel() for b in epoch_batches(8, 4, 1, 0)] == [4, 4]
    assert [b.numel() for b in epoch_batches(3, 4, 1, 0)] == [3]  # fewer items than a batch: one smaller batch
    # the order depends only on (seed, epoch)
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(10, 4, seed=1, epoch=0)))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(10, 4, seed=1, epoch=1)))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(10, 4, seed=2, epoch=0)))
    assert derive_seed(1, "order", 0) != derive_seed(1, "forward", 0)


# -------------------------------------------------------------------------------------------------------- learning


def test_training_lowers_the_loss_and_changes_only_learned_parameters():
    feats = clustered_features()
    method = tiny_prompt()
    clip_before = {name: t.clone() for name, t in method.clip.state_dict().items()}
    ctx_before = method.ctx.detach().clone()
    with torch.no_grad():
        loss_before = F.cross_entropy(method(feats.features), feats.labels).item()
    rng_before = torch.get_rng_state()
    result = train(method, feats, CONFIG)
    with torch.no_grad():
        loss_after = F.cross_entropy(method(feats.features), feats.labels).item()
    assert loss_after < 0.8 * loss_before
    assert result.history[-1].loss < result.history[0].loss
    assert [s.lr for s in result.history] == pytest.approx(lr_schedule(CONFIG), rel=1e-12)
    assert not torch.equal(method.ctx, ctx_before) and method.ctx.dtype == torch.float32
    for name, tensor in method.clip.state_dict().items():
        assert torch.equal(tensor, clip_before[name]), name
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    assert not method.training


def test_same_seed_gives_identical_parameters_and_another_seed_does_not():
    feats = clustered_features()
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        method = tiny_prompt()
        train(method, feats, TrainConfig(epochs=3, batch_size=8, seed=seed, precision="fp32"))
        runs[name] = method.ctx.detach()
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])  # a different seed changes the data order


def test_each_image_cycles_through_its_views_in_a_seeded_order():
    views, per_class = 3, 4
    feats = clustered_features(num_classes=2, per_class=per_class, dim=8, views=views)
    n = feats.labels.numel()
    # feature 0 encodes (view, image): 1000 * view + image index
    feats.features[:, :, 0] = torch.arange(views).view(views, 1) * 1000.0 + torch.arange(n).view(1, n)
    seen: list[dict[int, int]] = [{}]

    class Recorder(LinearHead):
        def forward(self, features):
            for value in features[:, 0].round().long().tolist():
                seen[-1][value % 1000] = value // 1000
            return super().forward(features)

    config = TrainConfig(epochs=6, batch_size=4, lr=1e-6, seed=3, precision="fp32")
    train(Recorder(8, 2), feats, config, on_epoch_end=lambda s: seen.append({}))
    epochs = seen[:-1]
    assert all(len(epoch) == n for epoch in epochs)
    for image in range(n):
        sequence = [epoch[image] for epoch in epochs]
        assert sorted(sequence[:views]) == [0, 1, 2]  # every view once per V epochs
        assert sequence[views:] == sequence[:views]  # then the same cycle again
        assert all((b - a) % views == 1 for a, b in zip(sequence, sequence[1:]))
    assert [epoch_view_indices(views, n, 3, e).tolist() for e in range(6)] == \
        [[epoch[i] for i in range(n)] for epoch in epochs]
    other = [epoch_view_indices(views, n, 4, e).tolist() for e in range(views)]
    assert other != [[epoch[i] for i in range(n)] for epoch in epochs[:views]]  # another seed, another order
    assert epoch_view_indices(1, n, 3, 5).tolist() == [0] * n


# ---------------------------------------------------------------------------------------------------------- resume


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    feats = clustered_features()
    straight = tiny_prompt()
    with _open(tmp_path / "straight") as run:
        full = train(straight, feats, CONFIG, run_dir=run)

    with _open(tmp_path / "resumed") as run:
        with pytest.raises(Interrupt):
            train(tiny_prompt(), feats, CONFIG, run_dir=run, on_epoch_end=interrupt_after(2))
        assert json.loads((run.path / "state.json").read_text())["epoch"] == 2
    resumed_method = tiny_prompt(seed=99)  # a different initialisation: the checkpoint must replace it
    with _open(tmp_path / "resumed", resume=True) as run:
        assert run.resumed
        resumed = train(resumed_method, feats, CONFIG, run_dir=run)

    assert resumed.start_epoch == 2
    assert torch.equal(resumed_method.ctx, straight.ctx)
    assert [(s.epoch, s.lr, s.loss, s.accuracy) for s in resumed.history] == \
        [(s.epoch, s.lr, s.loss, s.accuracy) for s in full.history]
    a = load_file(tmp_path / "straight" / "optim.safetensors")
    b = load_file(tmp_path / "resumed" / "optim.safetensors")
    assert a.keys() == b.keys() == {"0.momentum_buffer"}
    assert torch.equal(a["0.momentum_buffer"], b["0.momentum_buffer"])
    assert torch.equal(load_params(tmp_path / "resumed")["ctx"], straight.ctx)


def test_resuming_a_completed_training_does_nothing(tmp_path):
    feats = clustered_features(per_class=2)
    with _open(tmp_path / "run") as run:
        train(LinearHead(64, 5), feats, CONFIG, run_dir=run)
    again = LinearHead(64, 5, seed=5)
    with _open(tmp_path / "run", resume=True) as run:
        result = train(again, feats, CONFIG, run_dir=run,
                       on_epoch_end=lambda s: pytest.fail("no epoch should run"))
    assert result.start_epoch == 4 and len(result.history) == 4
    assert torch.equal(again.weight, load_params(tmp_path / "run")["weight"])


def test_checkpoint_of_other_training_options_is_refused(tmp_path):
    feats = clustered_features(per_class=2)
    with _open(tmp_path / "run") as run:
        with pytest.raises(Interrupt):
            train(LinearHead(64, 5), feats, CONFIG, run_dir=run, on_epoch_end=interrupt_after(1))
    with _open(tmp_path / "run", resume=True) as run:
        with pytest.raises(CheckpointError, match="different training options"):
            train(LinearHead(64, 5), feats, TrainConfig(epochs=4, batch_size=8, lr=0.1, precision="fp32"), run_dir=run)


def test_run_folder_gets_log_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    feats = clustered_features(per_class=2)
    with _open(tmp_path / "run") as run:
        train(LinearHead(64, 5), feats, TrainConfig(epochs=2, batch_size=8, tensorboard=True, precision="fp32"),
              run_dir=run)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "epoch 1/2: loss" in log and "epoch 2/2: loss" in log
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# -------------------------------------------------------------------------------------------------------- failures


class _Poisoned(LinearHead):
    """Returns NaN logits once ``poisoned`` is set."""

    poisoned = False

    def forward(self, features):
        logits = super().forward(features)
        return logits * float("nan") if self.poisoned else logits


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    feats = clustered_features(per_class=8)
    method = _Poisoned(64, 5)
    snapshot = {}

    def poison_after_two(stats):
        if stats.epoch == 2:
            snapshot.update({k: v.clone() for k, v in method.state_dict().items()})
            method.poisoned = True

    with _open(tmp_path / "run") as run:
        with pytest.raises(TrainingDiverged) as caught:
            train(method, feats, CONFIG, run_dir=run, on_epoch_end=poison_after_two)
    message = str(caught.value)
    assert "loss is nan at epoch 3/4, step 1/5" in message
    assert f"lr {lr_at_epoch(2, CONFIG):g}" in message
    assert "last good checkpoint (epoch 2)" in message
    assert isinstance(caught.value, VlpromptError)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epoch"] == 2
    saved = load_params(tmp_path / "run")
    for name, tensor in snapshot.items():
        assert torch.equal(saved[name], tensor)
        assert torch.equal(method.state_dict()[name], tensor)  # the NaN update was not applied


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_learned_state_in_fp32(tmp_path, precision):
    feats = clustered_features()
    method = tiny_prompt()
    with _open(tmp_path / "run") as run:
        if precision == "fp16":
            with pytest.warns(UserWarning, match="fp16 autocast on the CPU is slow"):
                result = train(method, feats, TrainConfig(epochs=3, batch_size=8, precision=precision), run_dir=run)
        else:
            result = train(method, feats, TrainConfig(epochs=3, batch_size=8, precision=precision), run_dir=run)
    assert method.ctx.dtype == torch.float32
    assert load_file(tmp_path / "run" / "optim.safetensors")["0.momentum_buffer"].dtype == torch.float32
    assert result.history[-1].loss < result.history[0].loss
    scaler = json.loads((tmp_path / "run" / "state.json").read_text())["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")


def test_bad_input_gives_clear_errors():
    feats = clustered_features(per_class=2)
    with pytest.raises(ConfigError, match="must be set"):
        train(LinearHead(64, 5), feats, TrainConfig())
    frozen = LinearHead(64, 5).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(frozen, feats, CONFIG)
    with pytest.raises(ConfigError, match="must be float32"):
        train(LinearHead(64, 5).half(), feats, CONFIG)
    with pytest.raises(DatasetError, match=r"float tensor \[N, D\] or \[V, N, D\]"):
        train(LinearHead(64, 5), Features(feats.features[0], feats.labels), CONFIG)
    with pytest.raises(DatasetError, match="10 training feature rows but 9 labels"):
        train(LinearHead(64, 5), Features(feats.features, feats.labels[:9]), CONFIG)
    with pytest.raises(DatasetError, match="labels belong to the method's classes"):
        train(LinearHead(64, 3), feats, CONFIG)
    with pytest.raises(DatasetError, match="empty"):
        train(LinearHead(64, 5), Features(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), CONFIG)


@pytest.mark.parametrize("eps", [1e-3, 1e-8])
def test_adam_step_is_the_written_out_update_with_the_configured_epsilon(eps):
    """One Adam step (TCP's optimiser): p - lr * m_hat / (sqrt(v_hat) + eps), with L2 weight decay in the gradient."""
    feats = clustered_features(num_classes=5, per_class=4, dim=64)
    head = LinearHead(64, 5)
    start = {name: p.detach().clone() for name, p in head.named_parameters()}
    weight, bias = (t.clone().requires_grad_(True) for t in (start["weight"], start["bias"]))
    loss = F.cross_entropy(feats.features @ weight.t() + bias, feats.labels)
    grads = dict(zip(("weight", "bias"), torch.autograd.grad(loss, [weight, bias]), strict=True))
    config = TrainConfig(epochs=1, batch_size=20, lr=0.01, warmup_epochs=0, optimizer="adam", adam_eps=eps,
                         precision="fp32")
    train(head, feats, config)
    for name, param in head.named_parameters():
        g = grads[name] + 5e-4 * start[name]
        m_hat, v_hat = g, g * g  # first step: the bias corrections undo (1 - beta)
        expected = start[name] - 0.01 * m_hat / (v_hat.sqrt() + eps)
        assert (param.detach() - expected).abs().max() < 1e-6, name
