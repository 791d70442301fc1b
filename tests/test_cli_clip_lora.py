"""CLIP-LoRA end to end through the command line on the fixture photographs with a tiny random CLIP: train (images
through both adapted towers, a length in optimiser steps), eval, predict, merge (the merged checkpoint is a --model
like any CLIP and gives the run's accuracy), a --budget bench of few-shot and base-to-novel, and a run killed with
SIGKILL then resumed, which ends with the factors of an uninterrupted run (CPU, bit for bit).

dtd's fixture has 5 classes x 4 training images: at 2 shots and batch 4, 2 steps an epoch, so 7 steps are 4 epochs,
the last one cut to a single step.
"""

from __future__ import annotations

import json
import os

import pytest
from clip_formats import save_openai_state_dict
from safetensors.torch import load_file
from support import FIXTURES, kill_and_resume, needs_fixtures

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.data import load_dataset
from vlprompt.harness.cli.main import main

pytestmark = needs_fixtures

COMMON = ["--dataset", "dtd", "--shots", "2", "--seed", "1", "--device", "cpu", "--num-workers", "0", "--precision",
          "fp32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-lora")
    patch = pytest.MonkeyPatch()
    patch.setenv("VLPROMPT_CACHE", str(base / "cache"))
    patch.setenv("VLPROMPT_DATA_ROOT", str(FIXTURES))
    model = save_openai_state_dict(build_tiny_clip("vit", seed=0), base / "tiny.pt")
    yield {"base": base, "model": str(model)}
    patch.undo()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(env):
    out = env["base"] / "runs" / "lora"
    code = main([str(a) for a in ("train", "--method", "clip_lora", *COMMON, "--steps", "7", "--model",
                                  env["model"], "--out", out, "--also-eval", "oxford_flowers", "-q")])
    assert code == 0
    return out


def test_train_records_the_recipe_and_evaluates_elsewhere(trained, env, capsys):
    results = json.loads((trained / "results.json").read_text())
    assert results["fit"]["kind"] == "images" and results["fit"]["epochs"] == 4
    train = results["config"]["train"]
    assert (train["steps"], train["epochs"], train["optimizer"], train["lr"], train["weight_decay"],
            train["warmup_epochs"], train["min_lr"]) == (7, None, "adamw", 2e-4, 1e-2, 0, 1e-6)
    assert results["config"]["method_config"]["rank"] == 2
    assert (trained / "eval-oxford_flowers.json").is_file()
    prompt = load_file(trained / "prompt.safetensors")
    assert all(key.endswith((".a", ".b")) for key in prompt)  # the factors only
    code, _, err = run_cli(capsys, "eval", trained, "--subset", "new")
    assert code == 0, err


def test_predict_and_the_merged_checkpoint_reproduce_the_runs_accuracy(trained, env, capsys, tmp_path):
    results = json.loads((trained / "results.json").read_text())
    test = load_dataset("dtd", FIXTURES).test
    classes = load_dataset("dtd", FIXTURES).classnames
    paths = [str(FIXTURES / "dtd" / "images" / item.path) for item in test]

    def accuracy(predictions):
        correct = sum(p["top_k"][0]["label"] == classes[item.label] for p, item in zip(predictions, test,
                                                                                        strict=True))
        return 100.0 * correct / len(test)

    code, printed, err = run_cli(capsys, "predict", trained, *paths, "--json", "-q")
    assert code == 0, err
    assert accuracy(json.loads(printed)["predictions"]) == pytest.approx(results["metrics"]["accuracy"])

    merged = tmp_path / "merged.safetensors"
    code, printed, err = run_cli(capsys, "merge", trained, "--out", merged, "-q")
    assert code == 0, err
    assert f"wrote {merged}" in printed and merged.is_file()
    # the merged CLIP classifies zero-shot with the run's template as the run does
    code, printed, err = run_cli(capsys, "predict", "--model", merged, "--classes", ",".join(classes), "--template",
                                 "a photo of a {}.", *paths, "--json", "-q", "--device", "cpu")
    assert code == 0, err
    assert accuracy(json.loads(printed)["predictions"]) == pytest.approx(results["metrics"]["accuracy"])
    code, _, err = run_cli(capsys, "merge", trained, "--out", merged, "-q")
    assert code == 2 and "pass --overwrite" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "merge", trained, "--out", merged, "--overwrite", "-q")
    assert code == 0, err


def test_merge_errors_are_clear(trained, env, capsys, tmp_path):
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"not ours")
    code, _, err = run_cli(capsys, "merge", trained, "--out", precious, "--overwrite")
    assert code == 2 and "not a merged checkpoint written by vlprompt merge" in err
    assert precious.read_bytes() == b"not ours"
    code, _, err = run_cli(capsys, "merge", tmp_path, "--out", tmp_path / "x.safetensors")
    assert code == 2 and "is not a run folder" in err
    zeroshot = env["base"] / "runs" / "zs"
    code, _, err = run_cli(capsys, "train", "--method", "zeroshot", "--dataset", "dtd", "--device", "cpu",
                           "--model", env["model"], "--out", zeroshot, "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", zeroshot, "--out", tmp_path / "zs.safetensors")
    assert code == 2 and "not a clip_lora method" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "train", "--method", "clip_lora", *COMMON, "--steps", "3", "--epochs", "2",
                           "--model", env["model"], "--out", tmp_path / "both")
    assert code == 2 and "not both" in err


def test_through_the_api(env, tmp_path):
    import vlprompt.api as vp

    clip = vp.load_clip(env["model"])
    data = vp.load_dataset("dtd", FIXTURES)
    lora = vp.build_method("clip_lora", clip, data)
    zero = vp.evaluate(lora, data, precision="fp32", feature_cache=False)  # B = 0: zero-shot CLIP
    zeroshot = vp.build_method("zeroshot", clip, data, template="a photo of a {}.")
    assert zero["accuracy"] == vp.evaluate(zeroshot, data, precision="fp32", feature_cache=False)["accuracy"]
    fitted = vp.fit(lora, data, shots=2, steps=3, batch_size=4, precision="fp32", num_workers=0,
                    feature_cache=False)
    assert fitted.kind == "images" and len(fitted.history) == 2  # 10 images, batch 4: 2 steps an epoch
    merged = vp.load_clip(vp.merge(lora, tmp_path / "api.safetensors"))
    adapted = vp.evaluate(lora, data, precision="fp32", feature_cache=False)
    plain = vp.evaluate(vp.build_method("zeroshot", merged, data, template="a photo of a {}."), data,
                        precision="fp32", feature_cache=False)
    assert plain["accuracy"] == pytest.approx(adapted["accuracy"])


@pytest.mark.slow
def test_budget_benches_of_clip_lora(env, tmp_path, capsys):
    out = tmp_path / "bench"
    for protocol, extra in (("fewshot", ["--shots", "1"]), ("base2novel", [])):
        code, printed, err = run_cli(capsys, "bench", protocol, "--out", out, "--root", FIXTURES, "--model",
                                     env["model"], "--datasets", "dtd", "--seeds", "1", "--methods", "clip_lora",
                                     *extra, "--budget", "--num-workers", "0")
        assert code == 0, printed + err
        assert "0 failed, 0 not finished" in printed
    found = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    found = [r for r in found if r["method"] == "clip_lora"]
    assert sorted(r["protocol"] for r in found) == ["base2novel", "fewshot"]
    assert all(r["fit"]["epochs"] == 2 for r in found)  # the budget's 2 epochs replace the 500 x K steps
    code, printed, err = run_cli(capsys, "report", out)
    assert code == 0, err


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_factors(env, tmp_path):
    args = ["train", "--method", "clip_lora", *COMMON, "--steps", "7", "--model", env["model"]]
    environ = os.environ | {"PYTHONUNBUFFERED": "1", "VLPROMPT_CACHE": str(env["base"] / "cache"),
                            "VLPROMPT_DATA_ROOT": str(FIXTURES)}
    kill_and_resume(args, environ, tmp_path, kill_after="epoch 2/4: loss")
