"""`vlprompt train | eval | zeroshot | linear-probe | predict | interpret` end to end on the fixture photographs with a
tiny random CLIP saved as an OpenAI state dict (loaded through `load_clip` with a path as `--model`).

One CoOp run (2 shots, 4 epochs, 4 context vectors) is trained once for the module and read by most tests. Accuracy
of a random tiny CLIP is meaningless; the tests check the files, their consistency (a metric recomputed from another
path must agree exactly) and the errors.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest
import torch
from clip_formats import save_openai_state_dict
from support import FIXTURES, needs_fixtures, read_json, run_cli

from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.harness.cli.main import main
from vlprompt.harness.config import RunConfig
from vlprompt.training.config import TrainConfig
from vlprompt.data import load_dataset
from vlprompt.methods.prompt_file import read_prompt_header
from vlprompt.harness.pipeline import run_experiment
from vlprompt.harness.rundir import load_params

pytestmark = needs_fixtures

DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
TRAIN_ARGS = ["--method", "coop", "--dataset", "dtd", "--shots", "2", "--seed", "1", "--epochs", "4", "--lr", "0.05",
              "--n-ctx", "4", "--device", "cpu", "--precision", "fp32", "-q"]


@pytest.fixture(scope="module")
def env(cli_env):
    """The shared command-line set-up (conftest's cli_env) and a second tiny backbone file (seed 1)."""
    other = save_openai_state_dict(build_tiny_clip("vit", seed=1), cli_env["base"] / "other.pt")
    return {**cli_env, "other": str(other)}


@pytest.fixture(scope="module")
def trained(env):
    out = env["base"] / "runs" / "coop"
    args = ["train", *TRAIN_ARGS, "--model", env["model"], "--out", str(out), "--also-eval", "oxford_flowers"]
    assert main(args) == 0
    return out


def test_train_writes_the_documented_files(trained, env):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "fewshot.json", "params.safetensors", "optim.safetensors", "state.json",
            "prompt.safetensors", "results.json", "eval-oxford_flowers.json", "log.txt"} <= names
    assert not any(name.endswith(".next") or name.endswith(".tmp") for name in names)

    config = read_json(trained / "config.json")
    assert config["method"] == "coop" and config["shots"] == 2 and config["seed"] == 1
    assert config["method_config"] == {"n_ctx": 4, "ctx_init": "", "csc": False, "class_token_position": "end",
                                       "fast_text": True}  # complete, defaults filled in
    assert config["train"]["epochs"] == 4 and config["train"]["batch_size"] == 32  # CoOp's default batch
    assert config["root"] == str(FIXTURES) and config["model"] == env["model"]

    fewshot = read_json(trained / "fewshot.json")
    assert fewshot["shots"] == 2 and fewshot["seed"] == 1
    assert len(fewshot["train"]) == 10 and len(fewshot["val"]) == 10  # 2 per class; val min(2, 4) per class
    assert sorted(label for _, label in fewshot["train"]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

    header = read_prompt_header(trained / "prompt.safetensors")
    assert header.method == "coop" and header.classnames == DTD_CLASSES
    assert header.backbone_fingerprint == load_clip(env["model"]).fingerprint()

    results = read_json(trained / "results.json")
    assert (results["schema"], results["method"], results["dataset"], results["eval_dataset"]) == (1, "coop", "dtd",
                                                                                                   "dtd")
    assert (results["subset"], results["shots"], results["budget"]) == ("all", 2, False)
    metrics = results["metrics"]
    matrix = torch.tensor(metrics["confusion_matrix"])
    assert matrix.shape == (5, 5) and int(matrix.sum()) == metrics["num_samples"] == 15  # 3 test images per class
    assert metrics["accuracy"] == 100.0 * int(matrix.trace()) / 15
    assert list(metrics["per_class_accuracy"]) == DTD_CLASSES
    assert set(results["timing"]) == {"feature_s", "train_s", "eval_s"} and results["timing"]["train_s"] > 0
    assert results["fit"]["kind"] == "features" and results["fit"]["epochs"] == 4 and results["fit"]["num_train"] == 10
    assert results["config"] == config and results["versions"]["torch"] == torch.__version__

    cross = read_json(trained / "eval-oxford_flowers.json")
    assert (cross["dataset"], cross["eval_dataset"], cross["subset"]) == ("dtd", "oxford_flowers", "all")
    assert list(cross["metrics"]["per_class_accuracy"])[0] == "pink primrose"

    log = (trained / "log.txt").read_text(encoding="utf-8")
    assert "epoch 4/4" in log and "dtd test accuracy" in log


def test_training_lowers_the_loss(trained):
    history = read_json(trained / "state.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert read_json(trained / "results.json")["fit"]["loss_history"] == [h["loss"] for h in history]


def test_rerunning_a_finished_run_is_refused(trained, env, capsys):
    before = (trained / "results.json").read_bytes()
    code, _, err = run_cli(capsys, "train", *TRAIN_ARGS, "--model", env["model"], "--out", trained)
    assert code == 2 and "finished run" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "train", *TRAIN_ARGS, "--model", env["model"], "--out", trained, "--resume")
    assert code == 2 and "finished run" in err
    assert (trained / "results.json").read_bytes() == before


def test_eval_cross_dataset_is_reproducible(trained, capsys):
    code, out, _ = run_cli(capsys, "eval", trained, "--dataset", "oxford_flowers", "--name", "flowers-again", "-q")
    assert code == 0 and "eval-flowers-again.json" in out
    again, first = read_json(trained / "eval-flowers-again.json"), read_json(trained / "eval-oxford_flowers.json")
    assert again["metrics"] == first["metrics"]


def test_eval_novel_classes(trained, capsys):
    code, out, _ = run_cli(capsys, "eval", trained, "--subset", "new", "--json", "-q")
    assert code == 0
    printed = json.loads(out)
    written = read_json(trained / "eval-dtd-new.json")
    assert printed == written
    assert written["subset"] == "new" and list(written["metrics"]["per_class_accuracy"]) == ["bubbly", "bumpy"]
    assert written["metrics"]["num_samples"] == 6


def test_eval_of_the_own_test_set_is_refused(trained, capsys):
    code, _, err = run_cli(capsys, "eval", trained, "--dataset", "DescribableTextures")
    assert code == 2 and "results.json" in err


def test_prompt_on_another_backbone_is_refused(trained, env, capsys):
    before = sorted(p.name for p in trained.iterdir())
    code, _, err = run_cli(capsys, "eval", trained, "--dataset", "oxford_flowers", "--name", "x", "--model",
                           env["other"])
    assert code == 2 and "fingerprint" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "predict", trained, FIXTURES / "dtd" / "images" / "banded", "--model", env["other"])
    assert code == 2 and "fingerprint" in err
    assert sorted(p.name for p in trained.iterdir()) == before


def test_predict_with_a_run_reproduces_its_test_accuracy(trained, capsys):
    test = load_dataset("dtd", FIXTURES).test
    paths = [str(FIXTURES / "dtd" / "images" / item.path) for item in test]
    code, out, _ = run_cli(capsys, "predict", trained, *paths, "--top-k", "5", "--json", "-q")
    assert code == 0
    document = json.loads(out)
    assert document["classes"] == 5 and document["skipped"] == []
    predictions = document["predictions"]
    assert [p["image"] for p in predictions] == paths
    for entry in predictions:
        probs = [c["probability"] for c in entry["top_k"]]
        assert sorted(c["label"] for c in entry["top_k"]) == sorted(DTD_CLASSES)
        assert probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1.0) < 1e-5  # all 5 classes shown: a full fp32 softmax
    correct = sum(p["top_k"][0]["label"] == DTD_CLASSES[item.label] for p, item in zip(predictions, test))
    assert 100.0 * correct / len(test) == read_json(trained / "results.json")["metrics"]["accuracy"]
    # the run's precision by default (as eval), recorded in the output
    assert document["precision"] == read_json(trained / "results.json")["precision"]


def test_predict_precision_default_and_choice(trained, env, capsys, monkeypatch):
    import vlprompt.common.precision as prec

    image = FIXTURES / "dtd" / "images" / "banded" / "banded_0024.jpg"
    monkeypatch.setenv("VLPROMPT_CACHE", str(env["base"] / "probe-bf16"))
    prec.measured_choice("cpu", probe=lambda device: {"fp32_s": 2.0, "bf16_s": 1.0})  # this "machine": bf16 faster
    code, out, err = run_cli(capsys, "predict", "--model", env["model"], "--classes", "cat,dog", image, "--json")
    assert code == 0 and json.loads(out)["precision"] == "bf16"  # zero-shot: auto by default, resolved here
    assert "precision bf16" in err
    code, out, _ = run_cli(capsys, "predict", "--model", env["model"], "--classes", "cat,dog", image, "--json",
                           "--precision", "fp32")
    assert code == 0 and json.loads(out)["precision"] == "fp32"
    code, out, _ = run_cli(capsys, "predict", trained, image, "--json", "--precision", "auto", "-q")
    assert code == 0 and json.loads(out)["precision"] == "bf16"
    with pytest.raises(SystemExit):
        main(["predict", str(trained), str(image), "--precision", "fp64"])


def test_predict_text_output_on_a_folder(trained, capsys):
    folder = FIXTURES / "dtd" / "images" / "braided"
    code, out, _ = run_cli(capsys, "predict", trained, folder, "--top-k", "2", "-q")
    assert code == 0
    lines = out.splitlines()
    files = sorted(str(p) for p in folder.iterdir())
    assert lines[0::3] == files  # one header line and two ranked lines per image, in sorted order
    assert all(line.lstrip().startswith("1. ") for line in lines[1::3])
    assert all(line.rstrip().endswith("%") for line in lines[2::3])


def test_predict_zero_shot_on_a_class_list(env, tmp_path, capsys):
    image = FIXTURES / "dtd" / "images" / "banded" / "banded_0024.jpg"
    code, out, _ = run_cli(capsys, "predict", "--model", env["model"], "--classes", "cat, dog,", image, "--json")
    assert code == 0
    ranked = json.loads(out)["predictions"][0]["top_k"]
    assert sorted(c["label"] for c in ranked) == ["cat", "dog"]
    assert abs(sum(c["probability"] for c in ranked) - 1.0) < 1e-6
    names = tmp_path / "classes.txt"
    names.write_text("# my classes\ncat\n\ndog\n", encoding="utf-8")
    code, out2, _ = run_cli(capsys, "predict", "--model", env["model"], "--classes-file", names, image, "--json")
    assert code == 0 and json.loads(out2) == json.loads(out)


def test_predict_zero_shot_agrees_with_the_zeroshot_command(env, capsys):
    out = env["base"] / "runs" / "zs-texture"
    assert run_cli(capsys, "zeroshot", "--dataset", "dtd", "--model", env["model"], "--out", out, "-q")[0] == 0
    test = load_dataset("dtd", FIXTURES).test
    paths = [str(FIXTURES / "dtd" / "images" / item.path) for item in test]
    code, printed, _ = run_cli(capsys, "predict", "--model", env["model"], "--classes", ",".join(DTD_CLASSES),
                               "--template", "{} texture.", *paths, "--top-k", "1", "--json")
    assert code == 0
    top = [p["top_k"][0]["label"] for p in json.loads(printed)["predictions"]]
    accuracy = 100.0 * sum(label == DTD_CLASSES[item.label] for label, item in zip(top, test)) / len(test)
    assert accuracy == read_json(out / "results.json")["metrics"]["accuracy"]


def test_predict_unreadable_images(trained, tmp_path, capsys):
    good = FIXTURES / "dtd" / "images" / "banded" / "banded_0024.jpg"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    missing = tmp_path / "missing.png"
    code, out, err = run_cli(capsys, "predict", trained, good, bad, missing)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "broken.jpg" in err and "missing.png" in err and "2 of 3 images" in err
    code, out, err = run_cli(capsys, "predict", trained, good, bad, missing, "--skip-bad", "--json", "-q")
    assert code == 0 and "skipped 2 unreadable image(s)" in err
    document = json.loads(out)
    assert [p["image"] for p in document["predictions"]] == [str(good)]
    assert [s["image"] for s in document["skipped"]] == [str(bad), str(missing)]


def test_predict_argument_errors(trained, env, tmp_path, capsys):
    image = FIXTURES / "dtd" / "images" / "banded" / "banded_0024.jpg"
    code, _, err = run_cli(capsys, "predict", "--model", env["model"], "--classes", " , ", image)
    assert code == 2 and "class list is empty" in err
    code, _, err = run_cli(capsys, "predict", "--classes", "cat,dog", image)
    assert code == 2 and "--model" in err
    code, _, err = run_cli(capsys, "predict", image)
    assert code == 2 and "not a run folder" in err
    code, _, err = run_cli(capsys, "predict", trained)
    assert code == 2 and "no images" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "predict", trained, empty)
    assert code == 2 and "holds no image files" in err


def test_interpret_lists_nearest_words(trained, env, capsys):
    code, out, _ = run_cli(capsys, "interpret", trained, "--top-k", "3", "--json", "-q")
    assert code == 0
    document = json.loads(out)
    assert document["method"] == "coop" and document["class_specific"] is False
    vectors = document["blocks"][0]["vectors"]
    assert len(vectors) == 4 and all(len(v) == 3 for v in vectors)
    ctx = load_params(trained)["ctx"]
    table = load_clip(env["model"]).token_embedding.weight.detach().float()
    nearest = torch.cdist(ctx.float(), table).min(dim=1).values
    for vector, expected in zip(vectors, nearest.tolist()):
        distances = [n["distance"] for n in vector]
        assert distances == sorted(distances)
        assert abs(distances[0] - expected) < 1e-4  # cdist's matmul path vs the exact one: fp32 rounding
    code, text, _ = run_cli(capsys, "interpret", trained, "--top-k", "2", "-q")
    assert code == 0 and len(text.splitlines()) == 5 and text.splitlines()[1].startswith("#1")


def test_zeroshot_and_ensemble_runs(env, tmp_path, capsys):
    zs = env["base"] / "runs" / "zs"
    code, out, _ = run_cli(capsys, "zeroshot", "--dataset", "dtd", "--model", env["model"], "--out", zs, "-q",
                           "--also-eval", "oxford_flowers")
    assert code == 0 and "test accuracy" in out
    names = {p.name for p in zs.iterdir()}
    assert {"config.json", "prompt.safetensors", "results.json", "eval-oxford_flowers.json", "log.txt"} <= names
    assert not names & {"fewshot.json", "state.json", "params.safetensors"}
    config = read_json(zs / "config.json")
    assert config["method"] == "zeroshot" and config["shots"] == 0 and config["method_config"] == {"template": ""}

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n# comment\nitap of a {}.\n", encoding="utf-8")
    for label, value in (("file", str(templates)), ("coop7", "coop7")):
        out_dir = env["base"] / "runs" / f"ens-{label}"
        code, _, _ = run_cli(capsys, "zeroshot", "--dataset", "dtd", "--model", env["model"], "--out", out_dir,
                             "--ensemble", value, "-q")
        assert code == 0
        saved = read_json(out_dir / "config.json")
        assert saved["method"] == "ensemble"
        if label == "file":
            assert saved["method_config"]["templates"] == ["a photo of a {}.", "itap of a {}."]
        else:
            assert saved["method_config"]["template_set"] == "coop7"
        assert read_json(out_dir / "results.json")["metrics"]["num_samples"] == 15
    code, _, err = run_cli(capsys, "zeroshot", "--dataset", "dtd", "--model", env["model"], "--out",
                           env["base"] / "runs" / "ens-bad", "--ensemble", "clip81")
    assert code == 2 and "neither a template set" in err


def test_untrained_coop_equals_zero_shot_through_the_pipeline(env, capsys):
    runs = env["base"] / "runs"
    code, _, _ = run_cli(capsys, "zeroshot", "--dataset", "dtd", "--model", env["model"], "--out", runs / "zs-photo",
                         "--template", "a photo of a {}.", "-q")
    assert code == 0
    # lr 1e-12 moves context vectors of size ~1e-2 by far less than their fp32 spacing: the context stays as
    # initialised from "a photo of a", where CoOp's logits equal zero-shot CLIP's
    code, _, _ = run_cli(capsys, "train", "--method", "coop", "--dataset", "dtd", "--shots", "1", "--epochs", "2",
                         "--lr", "1e-12", "--warmup-lr", "1e-12", "--ctx-init", "a photo of a", "--model",
                         env["model"], "--out", runs / "coop-untrained", "--precision", "fp32", "-q")
    assert code == 0
    zs, coop = read_json(runs / "zs-photo" / "results.json"), read_json(runs / "coop-untrained" / "results.json")
    assert coop["metrics"]["confusion_matrix"] == zs["metrics"]["confusion_matrix"]
    assert coop["metrics"]["accuracy"] == zs["metrics"]["accuracy"]


def test_linear_probe_run(env, capsys):
    out = env["base"] / "runs" / "lp"
    code, _, _ = run_cli(capsys, "linear-probe", "--dataset", "dtd", "--shots", "2", "--seed", "2", "--model",
                         env["model"], "--out", out, "--c-grid", "1", "0.01", "--search-steps", "2", "-q")
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "fewshot.json", "prompt.safetensors", "results.json", "log.txt"} <= names
    assert "state.json" not in names
    results = read_json(out / "results.json")
    fit = results["fit"]
    assert fit["kind"] == "closed_form" and fit["num_train"] == 10 and len(fit["refine"]) == 2
    assert fit["c"] > 0 and 0 <= fit["val_accuracy"] <= 100
    assert results["config"]["method_config"]["search_steps"] == 2 and len(fit["coarse"]) == 2
    code, _, err = run_cli(capsys, "eval", out, "--dataset", "oxford_flowers")
    assert code == 2 and "linear probe" in err


def test_resume_after_an_interruption_matches_the_uninterrupted_run(trained, env, capsys):
    out = env["base"] / "runs" / "interrupted"
    config = RunConfig(method="coop", dataset="dtd", method_config={"n_ctx": 4}, root=str(FIXTURES), shots=2, seed=1,
                       model=env["model"], train=TrainConfig(epochs=4, lr=0.05, device="cpu", precision="fp32"))

    def stop_after_two(stats):
        if stats.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, on_epoch_end=stop_after_two)
    assert read_json(out / "state.json")["epoch"] == 2 and not (out / "results.json").exists()
    code, _, err = run_cli(capsys, "train", *TRAIN_ARGS, "--model", env["model"], "--out", out)
    assert code == 2 and "--resume" in err  # an unfinished run needs --resume
    code, _, _ = run_cli(capsys, "train", *TRAIN_ARGS, "--model", env["model"], "--out", out, "--resume")
    assert code == 0
    resumed, straight = load_params(out), load_params(trained)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[key], straight[key]) for key in resumed)
    assert read_json(out / "results.json")["metrics"] == read_json(trained / "results.json")["metrics"]
    assert read_json(out / "results.json")["fit"]["resumed_after_epoch"] == 2


def test_a_run_folder_in_use_is_refused(trained, env, capsys):
    before = (trained / "results.json").read_bytes()
    fd = os.open(trained / "run.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a training process holds
        code, _, err = run_cli(capsys, "eval", trained, "--dataset", "oxford_flowers", "--name", "busy")
        assert code == 2 and "in use" in err
        code, _, err = run_cli(capsys, "train", *TRAIN_ARGS, "--model", env["model"], "--out", trained, "--overwrite")
        assert code == 2 and "in use" in err
        code, _, err = run_cli(capsys, "interpret", trained)
        assert code == 2 and "in use" in err
    finally:
        os.close(fd)
    assert (trained / "results.json").read_bytes() == before
    assert not (trained / "eval-busy.json").exists() and not (trained / "previous").exists()


def test_unknown_method_dataset_and_stray_options(env, capsys):
    out = env["base"] / "runs" / "never"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error for a choice: usage, message, exit 2
        main(["train", "--method", "coap", "--dataset", "dtd", "--out", str(out)])
    assert exit_info.value.code == 2 and "invalid choice: 'coap'" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "train", "--method", "coop", "--dataset", "textures9", "--model", env["model"],
                           "--out", out)
    assert code == 2 and "unknown dataset 'textures9'" in err
    code, _, err = run_cli(capsys, "train", "--method", "coop", "--dataset", "dtd", "--meta-net-reduction", "4",
                           "--model", env["model"], "--out", out)
    assert code == 2 and "--meta-net-reduction (an option of cocoop)" in err
    code, _, err = run_cli(capsys, "train", "--method", "coop", "--dataset", "dtd", "--eval-new", "--model",
                           env["model"], "--out", out)
    assert code == 2 and "--subset base" in err
    assert not out.exists()  # refused before the run folder was created


def test_an_unreadable_dataset_image_is_named_and_earlier_results_stay(env, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(FIXTURES / "dtd", root / "dtd")
    broken = root / "dtd" / "images" / "bumpy" / load_dataset("dtd", FIXTURES).test[-1].path.split("/")[-1]
    assert broken.is_file()
    broken.write_bytes(b"\xff\xd8 truncated")
    out = env["base"] / "runs" / "zs-broken"
    assert run_cli(capsys, "zeroshot", "--dataset", "dtd", "--model", env["model"], "--out", out, "-q")[0] == 0
    before = (out / "results.json").read_bytes()
    code, _, err = run_cli(capsys, "zeroshot", "--dataset", "dtd", "--root", root, "--model", env["model"], "--out",
                           out, "--overwrite", "-q")
    assert code == 2 and broken.name in err and "Traceback" not in err
    assert (out / "previous" / "results.json").read_bytes() == before  # kept until a new run finishes


def test_class_specific_context_cannot_transfer_and_is_refused_before_training(env, capsys):
    out = env["base"] / "runs" / "csc"
    code, _, err = run_cli(capsys, "train", *TRAIN_ARGS, "--csc", "--model", env["model"], "--out", out,
                           "--also-eval", "oxford_flowers")
    assert code == 2 and "class-specific" in err
    assert not (out / "state.json").exists()


@pytest.mark.parametrize("command", ["train", "eval", "zeroshot", "linear-probe", "predict", "interpret"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    if command == "train":
        for flag in ("--n-ctx", "--ctx-init", "--csc", "--class-token-position", "--meta-net-reduction", "--lr",
                     "--epochs", "--batch-size", "--precision", "--device", "--views", "--subset", "--budget",
                     "--resume", "--overwrite", "--template-set", "--c-grid"):
            assert flag in text
        assert "options of coop and cocoop" in text and "default: coop 16, cocoop 4" in text
