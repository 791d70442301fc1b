"""CLIP-Adapter, Tip-Adapter(-F), LP++ and CLAP end to end: `vlprompt train` / `eval` on the fixture photographs with
a tiny random CLIP, their prompt files, resuming an interrupted run, `--budget` benches of the protocols, and
Tip-Adapter(-F)'s selection through the real pipeline with poisoned test labels.

Accuracy of a random tiny CLIP is meaningless; the tests check the files, the records and the equalities.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support import FIXTURES, needs_fixtures, read_json

from vlprompt.backbone.loaders import load_clip
from vlprompt.harness.cli.main import main
from vlprompt.harness.config import RunConfig
from vlprompt.harness.pipeline import run_experiment
from vlprompt.methods.prompt_file import load_prompt, read_prompt_header
from vlprompt.training.config import TrainConfig

pytestmark = needs_fixtures

QUICK = {  # options that keep each method's run small on the fixtures
    "clip_adapter": ["--epochs", "2", "--views", "2"],
    "tip_adapter": ["--grid-steps", "20", "5", "--views", "3", "--cache-views", "3"],
    "tip_adapter_f": ["--grid-steps", "10", "4", "--views", "3", "--cache-views", "2", "--finetune-epochs", "2",
                      "--finetune-batch-size", "4"],
    "lp_plus_plus": ["--iterations", "30"],
    "clap": ["--epochs", "3", "--views", "2", "--batch-size", "4"],
}


def train_cli(cli_env, method: str, out: Path, *extra: str) -> int:
    return main(["train", "--method", method, "--dataset", "dtd", "--shots", "2", "--seed", "1", "--device", "cpu",
                 "-q", "--model", cli_env["model"], "--out", str(out), *QUICK[method], *extra])


@pytest.fixture(scope="module")
def runs(cli_env):
    found = {}
    for method in QUICK:
        out = cli_env["base"] / "runs" / method
        assert train_cli(cli_env, method, out) == 0, method
        found[method] = out
    return found


@pytest.mark.parametrize("method", list(QUICK))
def test_train_writes_results_and_a_portable_prompt_file(runs, cli_env, method):
    out = runs[method]
    results = read_json(out / "results.json")
    assert results["method"] == method and results["metrics"]["num_samples"] == 15
    fit = results["fit"]
    clip = load_clip(cli_env["model"])
    header = read_prompt_header(out / "prompt.safetensors")
    assert header.method == method and header.backbone_fingerprint == clip.fingerprint()
    method_obj = load_prompt(out / "prompt.safetensors", clip)
    assert set(method_obj.state_dict()) <= {"visual.0.weight", "visual.2.weight", "text.0.weight", "text.2.weight",
                                            "cache_keys", "cache_labels", "alpha", "beta", "weight", "prototypes"}
    if method in ("tip_adapter", "tip_adapter_f"):
        assert fit["kind"] == "closed_form" and fit["selected_on"] == "val" and fit["num_val"] == 10
        assert fit["cache_size"] == 10 and (float(method_obj.alpha), float(method_obj.beta)) == (fit["alpha"],
                                                                                               fit["beta"])
        assert fit["alpha_grid"]["steps"] == (5 if method == "tip_adapter" else 4)
    if method == "tip_adapter_f":
        assert fit["epoch_selected_on"] == "val" and 1 <= fit["chosen_epoch"] <= 2
    if method == "lp_plus_plus":
        assert fit["kind"] == "closed_form" and fit["iterations"] == 30 and fit["selected_on"].startswith("none")
    if method in ("clip_adapter", "clap"):
        assert fit["kind"] == "features" and fit["views"] == 2
    if method == "clap":
        assert fit["selected_on"].startswith("none") and fit["constraint"] == "l2"
        assert 0 < fit["multipliers"]["min"] <= fit["multipliers"]["mean"] <= fit["multipliers"]["max"] <= 1
    config = read_json(out / "config.json")
    if method == "clap":
        assert (config["train"]["lr"], config["train"]["weight_decay"], config["train"]["crop_scale_min"]) == (
            0.1, 0.0, 0.08)
    if method in ("tip_adapter", "tip_adapter_f", "lp_plus_plus"):
        assert config["train"]["crop_scale_min"] == 0.5


def test_eval_moves_clip_adapter_and_refuses_a_cache_on_other_classes(runs, capsys):
    assert main(["eval", str(runs["clip_adapter"]), "--dataset", "oxford_flowers", "-q"]) == 0
    assert read_json(runs["clip_adapter"] / "eval-oxford_flowers.json")["metrics"]["num_samples"] == 15
    for method in ("tip_adapter", "lp_plus_plus", "clap"):
        capsys.readouterr()
        assert main(["eval", str(runs[method]), "--dataset", "oxford_flowers", "-q"]) == 2
        err = capsys.readouterr().err
        assert "cannot classify" in err and "Traceback" not in err
        assert not (runs[method] / "eval-oxford_flowers.json").exists()


def test_tip_adapter_refuses_other_classes_before_training(cli_env, capsys):
    out = cli_env["base"] / "runs" / "tip-novel"
    assert train_cli(cli_env, "tip_adapter", out, "--also-eval", "oxford_flowers") == 2
    assert "cannot classify" in capsys.readouterr().err
    assert not (out / "prompt.safetensors").exists()


@pytest.mark.parametrize("method", ["clap", "tip_adapter_f", "lp_plus_plus"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_state(cli_env, method, monkeypatch):
    """SGD methods stop after an epoch's checkpoint, closed-form fits after fitting (before the results): the resumed
    run ends with the prompt file and the results of an uninterrupted one."""
    from vlprompt import stages

    options = {"clap": {}, "tip_adapter_f": {"finetune_epochs": 2, "finetune_batch_size": 4, "grid_steps": (10, 4),
                                             "cache_views": 2},
               "lp_plus_plus": {"iterations": 30}}[method]
    views = {"clap": 2, "tip_adapter_f": 3, "lp_plus_plus": None}[method]
    train = TrainConfig(device="cpu", views=views, **({"epochs": 3, "batch_size": 4} if method == "clap" else {}))
    config = RunConfig(method=method, dataset="dtd", root=str(FIXTURES), shots=2, seed=1, model=cli_env["model"],
                       method_config=options, train=train)
    whole, broken = cli_env["base"] / "resume" / f"{method}-whole", cli_env["base"] / "resume" / f"{method}-broken"
    expected = run_experiment(config, whole, progress=False)

    class Stop(Exception):
        pass

    if method == "clap":
        def stop(stats):
            if stats.epoch == 2:
                raise Stop

        with pytest.raises(Stop):
            run_experiment(config, broken, progress=False, on_epoch_end=stop)
        assert read_json(broken / "state.json")["epoch"] == 2
    else:
        real = stages.score
        monkeypatch.setattr(stages, "score", lambda *a, **k: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            run_experiment(config, broken, progress=False)
        monkeypatch.setattr(stages, "score", real)
        assert not (broken / "results.json").exists()
    resumed = run_experiment(config, broken, resume=True, progress=False)
    assert resumed["metrics"] == expected["metrics"]
    clip = load_clip(cli_env["model"])
    a, b = load_prompt(whole / "prompt.safetensors", clip), load_prompt(broken / "prompt.safetensors", clip)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    if method != "clap":
        for key in ("alpha", "beta", "chosen_epoch", "final_loss"):
            assert resumed["fit"].get(key) == expected["fit"].get(key)


def _split_copy(folder: Path, poison: bool) -> Path:
    """The fixture DTD as a custom dataset (a CoOp split file beside links to the class folders); ``poison``
    relabels every test image with the next class."""
    folder.mkdir(parents=True)
    split = read_json(FIXTURES / "dtd" / "split_zhou_DescribableTextures.json")
    names = {label: name for _, label, name in split["train"]}
    for name in names.values():
        os.symlink(FIXTURES / "dtd" / "images" / name, folder / name)
    if poison:
        split["test"] = [[path, (label + 1) % 5, names[(label + 1) % 5]] for path, label, _ in split["test"]]
    (folder / "split.json").write_text(json.dumps(split), encoding="utf-8")
    return folder / "split.json"


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_tip_adapter_selection_is_blind_to_the_test_labels(cli_env, method):
    """The same data with every test label wrong: the chosen alpha, beta (and epoch) and the cache do not change,
    only the test accuracy does."""
    options = {"grid_steps": (20, 5), "cache_views": 2}
    if method == "tip_adapter_f":
        options.update(finetune_epochs=2, finetune_batch_size=4)
    fits, states = [], []
    for poison in (False, True):
        spec = "json:" + str(_split_copy(cli_env["base"] / f"poison-{method}-{poison}" / "dtdcopy", poison))
        config = RunConfig(method=method, dataset=spec, shots=2, seed=1, model=cli_env["model"], method_config=options,
                           train=TrainConfig(device="cpu", views=3))
        out = cli_env["base"] / f"poison-{method}-{poison}" / "run"
        payload = run_experiment(config, out, progress=False)
        fits.append({k: v for k, v in payload["fit"].items() if k != "seconds"})
        states.append(load_prompt(out / "prompt.safetensors", load_clip(cli_env["model"])).state_dict())
    assert fits[0] == fits[1]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key])


def test_python_api_fits_evaluates_predicts_and_reloads(cli_env, tmp_path):
    import vlprompt.api as vp

    clip = vp.load_clip(cli_env["model"])
    data = vp.load_dataset("dtd", str(FIXTURES))
    images = sorted((FIXTURES / "dtd" / "images" / "banded").glob("*.jpg"))[:2]
    for name, options in (("tip_adapter_f", {"finetune_epochs": 1, "grid_steps": (10, 4), "cache_views": 2}),
                          ("clap", {})):
        method = vp.build_method(name, clip, data, **options)
        train = {"views": 2} if name == "tip_adapter_f" else {"epochs": 2, "views": 2, "batch_size": 4}
        fitted = vp.fit(method, data, shots=2, seed=1, feature_cache=tmp_path / "cache", device="cpu", **train)
        assert fitted.kind == ("closed_form" if name == "tip_adapter_f" else "features")
        accuracy = vp.evaluate(method, data, feature_cache=tmp_path / "cache")["accuracy"]
        path = vp.save_prompt(method, tmp_path / f"{name}.safetensors")
        again = vp.load_prompt(path, clip)
        assert vp.evaluate(again, data, feature_cache=tmp_path / "cache")["accuracy"] == accuracy
        predictions = vp.Predictor(again).predict([str(p) for p in images], top_k=2)
        assert len(predictions) == 2 and all(len(p.labels) == 2 for p in predictions)
        assert all(label in data.classnames for p in predictions for label in p.labels)


# ---------------------------------------------------------------------------------------------------------- bench


def _bench(*args: str) -> int:
    return main(["bench", *args])


@pytest.mark.slow
def test_budget_fewshot_bench_of_every_method(cli_env, tmp_path, capsys):
    out = tmp_path / "bench"
    assert _bench("fewshot", "--out", str(out), "--root", str(FIXTURES), "--model", cli_env["model"], "--datasets",
                  "dtd", "--shots", "1", "--seeds", "1", "--methods", *QUICK, "--no-baselines", "--budget",
                  "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "5 run(s): 0 already finished, 5 done now, 0 failed" in printed
    for method in QUICK:
        results = read_json(out / f"fewshot-budget/tiny/dtd/{method}/shots1/seed1/results.json")
        assert results["budget"] is True and results["method"] == method
    tip_f = read_json(out / "fewshot-budget/tiny/dtd/tip_adapter_f/shots1/seed1/results.json")
    assert tip_f["fit"]["finetune_epochs"] == 2  # the budget's short fine-tuning
    assert main(["report", str(out)]) == 0


@pytest.mark.slow
def test_budget_base2novel_runs_clip_adapter_and_refuses_the_class_bound_methods(cli_env, tmp_path, capsys):
    out = tmp_path / "b2n"
    common = ["--out", str(out), "--root", str(FIXTURES), "--model", cli_env["model"], "--datasets", "dtd", "--seeds",
              "1", "--budget", "--device", "cpu"]
    assert _bench("base2novel", *common, "--methods", "clip_adapter", "--no-baselines") == 0
    folder = out / "base2novel-budget/tiny/dtd/clip_adapter/shots16/seed1"
    assert read_json(folder / "eval-dtd-new.json")["metrics"]["num_samples"] == 6
    assert _bench("crossdataset", "--out", str(out), "--root", str(FIXTURES), "--model", cli_env["model"], "--methods",
                  "clip_adapter", "--budget", "--source", "dtd", "--targets", "oxford_flowers", "--seeds", "1",
                  "--device", "cpu") == 0
    (cross,) = out.rglob("clip_adapter/shots16/seed1/eval-oxford_flowers.json")
    assert read_json(cross)["protocol"] == "crossdataset" and read_json(cross)["metrics"]["num_samples"] == 15
    for method in ("tip_adapter", "tip_adapter_f", "lp_plus_plus", "clap"):
        capsys.readouterr()
        assert _bench("base2novel", *common, "--methods", method, "--no-baselines") == 2
        assert "cannot be evaluated on the novel classes" in capsys.readouterr().err
        assert _bench("crossdataset", "--out", str(out), "--root", str(FIXTURES), "--model", cli_env["model"],
                      "--methods", method, "--budget", "--source", "dtd", "--targets", "oxford_flowers") == 2


@pytest.mark.slow
def test_budget_domainshift_evaluates_a_cache_on_the_imagenet_variants(cli_env, tmp_path):
    """ImageNet-V2 / -Sketch keep ImageNet's classes, -A / -R a subset: Tip-Adapter's cache is restricted to them.
    (The synthetic ImageNet has too few images to leave a validation split, so the search is off here.)"""
    from test_bench_pipeline import synthetic_imagenet

    root, out = tmp_path / "data", tmp_path / "out"
    synthetic_imagenet(root)
    assert _bench("domainshift", "--out", str(out), "--root", str(root), "--model", cli_env["model"], "--methods",
                  "tip_adapter", "--seeds", "1", "--budget", "--device", "cpu",
                  "--method-option", "tip_adapter.search=false") == 0
    (run,) = out.rglob("tip_adapter/shots16/seed1")
    labelled = {p.name: read_json(p) for p in run.glob("eval-*.json")}
    assert labelled["eval-imagenet_a.json"]["metrics"]["num_samples"] == 2  # the fixture's 2-class subset
    assert len(labelled["eval-imagenet_r.json"]["metrics"]["confusion_matrix"]) == 2
    assert labelled["eval-imagenet-domainshift.json"]["metrics"] == read_json(run / "results.json")["metrics"]
