"""Run folders written by vlprompt 0.1: their config.json lacks the keys added since (crop_scale_min, optimizer,
adam_eps, activation_checkpointing). The one compatibility rule (harness.config.FORMER_VALUES) reads each missing key
as what 0.1 did, so such a folder is the same run as today's description of it: no conflict on resume or in a bench
plan, the same configuration hash and the same checkpoint (training identity) hash as 0.1 computed.

The configuration below is what 0.1 (commit 5415ade) wrote for `vlprompt train --method coop --dataset dtd --root
/data --shots 16` (produced with that commit's resolve_run_config(...).to_dict()); 0.1's config hash of it was
0ec7ceab40bdd3a7 and its checkpoints' train_config_hash 4a6ac54b6ba4618c.
"""

from __future__ import annotations

import json

import pytest
from run_folders import fake_run_folder

from vlprompt.errors import RunError
from vlprompt.harness.bench.protocols import ProtocolOptions, build_plan
from vlprompt.harness.bench.status import RunState, inspect_run
from vlprompt.harness.config import FORMER_VALUES, NON_IDENTITY_KEYS, RunConfig, with_former_values
from vlprompt.harness.pipeline import resolve_run_config
from vlprompt.harness.rundir import RunDir, config_differences, read_config, read_run_config
from vlprompt.training.config import TrainConfig, stable_hash, train_identity

CONFIG_01 = {
    "budget": False, "dataset": "dtd", "max_test_images": None, "method": "coop",
    "method_config": {"class_token_position": "end", "csc": False, "ctx_init": "", "fast_text": True, "n_ctx": 16},
    "model": "ViT-B/16", "protocol": None, "root": "/data", "seed": 1, "shots": 16, "skip_bad_images": False,
    "subset": "all",
    "train": {"batch_size": 32, "device": "auto", "epochs": 200, "lr": 0.002, "momentum": 0.9, "num_workers": 0,
              "precision": "fp32", "seed": 1, "tensorboard": False, "views": "epochs", "warmup_epochs": 1,
              "warmup_lr": 1e-05, "weight_decay": 0.0005},
}
HASH_01 = "0ec7ceab40bdd3a7"
TRAIN_HASH_01 = "4a6ac54b6ba4618c"


def today(**train) -> RunConfig:
    """The same command today (the fp32 0.1 default stated, as a resumed 0.1 run needs)."""
    return resolve_run_config(RunConfig(method="coop", dataset="dtd", root="/data", shots=16,
                                        train=TrainConfig(**train)))


def test_missing_keys_read_as_what_01_did(tmp_path):
    folder = fake_run_folder(tmp_path / "run", CONFIG_01, progress=True)
    saved = read_config(folder)
    assert saved == CONFIG_01  # read as written
    filled = with_former_values(saved)
    assert {key: filled["train"][key.split(".")[1]] for key in FORMER_VALUES} == dict(FORMER_VALUES)
    assert with_former_values(filled) == filled  # filling twice changes nothing
    wanted = today(precision="fp32").to_dict()
    assert config_differences(saved, wanted, ignore=NON_IDENTITY_KEYS) == []
    assert config_differences(saved, wanted, ignore=NON_IDENTITY_KEYS, stated_only=True) == []
    # an explicit value other than 0.1's is a different run
    other = today(precision="fp32", crop_scale_min=0.5).to_dict()
    assert config_differences(saved, other, ignore=NON_IDENTITY_KEYS) == [
        "train.crop_scale_min: saved 0.08, now 0.5"]


def test_a_01_folder_keeps_its_hashes(tmp_path):
    config = today(precision="fp32")
    assert config.config_hash() == HASH_01
    folder = fake_run_folder(tmp_path / "run", CONFIG_01)
    assert read_run_config(folder).config_hash() == HASH_01  # what eval / predict check its prompt against
    assert stable_hash(train_identity(config.train)) == TRAIN_HASH_01  # its checkpoints resume


def test_a_01_run_resumes(tmp_path):
    folder = fake_run_folder(tmp_path / "run", CONFIG_01, progress=True)
    with RunDir.create_or_open(folder, today(precision="fp32").to_dict(), resume=True,
                               ignore_keys=NON_IDENTITY_KEYS) as run:
        assert run.resumed
    # config.json now holds today's complete description of the same run
    assert RunConfig.from_dict(json.loads((folder / "config.json").read_text())).config_hash() == HASH_01


def test_the_changed_precision_default_is_named_with_the_way_out(tmp_path):
    folder = fake_run_folder(tmp_path / "run", CONFIG_01, progress=True)
    with pytest.raises(RunError, match=r"train.precision: saved 'fp32', now 'auto'.*give --precision fp32"):
        RunDir.create_or_open(folder, today().to_dict(), resume=True, ignore_keys=NON_IDENTITY_KEYS)


def test_a_bench_plan_sees_a_01_run_as_its_own(tmp_path):
    options = ProtocolOptions(out=tmp_path, root="/data", model="ViT-B/16", methods=("coop",), datasets=("dtd",),
                              shots=(16,), seeds=(1,), baselines=False, train=TrainConfig(precision="fp32"))
    (run,) = build_plan("fewshot", options)
    fake_run_folder(run.run_dir, {**CONFIG_01, "protocol": "fewshot", "model": "ViT-B/16"}, progress=True)
    status = inspect_run(run, tmp_path, check_busy=False)
    assert status.state is RunState.PARTIAL, status.detail
