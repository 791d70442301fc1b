"""`vlprompt.harness.pipeline`: configuration resolution, run_experiment's flow and files, evaluate_run, locking, failures after
training (resume evaluates only), budget marks, on the fixture photographs with a tiny random CLIP object."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import torch
from support import FIXTURES, needs_fixtures, read_json

import vlprompt.stages
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.harness.config import RunConfig
from vlprompt.training.config import TrainConfig
from vlprompt.errors import CheckpointError, ConfigError, DatasetError, RunError
from vlprompt.harness.rundir import EvalSpec, eval_name, reading_lock
from vlprompt.harness.pipeline import (
    evaluate_run,
    open_trained_run,
    resolve_run_config,
    run_experiment,
)
from vlprompt.harness.rundir import RunDir, load_params



pytestmark = pytest.mark.usefixtures("private_cache")


def config_of(method: str, **kwargs) -> RunConfig:
    defaults = {"dataset": "dtd", "root": str(FIXTURES), "shots": 2, "seed": 1, "model": "tiny-test",
                "train": TrainConfig(epochs=2, device="cpu", precision="fp32")}
    return RunConfig(method=method, **{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------- resolution


def test_resolve_run_config_fills_the_method_config_and_defaults():
    resolved = resolve_run_config(RunConfig(method="coop", dataset="dtd", shots=2, method_config={"n_ctx": 4}))
    assert resolved.to_dict()["method_config"] == {"n_ctx": 4, "ctx_init": "", "csc": False,
                                                   "class_token_position": "end", "fast_text": True}
    assert (resolved.train.epochs, resolved.train.batch_size) == (100, 32)  # CoOp: 100 epochs for 2 shots
    cocoop = resolve_run_config(RunConfig(method="cocoop", dataset="dtd"))
    assert (cocoop.train.epochs, cocoop.train.batch_size) == (10, 1)
    assert cocoop.method_config.ctx_init == "a photo of a"
    zeroshot = resolve_run_config(RunConfig(method="zeroshot", dataset="dtd", shots=16))
    assert zeroshot.shots == 0 and zeroshot.to_dict()["method_config"] == {"template": ""}
    assert zeroshot.train.epochs is None  # nothing to train
    assert resolve_run_config(resolved) == resolved  # idempotent: a resumed run resolves to the same config


def test_resolve_run_config_errors():
    with pytest.raises(ConfigError, match="unknown method 'coap'"):
        resolve_run_config(RunConfig(method="coap", dataset="dtd"))
    with pytest.raises(ConfigError, match="method coop: unknown CoOpConfig field"):
        resolve_run_config(RunConfig(method="coop", dataset="dtd", method_config={"n_context": 4}))
    with pytest.raises(ConfigError, match="n_ctx must be a positive integer"):
        resolve_run_config(RunConfig(method="coop", dataset="dtd", method_config={"n_ctx": 0}))


def test_eval_spec_and_names():
    assert eval_name("oxford_flowers", "all") == "oxford_flowers"
    assert eval_name("dtd", "new") == "dtd-new"
    assert eval_name("my data/set", "base") == "my_data_set-base"
    with pytest.raises(ConfigError, match="subset"):
        EvalSpec("dtd", "novel")
    with pytest.raises(ConfigError, match="invalid evaluation name"):
        EvalSpec("dtd", name="../x")
    with pytest.raises(ConfigError, match="dataset"):
        EvalSpec("")


# ---------------------------------------------------------------------------------------------------- experiments


@needs_fixtures
def test_zero_shot_base_to_novel_run(clip, tmp_path):
    out = tmp_path / "zs"
    config = config_of("zeroshot", subset="base", budget=True)
    payload = run_experiment(config, out, clip=clip, evals=[EvalSpec("dtd", "new"), EvalSpec("dtd", "base")],
                             feature_cache=False)
    assert payload == read_json(out / "results.json")
    assert payload["subset"] == "base" and payload["budget"] is True and payload["shots"] == 0
    assert list(payload["metrics"]["per_class_accuracy"]) == ["banded", "blotchy", "braided"]  # ceil(5 / 2) base
    assert payload["metrics"]["num_samples"] == 9
    novel = read_json(out / "eval-dtd-new.json")
    assert novel["subset"] == "new" and novel["budget"] is True
    assert list(novel["metrics"]["per_class_accuracy"]) == ["bubbly", "bumpy"]
    assert not (out / "eval-dtd-base.json").exists()  # the run's own test set is results.json
    assert not (out / "fewshot.json").exists()  # zero-shot samples nothing
    assert not (tmp_path / "cache").exists()  # feature_cache=False


@needs_fixtures
def test_zero_shot_uses_the_target_template_across_datasets(clip, tmp_path):
    out = tmp_path / "zs"
    run_experiment(config_of("zeroshot"), out, clip=clip, evals=[EvalSpec("oxford_flowers")])
    flowers = read_json(out / "eval-oxford_flowers.json")
    # the same number as zero-shot CLIP run directly on Flowers102 with its own hand-crafted template
    direct = run_experiment(config_of("zeroshot", dataset="oxford_flowers"), tmp_path / "direct", clip=clip)
    assert flowers["metrics"] == direct["metrics"]


@needs_fixtures
def test_sgd_run_and_evaluate_run(clip, tmp_path):
    out = tmp_path / "coop"
    config = config_of("coop", method_config={"n_ctx": 2},
                       train=TrainConfig(epochs=2, lr=0.05, device="cpu", precision="fp32"))
    seen = []
    payload = run_experiment(config, out, clip=clip, on_epoch_end=seen.append)
    assert [stats.epoch for stats in seen] == [1, 2]
    assert payload["fit"]["epochs"] == 2 and payload["timing"]["train_s"] > 0
    assert read_json(out / "config.json") == payload["config"]

    cross = evaluate_run(out, dataset="oxford_flowers", clip=clip)
    assert cross == read_json(out / "eval-oxford_flowers.json")
    assert cross["eval_dataset"] == "oxford_flowers" and cross["metrics"]["num_samples"] == 15
    assert set(cross["timing"]) == {"feature_s", "eval_s"}
    named = evaluate_run(out, dataset="Flowers102", subset="new", name="flowers-novel", clip=clip)
    assert (out / "eval-flowers-novel.json").is_file() and named["subset"] == "new"
    with pytest.raises(ConfigError, match="own test set"):
        evaluate_run(out, clip=clip)

    trained = open_trained_run(out, clip=clip)
    assert trained.config.method == "coop" and trained.method.classnames[0] == "banded"
    assert torch.equal(trained.method.ctx.detach().cpu(), load_params(out)["ctx"])  # prompt file = last checkpoint
    with pytest.raises(CheckpointError, match="fingerprint"):
        open_trained_run(out, clip=build_tiny_clip("vit", seed=3))


@needs_fixtures
def test_a_failure_after_training_keeps_the_parameters_and_resume_only_evaluates(clip, tmp_path, monkeypatch):
    out = tmp_path / "coop"
    config = config_of("coop", method_config={"n_ctx": 2},
                       train=TrainConfig(epochs=2, lr=0.05, device="cpu", precision="fp32"))
    real_score = vlprompt.stages.score

    def broken_score(*args, **kwargs):
        raise DatasetError("evaluation broke")

    monkeypatch.setattr(vlprompt.stages, "score", broken_score)
    with pytest.raises(DatasetError, match="evaluation broke"):
        run_experiment(config, out, clip=clip)
    assert read_json(out / "state.json")["epoch"] == 2 and (out / "prompt.safetensors").is_file()
    assert not (out / "results.json").exists()
    with pytest.raises(RunError, match="--resume"):
        run_experiment(config, out, clip=clip)

    monkeypatch.setattr(vlprompt.stages, "score", real_score)
    seen = []
    payload = run_experiment(config, out, clip=clip, resume=True, on_epoch_end=seen.append)
    assert seen == []  # nothing trained again
    assert payload["fit"]["resumed_after_epoch"] == 2 and payload["fit"]["epochs"] == 2


@needs_fixtures
def test_evaluation_failures_are_reported_with_the_way_out(clip, tmp_path, monkeypatch):
    out = tmp_path / "zs"
    calls = []
    real_score = vlprompt.stages.score

    def score_once(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise DatasetError("target images broke")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(vlprompt.stages, "score", score_once)
    with pytest.raises(RunError, match=r"finished \(results.json\); evaluate again with `vlprompt eval"):
        run_experiment(config_of("zeroshot"), out, clip=clip, evals=[EvalSpec("oxford_flowers")])
    assert (out / "results.json").is_file() and not (out / "eval-oxford_flowers.json").exists()


@needs_fixtures
def test_user_errors_before_the_run_folder_is_made(clip, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(DatasetError, match="unknown dataset"):
        run_experiment(config_of("coop", dataset="nosuch"), out, clip=clip)
    with pytest.raises(DatasetError, match="unknown dataset"):
        run_experiment(config_of("coop"), out, clip=clip, evals=[EvalSpec("nosuch")])
    with pytest.raises(ConfigError, match="both write eval-x.json"):
        run_experiment(config_of("zeroshot"), out, clip=clip,
                       evals=[EvalSpec("oxford_flowers", name="x"), EvalSpec("dtd", "new", name="x")])
    with pytest.raises(ConfigError, match="EvalSpec"):
        run_experiment(config_of("zeroshot"), out, clip=clip, evals=["oxford_flowers"])  # type: ignore[list-item]
    assert not out.exists()


@needs_fixtures
def test_evaluate_run_refuses_unfinished_and_foreign_folders(clip, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        evaluate_run(tmp_path / "nothing", clip=clip)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="not a run folder"):
        evaluate_run(tmp_path / "plain", clip=clip)
    config = resolve_run_config(config_of("coop"))
    with RunDir.create_or_open(tmp_path / "fresh", config.to_dict()):
        pass
    with pytest.raises(RunError, match="no learned prompt"):
        evaluate_run(tmp_path / "fresh", dataset="oxford_flowers", clip=clip)


def test_reading_locks_are_shared_and_exclude_training(tmp_path):
    folder = tmp_path / "run"
    with RunDir.create_or_open(folder, {"method": "coop", "dataset": "dtd"}):
        with pytest.raises(RunError, match="in use by another process"):
            with reading_lock(folder):
                pass
    with reading_lock(folder), reading_lock(folder):  # any number of readers at once
        fd = os.open(folder / "run.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # what RunDir's exclusive lock meets while anyone reads
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        with pytest.raises(RunError, match="in use"):
            RunDir.create_or_open(folder, {"method": "coop", "dataset": "dtd"}, resume=True)
    with reading_lock(tmp_path):  # no run.lock: nothing to exclude
        pass


@needs_fixtures
def test_max_test_images_caps_every_evaluation(clip, tmp_path):
    config = config_of("zeroshot", max_test_images=7, budget=True)
    payload = run_experiment(config, tmp_path / "run", clip=clip, evals=[EvalSpec("oxford_flowers")])
    assert payload["metrics"]["num_samples"] == 7
    assert sum(map(sum, payload["metrics"]["confusion_matrix"])) == 7
    extra = read_json(tmp_path / "run" / "eval-oxford_flowers.json")
    assert extra["metrics"]["num_samples"] == 7 and extra["budget"] is True
    full = run_experiment(config_of("zeroshot"), tmp_path / "full", clip=clip)
    assert full["metrics"]["num_samples"] == 15  # the fixture's DTD test split: 5 classes x 3


def _photo_folder(root: Path, broken: str) -> Path:
    """A custom dataset (a folder per class, train/ and test/) made of fixture photos, one file replaced by junk."""
    import shutil

    sources = sorted((FIXTURES / "dtd" / "images").glob("*/*.jpg"))
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("banded", "bumpy"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            picks = [p for p in sources if p.parent.name == cls][:count] if split == "train" else \
                [p for p in sources if p.parent.name == cls][-count:]
            for src in picks:
                shutil.copy(src, folder / src.name)
    (root / broken).write_bytes(b"this is not a JPEG")
    return root


@needs_fixtures
def test_unreadable_images_stop_the_run_or_are_skipped_and_counted(clip, tmp_path):
    data = _photo_folder(tmp_path / "photos", "test/bumpy/broken.jpg")
    config = RunConfig(method="zeroshot", dataset=f"folder:{data}", model="tiny-test",
                       train=TrainConfig(device="cpu", precision="fp32"))
    with pytest.raises(DatasetError, match="broken.jpg"):
        run_experiment(config, tmp_path / "strict", clip=clip)
    assert not (tmp_path / "strict" / "results.json").exists()
    skipping = RunConfig(**{**config.__dict__, "skip_bad_images": True})
    payload = run_experiment(skipping, tmp_path / "lenient", clip=clip)
    assert payload["skipped_images"] == {"count": 1, "paths": ["test/bumpy/broken.jpg"]}
    assert payload["metrics"]["num_samples"] == 4  # 2 classes x 2 readable test photos
    assert read_json(tmp_path / "lenient" / "results.json")["skipped_images"]["count"] == 1


@needs_fixtures
def test_an_evaluation_can_be_labelled_with_another_protocol(clip, tmp_path):
    config = config_of("zeroshot", protocol="crossdataset")
    run_experiment(config, tmp_path / "run", clip=clip,
                   evals=[EvalSpec("oxford_flowers", protocol="domainshift"), EvalSpec("oxford_flowers", name="plain")])
    assert read_json(tmp_path / "run" / "results.json")["protocol"] == "crossdataset"
    assert read_json(tmp_path / "run" / "eval-oxford_flowers.json")["protocol"] == "domainshift"
    assert read_json(tmp_path / "run" / "eval-plain.json")["protocol"] == "crossdataset"
    payload = evaluate_run(tmp_path / "run", dataset="oxford_flowers", name="again", protocol="domainshift", clip=clip)
    assert payload["protocol"] == "domainshift" == read_json(tmp_path / "run" / "eval-again.json")["protocol"]
