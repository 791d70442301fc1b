"""IVLP, MaPLe and PromptSRC end to end through the command line on the fixture photographs with a tiny random CLIP:
train (images through the prompted towers), eval, predict, a --budget bench of base-to-novel and few-shot, and a run
killed with SIGKILL then resumed, which ends with the prompts of an uninterrupted run (CPU, bit for bit).

The tiny CLIP has 2 layers per tower, so the prompt depths are set to 2 (the defaults, 9, are refused with a clear
error naming the tower's depth).
"""

from __future__ import annotations

import json
import os

import pytest
from support import FIXTURES, kill_and_resume, needs_fixtures, run_cli

from vlprompt.data import load_dataset

pytestmark = needs_fixtures

DEPTHS = {
    "ivlp": ["--prompt-depth-text", "2", "--prompt-depth-vision", "2"],
    "maple": ["--prompt-depth", "2"],
    "promptsrc": ["--prompt-depth-text", "2", "--prompt-depth-vision", "2", "--gpa-mean", "2"],
}
COMMON = ["--dataset", "dtd", "--shots", "2", "--seed", "1", "--device", "cpu", "--num-workers", "0", "--precision", "fp32",
          "-q"]


@pytest.mark.parametrize("method", ["ivlp", "maple", "promptsrc"])
def test_train_eval_predict(cli_env, capsys, method):
    out = cli_env["base"] / "runs" / method
    code, _, err = run_cli(capsys, "train", "--method", method, *DEPTHS[method], *COMMON, "--epochs", "2",
                           "--model", cli_env["model"], "--out", out, "--also-eval", "oxford_flowers")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["fit"]["kind"] == "images" and results["fit"]["epochs"] == 2
    assert results["config"]["train"]["lr"] == {"ivlp": 0.0025, "maple": 0.0035, "promptsrc": 0.0025}[method]
    assert results["config"]["train"]["batch_size"] == 4
    assert (out / "eval-oxford_flowers.json").is_file() and (out / "prompt.safetensors").is_file()
    code, _, err = run_cli(capsys, "eval", out, "--subset", "new")
    assert code == 0, err
    # predict through the run's prompted tower reproduces the run's test accuracy
    test = load_dataset("dtd", FIXTURES).test
    paths = [str(FIXTURES / "dtd" / "images" / item.path) for item in test]
    code, printed, err = run_cli(capsys, "predict", out, *paths, "--json", "-q")
    assert code == 0, err
    predictions = json.loads(printed)["predictions"]
    assert [p["image"] for p in predictions] == paths
    classes = load_dataset("dtd", FIXTURES).classnames
    correct = sum(p["top_k"][0]["label"] == classes[item.label] for p, item in zip(predictions, test, strict=True))
    assert 100.0 * correct / len(test) == pytest.approx(results["metrics"]["accuracy"])

def test_default_depth_on_a_shallow_backbone_is_a_clear_error(cli_env, capsys):
    code, _, err = run_cli(capsys, "train", "--method", "maple", *COMMON, "--epochs", "2", "--model", cli_env["model"],
                           "--out", cli_env["base"] / "runs" / "too-deep")
    assert code == 2 and "MaPLe: text prompt depth must be between 1 and the text tower's 2 layers, got 9" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_budget_benches_of_the_deep_prompt_methods(cli_env, tmp_path, capsys):
    out = tmp_path / "bench"
    options = ["--method-option", "maple.prompt_depth=2", "--method-option", "promptsrc.prompt_depth_text=2",
               "--method-option", "promptsrc.prompt_depth_vision=2"]
    for protocol, extra in (("base2novel", []), ("fewshot", ["--shots", "1"])):
        code, printed, err = run_cli(capsys, "bench", protocol, "--out", out, "--root", FIXTURES, "--model",
                                     cli_env["model"], "--datasets", "dtd", "--seeds", "1", "--methods", "maple",
                                     "promptsrc", *options, *extra, "--budget", "--num-workers", "0")
        assert code == 0, printed + err
        assert "0 failed, 0 not finished" in printed
    found = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    found = [r for r in found if r["method"] in ("maple", "promptsrc")]  # the protocols add their baselines
    assert sorted((r["protocol"], r["method"]) for r in found) == [
        ("base2novel", "maple"), ("base2novel", "promptsrc"), ("fewshot", "maple"), ("fewshot", "promptsrc")]
    assert {p.parts[-4] for p in out.rglob("eval-dtd-new.json")} >= {"maple", "promptsrc"}
    code, _, err = run_cli(capsys, "report", out)
    assert code == 0, err


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_prompts(cli_env, tmp_path):
    args = ["train", "--method", "promptsrc", *DEPTHS["promptsrc"], *COMMON[:-1], "--epochs", "4", "--model",
            cli_env["model"]]
    environ = os.environ | {"PYTHONUNBUFFERED": "1", "VLPROMPT_CACHE": str(cli_env["base"] / "cache"),
                            "VLPROMPT_DATA_ROOT": str(FIXTURES)}
    kill_and_resume(args, environ, tmp_path, kill_after="epoch 2/4: loss")
