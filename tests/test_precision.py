"""`precision="auto"`: the measured choice is cached per machine identity and honoured, resolves to a concrete
precision that training, the feature cache and the results record; explicit precisions pass through.

The probe is injected everywhere, so no assertion depends on this CPU's speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_standins import LinearHead, clustered_features

from vlprompt.common import precision as prec
from vlprompt.errors import ConfigError
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RunDir
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train

RUN = RunConfig(method="coop", dataset="dtd").to_dict()  # a run folder needs a run configuration
BF16_FASTER = {"fp32_s": 2.0, "bf16_s": 1.0}
BF16_SLOWER = {"fp32_s": 1.0, "bf16_s": 2.0}


def probe_returning(timings: dict, calls: list | None = None):
    def probe(device: torch.device) -> dict:
        if calls is not None:
            calls.append(device)
        return timings

    return probe


def failing_probe(device: torch.device) -> dict:
    raise AssertionError("the cached answer should have been used")


def test_explicit_precisions_pass_through_and_bad_ones_are_refused(tmp_path):
    for name in ("fp32", "bf16", "fp16"):
        assert prec.resolve_precision(name, "cpu", probe=failing_probe, cache_dir=tmp_path) == name
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16"):
        prec.resolve_precision("bf32", "cpu", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="resolve 'auto'"):
        prec.autocast_for(torch.device("cpu"), "auto")
    assert not (tmp_path / prec.PROBE_FILE).exists()  # nothing measured for explicit precisions


def test_probe_runs_once_per_machine_and_its_answer_is_kept(tmp_path):
    calls: list = []
    assert prec.resolve_precision("auto", "cpu", probe=probe_returning(BF16_FASTER, calls), cache_dir=tmp_path) \
        == "bf16"
    assert len(calls) == 1
    saved = json.loads((tmp_path / prec.PROBE_FILE).read_text())
    (record,) = saved["machines"].values()
    assert record["precision"] == "bf16" and record["speedup"] == pytest.approx(2.0)
    assert record["identity"] == prec.machine_identity("cpu")
    assert record["identity"]["torch"] == torch.__version__ and record["identity"]["device"] == "cpu"
    # honoured: later calls read the file and never measure again, whatever a new measurement would say
    assert prec.resolve_precision("auto", "cpu", probe=failing_probe, cache_dir=tmp_path) == "bf16"
    assert len(calls) == 1


def test_slower_or_equal_bf16_stays_fp32(tmp_path):
    assert prec.resolve_precision("auto", "cpu", probe=probe_returning(BF16_SLOWER), cache_dir=tmp_path / "a") \
        == "fp32"
    barely = {"fp32_s": 1.05, "bf16_s": 1.0}  # within the noise margin: exact fp32 is kept
    assert prec.resolve_precision("auto", "cpu", probe=probe_returning(barely), cache_dir=tmp_path / "b") == "fp32"


def test_another_machine_identity_is_measured_again(tmp_path, monkeypatch):
    calls: list = []
    prec.resolve_precision("auto", "cpu", probe=probe_returning(BF16_FASTER, calls), cache_dir=tmp_path)
    real = prec.machine_identity
    monkeypatch.setattr(prec, "machine_identity", lambda device: {**real(device), "torch": "9.9.9"})
    assert prec.resolve_precision("auto", "cpu", probe=probe_returning(BF16_SLOWER, calls), cache_dir=tmp_path) \
        == "fp32"
    assert len(calls) == 2
    assert len(json.loads((tmp_path / prec.PROBE_FILE).read_text())["machines"]) == 2  # both machines kept


def test_default_probe_file_lives_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    assert prec.probe_path() == tmp_path / "precision" / "probe.json"
    prec.measured_choice("cpu", probe=probe_returning(BF16_FASTER))
    assert prec.resolve_precision("auto", "cpu", probe=failing_probe) == "bf16"


def test_the_real_probe_times_both_paths():
    timings = prec.matmul_probe(torch.device("cpu"), size=64, rounds=1)
    assert timings["fp32_s"] > 0 and timings["bf16_s"] > 0


def test_auto_is_the_default_and_resolves_to_a_recorded_precision_in_training(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    prec.measured_choice("cpu", probe=probe_returning(BF16_FASTER))  # this "machine" measured bf16 as faster
    assert TrainConfig().precision == "auto"
    feats = clustered_features(per_class=2)
    with RunDir.create_or_open(tmp_path / "run", RUN) as run:
        result = train(LinearHead(64, 5), feats, TrainConfig(epochs=2, batch_size=8), run_dir=run)
    assert result.precision == "bf16"
    assert json.loads((tmp_path / "run" / "state.json").read_text())["precision"] == "bf16"
    assert "precision bf16 (auto)" in (tmp_path / "run" / "log.txt").read_text()


class _Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def callback(stats) -> None:
        if stats.epoch == epoch:
            raise _Interrupt

    return callback


def test_resumed_auto_run_keeps_its_checkpoint_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "first"))
    prec.measured_choice("cpu", probe=probe_returning(BF16_FASTER))
    feats = clustered_features(per_class=2)
    config = TrainConfig(epochs=3, batch_size=8)
    with RunDir.create_or_open(tmp_path / "run", RUN) as run, pytest.raises(_Interrupt):
        train(LinearHead(64, 5), feats, config, run_dir=run, on_epoch_end=_stop_after(1))
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "second"))  # now the machine would say fp32
    prec.measured_choice("cpu", probe=probe_returning(BF16_SLOWER))
    with RunDir.create_or_open(tmp_path / "run", RUN, resume=True) as run:
        result = train(LinearHead(64, 5), feats, config, run_dir=run)
    assert result.start_epoch == 1 and result.precision == "bf16"
    # a new run on this machine gets the new answer
    assert train(LinearHead(64, 5), feats, config).precision == "fp32"


def test_feature_cache_keys_hold_the_concrete_precision(tmp_path, monkeypatch):
    from vlprompt.backbone.tiny import build_tiny_clip
    from vlprompt.data.types import Item
    from vlprompt.features.cache import FeatureCache
    from vlprompt.features.extract import extract_features

    fixtures = Path(__file__).parents[2] / "shared" / "fixtures" / "coop_data" / "dtd" / "images"
    if not fixtures.is_dir():
        pytest.skip("fixtures (../shared) absent")
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    prec.measured_choice("cpu", probe=probe_returning(BF16_FASTER))
    clip = build_tiny_clip("vit", seed=0)
    folder = sorted(p for p in fixtures.iterdir() if p.is_dir())[0]
    items = [Item(f"{folder.name}/{p.name}", 0) for p in sorted(folder.iterdir())[:3]]
    cache = FeatureCache(tmp_path / "features")
    fp32 = extract_features(clip, fixtures, items, precision="fp32", cache=cache)
    bf16 = extract_features(clip, fixtures, items, precision="bf16", cache=cache)
    assert cache.stats().rows == 6  # one row per image and precision: never served across precisions
    hits = cache.hits
    auto = extract_features(clip, fixtures, items, precision="auto", cache=cache)  # resolves to bf16 here
    assert cache.hits == hits + 3 and cache.stats().rows == 6
    assert torch.equal(auto.features, bf16.features)
    assert not torch.equal(fp32.features, bf16.features)


def test_a_run_records_the_precision_auto_resolved_to(tmp_path, monkeypatch):
    from vlprompt.backbone.tiny import build_tiny_clip
    from vlprompt.harness.pipeline import evaluate_run, run_experiment
    from vlprompt.harness.config import RunConfig

    root = Path(__file__).parents[2] / "shared" / "fixtures" / "coop_data"
    if not root.is_dir():
        pytest.skip("fixtures (../shared) absent")
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    prec.measured_choice("cpu", probe=probe_returning(BF16_FASTER))
    clip = build_tiny_clip("vit", seed=0)
    config = RunConfig(method="coop", dataset="dtd", root=str(root), shots=1, model="tiny-test",
                       method_config={"n_ctx": 2}, train=TrainConfig(epochs=2, device="cpu", views=1))
    payload = run_experiment(config, tmp_path / "run", clip=clip)
    assert payload["config"]["train"]["precision"] == "auto"  # what was asked for (the run's identity) ...
    assert payload["precision"] == "bf16" and payload["fit"]["precision"] == "bf16"  # ... and what ran
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["precision"] == "bf16"
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "precision bf16 (auto: measured on this machine)" in log
    for step in ("image features: ", "train: 2/2 epoch in ", "evaluate: "):  # every long step's progress line
        assert f"vlprompt.progress: {step}" in log, step
    assert evaluate_run(tmp_path / "run", dataset="oxford_flowers", clip=clip, precision="fp32")["precision"] == "fp32"
