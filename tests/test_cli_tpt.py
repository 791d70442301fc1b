"""TPT end to end on the fixture photographs with a tiny random CLIP (saved as an OpenAI state dict): `vlprompt train
--method tpt` (nothing trained: the evaluation adapts per test image), eval on another dataset and on novel classes,
predict, TPT+CoOp from a CoOp run's prompt, a clear error for a missing CoOp prompt, and --budget benches of every
protocol (TPT runs once per dataset, as zero-shot CLIP).

Accuracy of a random CLIP means nothing: the tests check files, records and exact reproducibility.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from support import FIXTURES, needs_fixtures
from test_bench_pipeline import synthetic_imagenet

from vlprompt.data import load_dataset
from vlprompt.harness.cli.main import main

pytestmark = needs_fixtures

COMMON = ["--dataset", "dtd", "--seed", "1", "--device", "cpu", "--num-workers", "0", "--precision", "fp32", "-q"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_file):
    base = tmp_path_factory.mktemp("tpt")
    patch = pytest.MonkeyPatch()
    patch.setenv("VLPROMPT_CACHE", str(base / "cache"))
    patch.setenv("VLPROMPT_DATA_ROOT", str(FIXTURES))
    yield {"base": base, "model": str(tiny_model_file)}
    patch.undo()


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tpt_run(env):
    out = env["base"] / "runs" / "tpt"
    assert main(["train", "--method", "tpt", *COMMON, "--model", env["model"], "--out", str(out),
                 "--also-eval", "oxford_flowers"]) == 0
    return out


def test_train_evaluates_with_per_image_tuning(tpt_run, env, capsys):
    results = read(tpt_run / "results.json")
    assert results["fit"]["kind"] == "test_time" and results["shots"] == 0
    assert results["config"]["method_config"]["tta_views"] == 64
    assert results["metrics"]["num_samples"] == len(load_dataset("dtd", FIXTURES).test)
    assert read(tpt_run / "eval-oxford_flowers.json")["metrics"]["num_samples"] == 15
    with safe_open(str(tpt_run / "prompt.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["ctx", "view_seed"]
        assert json.loads(handle.metadata()["config"])["augmix"] == "on"  # dtd: a fine-grained set
    # the same command in another folder gives the same per-image results (views seeded by the run's seed)
    again = env["base"] / "runs" / "tpt-again"
    assert main(["train", "--method", "tpt", *COMMON, "--model", env["model"], "--out", str(again)]) == 0
    assert read(again / "results.json")["metrics"] == results["metrics"]
    code, _, err = run_cli(capsys, "eval", tpt_run, "--subset", "new")
    assert code == 0, err
    assert read(tpt_run / "eval-dtd-new.json")["subset"] == "new"


def test_predict_with_a_tpt_run_is_order_independent(tpt_run, capsys):
    test = load_dataset("dtd", FIXTURES).test[:4]
    paths = [str(FIXTURES / "dtd" / "images" / item.path) for item in test]
    code, forward, err = run_cli(capsys, "predict", tpt_run, *paths, "--json", "-q")
    assert code == 0, err
    code, backward, err = run_cli(capsys, "predict", tpt_run, *paths[::-1], "--json", "-q")
    assert code == 0, err
    first = {p["image"]: p["top_k"] for p in json.loads(forward)["predictions"]}
    second = {p["image"]: p["top_k"] for p in json.loads(backward)["predictions"]}
    assert list(first) == paths and first == second


def test_tpt_plus_coop_starts_from_a_coop_run(env, capsys, tmp_path):
    coop = tmp_path / "coop"
    assert main(["train", "--method", "coop", *COMMON, "--shots", "1", "--epochs", "2", "--n-ctx", "4",
                 "--ctx-init", "a photo of a", "--model", env["model"], "--out", str(coop)]) == 0
    prompt = coop / "prompt.safetensors"
    zero = tmp_path / "tpt-coop-0"
    assert main(["train", "--method", "tpt", *COMMON, "--init-prompt", str(prompt), "--tta-steps", "0",
                 "--model", env["model"], "--out", str(zero)]) == 0
    # zero steps from the CoOp prompt classify as the CoOp run does
    assert read(zero / "results.json")["metrics"]["accuracy"] == read(coop / "results.json")["metrics"]["accuracy"]
    tuned = tmp_path / "tpt-coop"
    assert main(["train", "--method", "tpt", *COMMON, "--init-prompt", str(prompt), "--tta-views", "16",
                 "--model", env["model"], "--out", str(tuned)]) == 0
    assert read(tuned / "results.json")["config"]["method_config"]["init_prompt"] == str(prompt)
    code, _, err = run_cli(capsys, "train", "--method", "tpt", *COMMON, "--init-prompt", str(tmp_path / "none.st"),
                           "--model", env["model"], "--out", tmp_path / "bad")
    assert code == 2 and "does not exist" in err and "Traceback" not in err


@pytest.mark.slow
def test_budget_bench_of_every_protocol(env, tmp_path):
    out = tmp_path / "out"
    common = ["--out", str(out), "--model", env["model"], "--methods", "tpt", "--no-baselines", "--seeds", "1",
              "--budget", "--device", "cpu", "--num-workers", "0", "--method-option", "tpt.tta_views=16"]
    assert main(["bench", "fewshot", *common, "--root", str(FIXTURES), "--datasets", "dtd", "--shots", "1"]) == 0
    assert main(["bench", "base2novel", *common, "--root", str(FIXTURES), "--datasets", "dtd"]) == 0
    root = tmp_path / "data"
    synthetic_imagenet(root)
    assert main(["bench", "crossdataset", *common, "--root", str(root), "--targets", "dtd"]) == 0
    assert main(["bench", "domainshift", *common, "--root", str(root)]) == 0
    few = read(out / "fewshot-budget/tiny/dtd/tpt/results.json")  # once per dataset: no shots, no seeds
    assert (few["method"], few["shots"], few["fit"]["kind"]) == ("tpt", 0, "test_time")
    assert read(out / "base2novel-budget/tiny/dtd/tpt/eval-dtd-new.json")["subset"] == "new"
    transfer = out / "transfer-budget/tiny/imagenet/tpt"
    assert read(transfer / "eval-dtd.json")["protocol"] == "crossdataset"
    assert read(transfer / "eval-imagenet_a.json")["protocol"] == "domainshift"
    assert main(["report", str(out)]) == 0
    assert any(p.suffix == ".md" for p in (out / "report").iterdir())
    # TPT+CoOp in the transfer protocols: from the ImageNet-trained CoOp run (its own output folder: the run key is
    # the method's, and its configuration differs from plain TPT's)
    coop_out = tmp_path / "coop"
    assert main(["bench", "crossdataset", "--out", str(coop_out), "--model", env["model"], "--methods", "coop",
                 "--seeds", "1", "--budget", "--device", "cpu", "--num-workers", "0", "--root", str(root),
                 "--targets", "dtd"]) == 0
    prompt = coop_out / "transfer-budget/tiny/imagenet/coop/shots16/seed1/prompt.safetensors"
    plus = tmp_path / "tpt-coop"
    assert main(["bench", "domainshift", *common[2:], "--out", str(plus), "--root", str(root),
                 "--method-option", f"tpt.init_prompt={prompt}"]) == 0
    run = plus / "transfer-budget/tiny/imagenet/tpt"
    assert read(run / "results.json")["config"]["method_config"]["init_prompt"] == str(prompt)
    assert read(run / "eval-imagenet_r.json")["protocol"] == "domainshift"
