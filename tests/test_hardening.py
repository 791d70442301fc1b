"""Issue 14: the defects found by using vlprompt as a hostile or clumsy user would, one regression test per item, and
the table of bad inputs that every command must answer with exit status 2, one paragraph and no traceback.

Read-only folders and a full disk are simulated (the suite may run as root, for whom permissions do not apply):
:func:`deny_writes` makes the OS refuse to create or write anything under a folder, as a read-only mount does, and
:func:`disk_full` makes every fsync fail with ENOSPC, as a full disk answers a write-back.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from clip_formats import save_openai_state_dict, write_hf_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from support import class_folders, write_image

from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.backbone.tokenizer import tokenize
from vlprompt.backbone.transforms import load_image
from vlprompt.common.io import atomic_write_text
from vlprompt.data import load_dataset
from vlprompt.errors import CheckpointError, ConfigError, DatasetError, VlpromptError
from vlprompt.evaluation.metrics import evaluate
from vlprompt.features.cache import FeatureCache
from vlprompt.features.extract import extract_features
from vlprompt.harness.cli.main import main
from vlprompt.methods import get_method
from vlprompt.methods.configs import CoOpConfig
from vlprompt.methods.prompt_file import save_prompt
from vlprompt.prediction.predictor import Predictor, parse_classnames
from vlprompt.harness.config import RunConfig

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "coop_data"
DTD_IMAGE = FIXTURES / "dtd" / "images" / "banded" / "banded_0024.jpg"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures (../shared) absent")

COMMON = ["--shots", "2", "--seed", "1", "--device", "cpu", "-q"]
TRAIN = ["train", "--method", "coop", "--dataset", "dtd", *COMMON, "--epochs", "2", "--n-ctx", "4"]


# --------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private cache, the fixture data root in the environment, a tiny CLIP as a file and as a HF folder."""
    base = tmp_path_factory.mktemp("hardening")
    patch = pytest.MonkeyPatch()
    patch.setenv("VLPROMPT_CACHE", str(base / "cache"))
    patch.setenv("VLPROMPT_DATA_ROOT", str(FIXTURES))
    clip = build_tiny_clip("vit", seed=0)
    model = save_openai_state_dict(clip, base / "tiny.pt")
    hf = write_hf_folder(clip, base / "models" / "tiny-hf-clip")
    yield {"base": base, "model": str(model), "hf": hf}
    patch.undo()


@pytest.fixture(scope="module")
def trained(env):
    """A finished CoOp run on the DTD fixture (2 shots, 2 epochs)."""
    out = env["base"] / "runs" / "coop"
    assert main([*TRAIN, "--model", env["model"], "--out", str(out)]) == 0
    return out


def cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_paragraph(err: str, command: str) -> str:
    """The error the CLI printed for ``command``: from ``vlprompt <command>: error:`` to the end, as one line."""
    marker = f"vlprompt {command}: error: "
    assert marker in err, err
    message = err[err.index(marker) + len(marker):]
    assert message.endswith("\n") and "\n" not in message[:-1], f"not one paragraph: {message!r}"
    return message.strip()


def deny_writes(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int = errno.EROFS) -> None:
    """Make the OS refuse to create or open for writing anything under ``folder`` (a read-only mount)."""
    prefix = os.path.abspath(folder)

    def inside(path: object) -> bool:
        name = os.path.abspath(os.fspath(path))  # type: ignore[arg-type]
        return name == prefix or name.startswith(prefix + os.sep)

    real_open, real_mkdir = os.open, os.mkdir

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync fails with ENOSPC (a full disk reports delayed write-back failures there)."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def csv_dataset(folder: Path, labels: list[object], *, template: bytes | None = None) -> Path:
    """``folder/data.csv`` listing one tiny image per label (a names file when every label is an integer)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, label in enumerate(labels):
        write_image(folder / f"img{index:03d}.jpg", index)
        rows.append(f"img{index:03d}.jpg,{label}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if all(isinstance(label, int) for label in labels):
        (folder / "classnames.txt").write_text("zero\none\n", encoding="utf-8")
    if template is not None:
        (folder / "template.txt").write_bytes(template)
    return folder / "data.csv"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- item 1: only runs are overwritten


def test_item1_overwrite_never_touches_a_folder_that_is_not_a_run(env, tmp_path, capsys):
    model = tmp_path / "mymodel"  # `cp -r $M ~/mymodel`: a Hugging Face folder, whose config.json is not a run's
    shutil.copytree(env["hf"], model)
    (model / "notes.txt").write_text("my notes", encoding="utf-8")
    project = tmp_path / "project"  # a project with its own config.json and sources
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text(json.dumps({"method": "mine", "dataset": "mine"}), encoding="utf-8")
    (project / "src" / "main.py").write_text("print('hi')\n", encoding="utf-8")
    for folder in (model, project):
        before = snapshot(folder)
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, _, err = cli(capsys, *TRAIN, "--model", env["model"], "--out", folder, *extra)
            message = error_paragraph(err, "train")
            assert code == 2 and "not a vlprompt run folder" in message and "--overwrite" not in message
        assert snapshot(folder) == before  # nothing moved to previous/, nothing deleted


# ----------------------------------------------------------------- item 16: a failed start is restarted as corrected


def test_item16_a_run_that_failed_before_finishing_anything_is_restarted_by_the_corrected_command(env, tmp_path,
                                                                                                  capsys):
    data = tmp_path / "pets"
    rows = []
    for name in ("cat", "dog"):
        for index, split in enumerate(("train", "train", "val", "test", "test")):
            write_image(data / f"{name}{index}.jpg", index)
            rows.append(f"{name}{index}.jpg,{name},{split}")
    (data / "list.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (data / "cat0.jpg").write_bytes(b"not a jpeg")  # unreadable, and one of the 2 shots of its class
    spec = f"csv:{data / 'list.csv'}"
    argv = ["train", "--method", "coop", "--dataset", spec, *COMMON, "--epochs", "2", "--n-ctx", "2",
            "--model", env["model"], "--out", tmp_path / "run"]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "--skip-bad-images" in error_paragraph(err, "train")
    code, _, err = cli(capsys, *argv, "--skip-bad-images")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))["skipped_images"]["count"] == 1
    root = tmp_path / "root"  # the bench runs built-in datasets: DTD with every training image of one class broken
    shutil.copytree(FIXTURES / "dtd", root / "dtd")
    split = json.loads((root / "dtd" / "split_zhou_DescribableTextures.json").read_text(encoding="utf-8"))
    for path, label, _ in split["train"]:
        if label == 0:
            (root / "dtd" / "images" / path).write_bytes(b"not a jpeg")
    bench = ["bench", "fewshot", "--out", tmp_path / "bench", "--root", root, "--model", env["model"],
             "--datasets", "dtd",
             "--methods", "coop", "--no-baselines", "--shots", "1", "--seeds", "1", "--epochs", "2"]
    code, out, err = cli(capsys, *bench)
    assert code == 1, out + err  # the run fails on the unreadable image, listed
    code, out, err = cli(capsys, *bench, "--skip-bad-images")
    assert code == 0, out + err
    assert "1 done now, 0 failed" in out


# ---------------------------------------------------------------- item 17: a killed checkpoint write leaves nothing


def test_item17_leftovers_of_a_killed_checkpoint_write_are_cleared_on_resume(env, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--model", env["model"], "--out", out]
    from vlprompt.harness.rundir import RunDir

    config = {"method": "coop", "dataset": "dtd"}
    with RunDir.create_or_open(tmp_path / "plain", config) as run:
        run.save_checkpoint({"w": torch.zeros(2)}, {}, {"epoch": 1})
    for name in (".params.safetensors.next.k1ll3d.tmp", ".optim.safetensors.next.k1ll3d.tmp"):
        (tmp_path / "plain" / name).write_bytes(b"half a tensor file")
    with RunDir.create_or_open(tmp_path / "plain", config, resume=True):
        pass
    assert not list((tmp_path / "plain").glob("*.tmp"))
    assert main([str(a) for a in argv]) == 0  # and through the command line: a finished run is resumed clean
    (out / "results.json").unlink()
    (out / ".params.safetensors.next.k1ll3d.tmp").write_bytes(b"half")
    assert main([str(a) for a in [*argv, "--resume"]]) == 0
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------------------- item 2: huge labels


def test_item2_a_huge_label_is_refused_before_anything_is_allocated(tmp_path):
    """A label of 10**30 (23.7 GB in today's code, or the OOM killer) is refused at once, in a process whose memory
    is capped at 1 GB: the error names the file, the entry and the bound."""
    listed = csv_dataset(tmp_path / "csv", [0, 1, 0, 1, 0, 1, 0, 1, 0, 10**30])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [["csv/img000.jpg", 0, "zero"], ["csv/img001.jpg", 10**9, "one"]],
                                 "val": [], "test": [["csv/img002.jpg", 0, "zero"]]}), encoding="utf-8")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from vlprompt.harness.cli.main import main; sys.exit(main(sys.argv[1:]))")
    for spec, entry, bound in ((f"csv:{listed}", "line 10", "0..2"), (f"json:{split}", "train[1]", "0..1")):
        done = subprocess.run([sys.executable, "-c", code, "data", "split", spec], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "VLPROMPT_CACHE": str(tmp_path / "cache")})
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and entry in done.stderr and bound in done.stderr, done.stderr


# ----------------------------------------------------------------------------------- item 3: divergence, NaN JSON


def test_item3_a_divergence_in_the_last_update_saves_nothing(env, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *TRAIN, "--model", env["model"], "--lr", "1e30", "--out", out)
    assert code == 2, err
    assert "training diverged" in error_paragraph(err, "train")
    assert not (out / "prompt.safetensors").exists() and not (out / "results.json").exists()


def test_item3_non_finite_logits_never_become_a_score_or_a_prediction():
    from vlprompt.common.io import json_text
    from vlprompt.errors import NonFiniteError

    clip = build_tiny_clip("vit", seed=0)
    coop = get_method("coop").build(clip, ["cat", "dog"], CoOpConfig(n_ctx=2))
    with torch.no_grad():
        coop.ctx.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or infinite logits"):
        evaluate(coop.classifier(), torch.randn(3, clip.config.embed_dim), torch.tensor([0, 1, 0]), ["cat", "dog"])
    with pytest.raises(NonFiniteError):
        Predictor(coop).predict(torch.rand(3, 40, 40), top_k=1)
    assert json.loads(json_text({"p": float("nan"), "q": [float("inf"), 1.5]})) == {"p": None, "q": [None, 1.5]}


# ------------------------------------------------------------------------------------------- item 4: HF q_proj


def test_item4_a_wrongly_shaped_q_proj_is_a_checkpoint_error(env, tmp_path):
    broken = tmp_path / "hf"
    shutil.copytree(env["hf"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] // 2)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q/k/v projections"):
        load_clip(broken)


# ------------------------------------------------------------------------------------- item 5: refused writes


def test_item5_refused_writes_say_what_and_where_and_lose_nothing(env, trained, capsys, monkeypatch, tmp_path):
    results = (trained / "results.json").read_bytes()
    with monkeypatch.context() as patch:
        deny_writes(patch, trained)
        code, _, err = cli(capsys, "eval", trained, "--dataset", "oxford_flowers", "-q")
    message = error_paragraph(err, "eval")
    assert code == 2 and f"cannot write {trained}" in message and "Nothing already finished was lost" in message
    report_out = tmp_path / "report"
    with monkeypatch.context() as patch:
        deny_writes(patch, report_out)
        code, _, err = cli(capsys, "report", trained.parent, "--out", report_out)
    assert code == 2 and f"cannot write {report_out}" in error_paragraph(err, "report")
    with monkeypatch.context() as patch:
        disk_full(patch)
        code, _, err = cli(capsys, "eval", trained, "--dataset", "oxford_flowers", "-q")
    assert code == 2 and "No space left" in error_paragraph(err, "eval")
    assert (trained / "results.json").read_bytes() == results
    assert not [p for p in trained.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------- item 6: "²"


def test_item6_a_label_that_only_looks_like_a_number_is_named(tmp_path):
    listed = csv_dataset(tmp_path / "csv", [0, 1, 0, 1, "²", 1, 0, 1])
    with pytest.raises(DatasetError, match=r"line 5: '²'"):
        load_dataset(f"csv:{listed}", cache_dir=tmp_path / "cache")


# -------------------------------------------------------------------------------- item 7: config without dataset


def test_item7_a_run_config_without_dataset_is_a_clear_error(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    del config["dataset"]
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="lacks the required key"):
        RunConfig.from_dict(config)
    for argv in (["eval", run, "--dataset", "oxford_flowers"], ["interpret", run], ["predict", run, DTD_IMAGE]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "'dataset'" in error_paragraph(err, argv[0])


# ------------------------------------------------------------------------------------------ item 8: one class


def test_item8_one_class_linear_probe_is_refused_and_one_class_scores_warn(env, tmp_path, capsys, caplog):
    data = tmp_path / "one"
    class_folders(data, {"cat": 6})
    code, _, err = cli(capsys, "linear-probe", "--dataset", f"folder:{data}", *COMMON, "--model", env["model"],
                       "--out", tmp_path / "lp")
    assert code == 2 and "at least two classes" in error_paragraph(err, "linear-probe")
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        code, _, err = cli(capsys, "zeroshot", "--dataset", f"folder:{data}", "--device", "cpu", "-q", "--model",
                           env["model"], "--out", tmp_path / "zs")
    assert code == 0 and "measures nothing" in err + caplog.text


# ------------------------------------------------------------------------------------ item 9: non-UTF-8 files


def test_item9_a_non_utf8_classes_file_is_named(env, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_bytes("café\nthé\n".encode("latin-1"))
    code, _, err = cli(capsys, "predict", "--model", env["model"], "--classes-file", names, DTD_IMAGE)
    assert code == 2 and "not UTF-8" in error_paragraph(err, "predict")


# -------------------------------------------------------------------------------- item 10: reproducible bytes


def test_item10_identical_prompts_give_identical_files(tmp_path):
    from vlprompt.common.io import safetensors_bytes

    clip = build_tiny_clip("vit", seed=0)
    coop = get_method("coop").build(clip, ["cat", "dog"], CoOpConfig(n_ctx=2))
    blobs = {save_prompt(coop, tmp_path / f"p{i}.safetensors").read_bytes() for i in range(6)}
    assert len(blobs) == 1
    metadata = {f"key{i}": str(i) for i in range(8)}
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, dtype=torch.float64)}
    assert len({safetensors_bytes(tensors, metadata) for _ in range(6)}) == 1
    (tmp_path / "t.safetensors").write_bytes(safetensors_bytes(tensors, metadata))
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


# ------------------------------------------------------------------------- item 11: contradictions, duplicates


def test_item11_contradictions_are_refused_and_overlaps_warned(tmp_path, caplog):
    folder = tmp_path / "csv"
    listed = csv_dataset(folder, ["cat", "dog"] * 4)
    listed.write_text(listed.read_text(encoding="utf-8") + "img000.jpg,dog\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"img000.jpg \(labels 0 'cat' and 1 'dog'\)"):
        load_dataset(f"csv:{listed}", cache_dir=tmp_path / "cache")
    listed = csv_dataset(tmp_path / "given", ["cat", "dog"] * 4)  # a fresh folder: no split created from a list
    rows = [f"img{i:03d}.jpg,{'dog' if i % 2 else 'cat'},{'train' if i < 4 else 'val' if i < 6 else 'test'}"
            for i in range(8)]
    listed.write_text("\n".join([*rows, "img000.jpg,cat,test", "img001.jpg,dog,train"]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        load_dataset(f"csv:{listed}", cache_dir=tmp_path / "cache")
    assert "twice in the same split" in caplog.text and "several splits" in caplog.text
    (listed.parent / "classnames_override.json").write_text(json.dumps({"cat": "Dog"}), encoding="utf-8")
    with pytest.raises(DatasetError, match="same name"):
        load_dataset(f"csv:{listed}", cache_dir=tmp_path / "cache")
    for classes, match in (("cat,cat", "same name"), (" , dog", "empty entries"), ("Sea lion,sea  lion", "same")):
        with pytest.raises(ConfigError, match=match):
            parse_classnames(classes)


# ---------------------------------------------------------------------- item 12: HF sizes, copied prompt files


def test_item12_a_hf_config_that_disagrees_with_the_weights_is_refused(env, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(env["hf"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["image_size"] = 64
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="image_size is 64 but the weights have 32"):
        load_clip(folder)


def test_item12_a_prompt_copied_in_from_another_run_is_refused(env, trained, tmp_path, capsys):
    other = tmp_path / "flowers"
    assert main([*TRAIN, "--dataset", "oxford_flowers", "--model", env["model"], "--out", str(other)]) == 0
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.copy(other / "prompt.safetensors", run / "prompt.safetensors")
    for argv in (["predict", run, DTD_IMAGE], ["eval", run, "--dataset", "oxford_flowers"], ["interpret", run]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "was not written by the run" in error_paragraph(err, argv[0])


# --------------------------------------------------------------------------------------------- item 13: umask


def test_item13_written_files_follow_the_umask(env, trained, tmp_path):
    """A colleague (or a web server) can read a run and a report when the umask lets them."""
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(atomic_write_text(tmp_path / "a.txt", "x").stat().st_mode) == 0o644
        run = tmp_path / "runs" / "zs"
        assert main(["zeroshot", "--dataset", "dtd", "--device", "cpu", "-q", "--model", env["model"],
                     "--out", str(run)]) == 0
        assert main(["report", str(trained.parent), "--out", str(tmp_path / "report"), "--format", "md,csv"]) == 0
        os.umask(0o027)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "b.txt", "x").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    for folder in (run, tmp_path / "report"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o644}, modes


# --------------------------------------------------------------------------------- item 14: backbone labels


def test_item14_reports_name_a_backbone_path_by_its_short_name(env, tmp_path):
    out = tmp_path / "runs" / "zs"
    assert main(["zeroshot", "--dataset", "dtd", "--device", "cpu", "-q", "--model", str(env["hf"]),
                 "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["backbone"] == "tiny-hf-clip"
    assert main(["report", str(tmp_path / "runs"), "--format", "md"]) == 0
    tables = (tmp_path / "runs" / "report" / "tables.md").read_text(encoding="utf-8")
    assert "tiny-hf-clip" in tables and str(env["hf"]) not in tables


# ------------------------------------------------------------------------------------- item 15: the messages


def test_item15_unreadable_images_point_to_the_cli_flag(tmp_path):
    write_image(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    from vlprompt.data import Item

    with pytest.raises(DatasetError, match="--skip-bad-images"):
        extract_features(build_tiny_clip("vit", seed=0), tmp_path, [Item("good.jpg", 0), Item("bad.jpg", 0)])


def test_item15_missing_images_advice_fits_where_the_split_comes_from(tmp_path):
    """A list file is the dataset: removing a split file cannot help, fixing the list does."""
    listed = csv_dataset(tmp_path / "csv", ["cat", "dog"] * 4)
    (tmp_path / "csv" / "img003.jpg").unlink()
    with pytest.raises(DatasetError) as from_csv:
        load_dataset(f"csv:{listed}", cache_dir=tmp_path / "cache")
    assert f"remove their rows from {listed}" in str(from_csv.value)
    assert "remove the split file to create" not in str(from_csv.value)


def test_item15_budget_banner_states_the_epochs_run(tmp_path, capsys):
    code, out, _ = cli(capsys, "bench", "fewshot", "--out", tmp_path, "--dry-run", "--budget", "--datasets", "dtd",
                       "--shots", "1", "--seeds", "1", "--epochs", "150")
    assert code == 0 and out.splitlines()[0].startswith("*** SMOKE TEST (--budget): 150 training epochs")


def test_item15_too_long_text_says_what_to_shorten_on_the_command_line():
    with pytest.raises(ConfigError, match=r"--template or --ctx-init on the command line"):
        tokenize(["word " * 100])


def test_item15_options_may_follow_the_run_folder(trained, capsys):
    code, out, err = cli(capsys, "predict", trained, "--top-k", "2", DTD_IMAGE, "--json")
    assert code == 0, err
    assert len(json.loads(out)["predictions"][0]["top_k"]) == 2
    with pytest.raises(SystemExit) as stopped:
        main(["predict", str(trained), "--no-such-option", str(DTD_IMAGE)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "usage: vlprompt predict" in err and "--no-such-option" in err


def test_item15_an_unknown_openai_name_lists_the_known_ones():
    with pytest.raises(CheckpointError, match=r"not one of OpenAI's CLIP models: the known names are RN50"):
        load_clip("ViT-B/99")


def test_item15_urls_are_not_taken_for_missing_files(trained, capsys):
    code, _, err = cli(capsys, "predict", trained, "https://example.com/cat.jpg")
    assert code == 2 and "is a URL: vlprompt does not download images" in error_paragraph(err, "predict")


def test_item15_a_very_large_image_logs_one_warning(tmp_path, monkeypatch, caplog):
    path = write_image(tmp_path / "big.png", size=(12, 12))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: over the limit, under twice it
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING, logger="vlprompt"):
        warnings.simplefilter("always")
        load_image(path)
    assert not [w for w in raw if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "very large (12 x 12 pixels" in caplog.text


def test_item15_waiting_for_a_locked_cache_is_announced(tmp_path, caplog):
    cache = FeatureCache(tmp_path, timeout=0.2)
    cache.put_many([("a", [1.0])])
    other = sqlite3.connect(cache.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.WARNING, logger="vlprompt"), pytest.raises(VlpromptError, match="--no-cache"):
            cache.put_many([("b", [2.0])])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "waiting up to 0.2 s" in caplog.text and "--no-cache" in caplog.text


# ----------------------------------------------------------------------------------- the table of bad inputs


def _copy_run(trained: Path, tmp: Path, edit: Callable[[Path], None]) -> Path:
    run = tmp / "run"
    shutil.copytree(trained, run)
    edit(run)
    return run


def _drop_dataset(run: Path) -> None:
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    del config["dataset"]
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")


def _foreign_prompt(run: Path) -> None:
    """The prompt file of another run on the same backbone (its configuration hash is not this run's)."""
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    clip = load_clip(config["model"])
    method = get_method("coop").build(clip, ["cat", "dog"], CoOpConfig(n_ctx=4))
    save_prompt(method, run / "prompt.safetensors", run="0123456789abcdef")


def _damaged_q_proj(env: dict, tmp: Path) -> str:
    folder = tmp / "hf-q"
    shutil.copytree(env["hf"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    weights[key] = torch.zeros(weights[key].shape[0], 3)
    save_file(weights, str(folder / "model.safetensors"))
    return str(folder)


def _wrong_image_size(env: dict, tmp: Path) -> str:
    folder = tmp / "hf-size"
    shutil.copytree(env["hf"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["image_size"] = 224
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def _latin1(tmp: Path, text: str) -> Path:
    path = tmp / "latin1.txt"
    path.write_bytes(text.encode("latin-1"))
    return path


# each case: (id, command, argv builder (env, trained run, tmp folder, monkeypatch) -> argv)
Case = tuple[str, Callable[..., list[object]]]
BAD_MODELS: dict[str, Callable[[dict, Path], str]] = {
    "unknown-openai-name": lambda env, tmp: "ViT-B/99",
    "hf-q-proj-shape": _damaged_q_proj,
    "hf-image-size": _wrong_image_size,
}
BAD_DATA: dict[str, Callable[[Path], str]] = {
    "huge-label": lambda tmp: f"csv:{csv_dataset(tmp / 'huge', [0, 1] * 4 + [10**30])}",
    "superscript-label": lambda tmp: f"csv:{csv_dataset(tmp / 'sup', [0, 1] * 4 + ['²'])}",
    "two-labels-one-image": lambda tmp: f"csv:{_contradiction(tmp)}",
    "non-utf8-template": lambda tmp: f"csv:{csv_dataset(tmp / 'tpl', [0, 1] * 4, template='é {}'.encode('latin-1'))}",
}


def _contradiction(tmp: Path) -> Path:
    listed = csv_dataset(tmp / "contra", ["cat", "dog"] * 4)
    listed.write_text(listed.read_text(encoding="utf-8") + "img000.jpg,dog\n", encoding="utf-8")
    return listed


def _cases() -> list[tuple[str, str, Callable[..., list[object]]]]:
    cases: list[tuple[str, str, Callable[..., list[object]]]] = []
    # bad data, for every command that reads a dataset
    for name, data in BAD_DATA.items():
        cases += [
            (f"train-{name}", "train", lambda e, r, t, m, d=data: [*TRAIN, "--dataset", d(t), "--model", e["model"],
                                                                    "--out", t / "o"]),
            (f"zeroshot-{name}", "zeroshot", lambda e, r, t, m, d=data: [
                "zeroshot", "--dataset", d(t), "--device", "cpu", "-q", "--model", e["model"], "--out", t / "o"]),
            (f"linear-probe-{name}", "linear-probe", lambda e, r, t, m, d=data: [
                "linear-probe", "--dataset", d(t), *COMMON, "--model", e["model"], "--out", t / "o"]),
            (f"eval-{name}", "eval", lambda e, r, t, m, d=data: ["eval", r, "--dataset", d(t), "-q"]),
            (f"data-check-{name}", "data", lambda e, r, t, m, d=data: ["data", "check", d(t), "--no-decode"]),
            (f"data-split-{name}", "data", lambda e, r, t, m, d=data: ["data", "split", d(t)]),
            (f"data-fewshot-{name}", "data", lambda e, r, t, m, d=data: [
                "data", "fewshot", d(t), "--shots", "1", "--seed", "1", "--out", t / "f.json"]),
        ]
    # bad backbones, for every command that loads one
    for name, model in BAD_MODELS.items():
        cases += [
            (f"train-{name}", "train", lambda e, r, t, m, b=model: [*TRAIN, "--model", b(e, t), "--out", t / "o"]),
            (f"zeroshot-{name}", "zeroshot", lambda e, r, t, m, b=model: [
                "zeroshot", "--dataset", "dtd", "--device", "cpu", "-q", "--model", b(e, t), "--out", t / "o"]),
            (f"linear-probe-{name}", "linear-probe", lambda e, r, t, m, b=model: [
                "linear-probe", "--dataset", "dtd", *COMMON, "--model", b(e, t), "--out", t / "o"]),
            (f"predict-{name}", "predict", lambda e, r, t, m, b=model: [
                "predict", "--model", b(e, t), "--classes", "cat,dog", DTD_IMAGE]),
            (f"predict-run-{name}", "predict", lambda e, r, t, m, b=model: ["predict", r, "--model", b(e, t),
                                                                             DTD_IMAGE]),
            (f"eval-{name}", "eval", lambda e, r, t, m, b=model: ["eval", r, "--dataset", "oxford_flowers",
                                                                   "--model", b(e, t), "-q"]),
            (f"interpret-{name}", "interpret", lambda e, r, t, m, b=model: ["interpret", r, "--model", b(e, t)]),
        ]
    # damaged run folders, for every command that reads one
    for name, edit in (("config-without-dataset", _drop_dataset), ("prompt-from-elsewhere", _foreign_prompt)):
        cases += [
            (f"predict-{name}", "predict", lambda e, r, t, m, f=edit: ["predict", _copy_run(r, t, f), DTD_IMAGE]),
            (f"eval-{name}", "eval", lambda e, r, t, m, f=edit: ["eval", _copy_run(r, t, f), "--dataset",
                                                                  "oxford_flowers", "-q"]),
            (f"interpret-{name}", "interpret", lambda e, r, t, m, f=edit: ["interpret", _copy_run(r, t, f)]),
        ]
    # the rest of the issue's inputs
    cases += [
        ("train-diverges", "train", lambda e, r, t, m: [*TRAIN, "--model", e["model"], "--lr", "1e30",
                                                        "--out", t / "o"]),
        ("linear-probe-one-class", "linear-probe", lambda e, r, t, m: [
            "linear-probe", "--dataset", f"folder:{_one_class(t)}", *COMMON, "--model", e["model"], "--out", t / "o"]),
        ("predict-classes-file-latin1", "predict", lambda e, r, t, m: [
            "predict", "--model", e["model"], "--classes-file", _latin1(t, "café\nthé\n"), DTD_IMAGE]),
        ("predict-ensemble-file-latin1", "predict", lambda e, r, t, m: [
            "predict", "--model", e["model"], "--classes", "cat,dog", "--ensemble", _latin1(t, "a {} café"),
            DTD_IMAGE]),
        ("zeroshot-ensemble-file-latin1", "zeroshot", lambda e, r, t, m: [
            "zeroshot", "--dataset", "dtd", "--device", "cpu", "-q", "--model", e["model"], "--ensemble",
            _latin1(t, "a {} café"), "--out", t / "o"]),
        ("predict-classes-twice", "predict", lambda e, r, t, m: ["predict", "--model", e["model"], "--classes",
                                                                 "cat,cat", DTD_IMAGE]),
        ("predict-classes-empty-entry", "predict", lambda e, r, t, m: ["predict", "--model", e["model"],
                                                                       "--classes", " , dog", DTD_IMAGE]),
        ("predict-url", "predict", lambda e, r, t, m: ["predict", r, "https://example.com/cat.jpg"]),
        ("predict-too-long-class", "predict", lambda e, r, t, m: ["predict", "--model", e["model"], "--classes",
                                                                  "cat," + "very " * 80, DTD_IMAGE]),
        ("eval-read-only-run", "eval", lambda e, r, t, m: _read_only(m, r, ["eval", r, "--dataset",
                                                                            "oxford_flowers", "-q"])),
        ("report-read-only-out", "report", lambda e, r, t, m: _read_only(m, t / "rep", ["report", r.parent,
                                                                                        "--out", t / "rep"])),
        ("data-fewshot-read-only-out", "data", lambda e, r, t, m: _read_only(m, t / "ro", [
            "data", "fewshot", "dtd", "--shots", "1", "--seed", "1", "--out", t / "ro" / "f.json"])),
        ("data-split-read-only-out", "data", lambda e, r, t, m: _read_only(m, t / "ro", [
            "data", "split", f"csv:{csv_dataset(t / 'ok', ['cat', 'dog'] * 4)}", "--out", t / "ro" / "s.json"])),
        ("train-overwrite-a-model-folder", "train", lambda e, r, t, m: [
            *TRAIN, "--model", e["model"], "--out", _model_copy(e, t), "--overwrite"]),
        ("train-resume-read-only-run", "train", lambda e, r, t, m: _read_only(m, _unfinished(r, t), [
            *TRAIN, "--model", e["model"], "--out", t / "run", "--resume"])),
        ("train-read-only-out", "train", lambda e, r, t, m: _read_only(m, t / "ro", [
            *TRAIN, "--model", e["model"], "--out", t / "ro" / "run"])),
        ("bench-read-only-out", "bench", lambda e, r, t, m: _read_only(m, t / "ro", [
            "bench", "fewshot", "--out", t / "ro", "--model", e["model"], "--datasets", "dtd", "--methods", "coop",
            "--no-baselines", "--shots", "1", "--seeds", "1", "--epochs", "2"])),
        ("bench-disk-full", "bench", lambda e, r, t, m: _full(m, [
            "bench", "fewshot", "--out", t / "b", "--model", e["model"], "--datasets", "dtd", "--methods", "coop",
            "--no-baselines", "--shots", "1", "--seeds", "1", "--epochs", "2"])),
        ("train-disk-full", "train", lambda e, r, t, m: _full(m, [*TRAIN, "--model", e["model"], "--out", t / "o"])),
        ("zeroshot-disk-full", "zeroshot", lambda e, r, t, m: _full(m, [
            "zeroshot", "--dataset", "dtd", "--device", "cpu", "-q", "--model", e["model"], "--out", t / "o"])),
        ("linear-probe-disk-full", "linear-probe", lambda e, r, t, m: _full(m, [
            "linear-probe", "--dataset", "dtd", *COMMON, "--model", e["model"], "--out", t / "o"])),
        ("eval-disk-full", "eval", lambda e, r, t, m: _full(m, ["eval", r, "--dataset", "oxford_flowers", "-q"])),
        ("report-disk-full", "report", lambda e, r, t, m: _full(m, ["report", r.parent, "--out", t / "rep"])),
        ("data-fewshot-disk-full", "data", lambda e, r, t, m: _full(m, [
            "data", "fewshot", "dtd", "--shots", "1", "--seed", "1", "--out", t / "f.json"])),
        ("cache-stats-dir-is-a-file", "cache", lambda e, r, t, m: ["cache", "stats", "--dir", _file(t)]),
        ("cache-clear-dir-is-a-file", "cache", lambda e, r, t, m: ["cache", "clear", "--dir", _file(t), "--yes"]),
    ]
    return cases


def _model_copy(env: dict, tmp: Path) -> Path:
    shutil.copytree(env["hf"], tmp / "mymodel")
    return tmp / "mymodel"


def _unfinished(trained: Path, tmp: Path) -> Path:
    """A copy of the trained run without its results: what `train --resume` would continue."""
    run = tmp / "run"
    shutil.copytree(trained, run)
    (run / "results.json").unlink()
    return run


def _one_class(tmp: Path) -> Path:
    class_folders(tmp / "one", {"cat": 6})
    return tmp / "one"


def _file(tmp: Path) -> Path:
    path = tmp / "not-a-folder"
    path.write_text("x", encoding="utf-8")
    return path


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path, argv: list[object]) -> list[object]:
    deny_writes(monkeypatch, folder)
    return argv


def _full(monkeypatch: pytest.MonkeyPatch, argv: list[object]) -> list[object]:
    disk_full(monkeypatch)
    return argv


@pytest.mark.parametrize(("command", "build"), [case[1:] for case in _cases()], ids=[case[0] for case in _cases()])
def test_every_command_answers_bad_input_with_one_paragraph_and_status_2(env, trained, tmp_path, monkeypatch,
                                                                          capsys, command, build):
    argv = build(env, trained, tmp_path, monkeypatch)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors are not what this table is about
        pytest.fail(f"argparse rejected {argv}: {exc}")
    except BaseException as exc:  # noqa: BLE001 - any escaping exception is the traceback the CLI must not print
        pytest.fail(f"{type(exc).__name__} escaped (a traceback): {exc}")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = error_paragraph(err, command)
    assert len(message) > 20
