"""KgCoOp, ProGrad and TCP end to end: `vlprompt train` on the fixture photographs with a tiny random CLIP (saved as
an OpenAI state dict), evaluation on novel classes and another dataset, resume after an interruption, and a --budget
bench of every protocol.

The tiny CLIP has 2 text blocks, so TCP's class-aware tokens enter at block 1 (`--class-token-layer 1`; the official
layer 8 is refused with a clear error). Accuracy of a random CLIP means nothing: the tests check files, recipes and
exact reproducibility.
"""

from __future__ import annotations

import json

import pytest
import torch
from support import FIXTURES, needs_fixtures, read_json
from test_bench_pipeline import synthetic_imagenet

from vlprompt.harness.cli.main import main
from vlprompt.harness.config import RunConfig
from vlprompt.harness.pipeline import run_experiment
from vlprompt.harness.rundir import load_params
from vlprompt.methods.prompt_file import read_prompt_header
from vlprompt.training.config import TrainConfig

pytestmark = needs_fixtures

METHOD_ARGS = {"kgcoop": [], "prograd": ["--n-ctx", "8"], "tcp": ["--class-token-layer", "1"]}
METHOD_CONFIG = {"kgcoop": {}, "prograd": {"n_ctx": 8}, "tcp": {"class_token_layer": 1}}


def _train_args(method: str, model: str) -> list[str]:
    return ["--method", method, "--dataset", "dtd", "--shots", "2", "--seed", "1", "--epochs", "3", "--lr", "0.01",
            *METHOD_ARGS[method], "--model", model, "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def trained(cli_env):
    runs = {}
    for method in METHOD_ARGS:
        out = cli_env["base"] / "runs" / method
        assert main(["train", *_train_args(method, cli_env["model"]), "--out", str(out), "--also-eval",
                     "oxford_flowers"]) == 0
        runs[method] = out
    return runs


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_train_writes_a_run_with_the_methods_recipe_and_templates(trained, method, capsys):
    out = trained[method]
    config = read_json(out / "config.json")
    results = read_json(out / "results.json")
    assert config["method"] == results["method"] == method and results["fit"]["kind"] == "features"
    train = config["train"]
    expected = {"kgcoop": (None, None, 32), "prograd": (None, None, 32), "tcp": ("adam", 1e-3, 32)}[method]
    assert (train["optimizer"], train["adam_eps"], train["batch_size"]) == expected and train["epochs"] == 3
    header = read_prompt_header(out / "prompt.safetensors")
    assert header.method == method
    template = {"kgcoop": "a photo of a {}, a type of texture.", "prograd": "a texture of {}.",
                "tcp": "a photo of a {}, a type of texture."}[method]
    assert header.config["template"] == template  # the official per-dataset template, filled in by the pipeline
    if method == "tcp":
        assert header.config["prompt_template"] == "{} texture."
    assert (out / "prompt.safetensors").stat().st_size < 200_000  # context (+ TCP's small generator) only
    assert read_json(out / "eval-oxford_flowers.json")["eval_dataset"] == "oxford_flowers"
    code = main(["eval", str(out), "--subset", "new", "--json", "-q"])
    assert code == 0
    novel = json.loads(capsys.readouterr().out)
    assert novel["subset"] == "new" and novel["metrics"]["num_samples"] == 6


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_resume_after_an_interruption_matches_the_uninterrupted_run(trained, cli_env, method, capsys):
    out = cli_env["base"] / "runs" / f"{method}-interrupted"
    config = RunConfig(method=method, dataset="dtd", method_config=METHOD_CONFIG[method], root=str(FIXTURES),
                       shots=2, seed=1, model=cli_env["model"], train=TrainConfig(epochs=3, lr=0.01, device="cpu"))

    def stop_after_one(stats):
        if stats.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, on_epoch_end=stop_after_one)
    assert main(["train", *_train_args(method, cli_env["model"]), "--out", str(out), "--resume"]) == 0
    resumed, straight = load_params(out), load_params(trained[method])
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[key], straight[key]) for key in resumed)
    assert read_json(out / "results.json")["metrics"] == read_json(trained[method] / "results.json")["metrics"]
    assert read_json(out / "results.json")["fit"]["resumed_after_epoch"] == 1


def test_tcp_at_the_official_layer_is_refused_on_a_two_block_text_tower(cli_env, tmp_path, capsys):
    args = _train_args("tcp", cli_env["model"])
    at = args.index("--class-token-layer")
    assert main(["train", *args[:at], *args[at + 2 :], "--out", str(tmp_path / "tcp")]) == 2
    err = capsys.readouterr().err
    assert "class_token_layer 8 is not a text block" in err and "Traceback" not in err


BUDGET = ["--methods", "kgcoop", "prograd", "tcp", "--no-baselines", "--method-option", "tcp.class_token_layer=1",
          "--seeds", "1", "--budget", "--device", "cpu"]


@pytest.mark.slow
def test_budget_bench_of_every_protocol(cli_env, tmp_path):
    out = tmp_path / "out"
    common = ["--out", str(out), "--model", cli_env["model"], *BUDGET]
    assert main(["bench", "fewshot", *common, "--root", str(FIXTURES), "--datasets", "dtd", "--shots", "1"]) == 0
    assert main(["bench", "base2novel", *common, "--root", str(FIXTURES), "--datasets", "dtd"]) == 0
    root = tmp_path / "data"
    synthetic_imagenet(root)
    assert main(["bench", "crossdataset", *common, "--root", str(root), "--targets", "dtd"]) == 0
    assert main(["bench", "domainshift", *common, "--root", str(root)]) == 0
    for method in METHOD_ARGS:
        few = read_json(out / f"fewshot-budget/tiny/dtd/{method}/shots1/seed1/results.json")
        assert (few["method"], few["budget"], few["config"]["train"]["epochs"]) == (method, True, 2)
        folder = out / f"base2novel-budget/tiny/dtd/{method}/shots16/seed1"
        base, new = read_json(folder / "results.json"), read_json(folder / "eval-dtd-new.json")
        assert (base["subset"], new["subset"]) == ("base", "new")
        batch = {"kgcoop": 128, "prograd": 32, "tcp": 32}[method]  # KgCoOp's base-to-novel recipe: batch 128
        assert base["config"]["train"]["batch_size"] == batch
        transfer = out / f"transfer-budget/tiny/imagenet/{method}/shots16/seed1"
        assert read_json(transfer / "eval-dtd.json")["protocol"] == "crossdataset"
        assert read_json(transfer / "eval-imagenet_r.json")["protocol"] == "domainshift"
    assert main(["report", str(out)]) == 0
    assert any(p.suffix == ".md" for p in (out / "report").iterdir())
