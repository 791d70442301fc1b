"""`vlprompt bench` end to end with the real pipeline, a tiny random CLIP and the fixture photographs: a --budget
protocol completes and `vlprompt report` turns it into tables, plots and HTML; a killed protocol completes only what
was missing; cross-dataset and domain generalisation share the ImageNet-trained runs (synthetic ImageNet layout)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("vlprompt.harness.pipeline")

from support import FIXTURES, needs_fixtures  # noqa: E402

from vlprompt.common.vocab import slug as slugify  # noqa: E402
from vlprompt.harness.bench.execute import RunRequest  # noqa: E402
from vlprompt.harness.bench.launch import execute_plan  # noqa: E402
from vlprompt.harness.bench.protocols import ProtocolOptions, build_plan  # noqa: E402
from vlprompt.harness.bench.runner import PipelineRunner  # noqa: E402
from vlprompt.harness.bench.status import RunState, inspect_run  # noqa: E402
from vlprompt.harness.cli.main import main  # noqa: E402
from vlprompt.training.config import TrainConfig  # noqa: E402

pytestmark = [needs_fixtures, pytest.mark.usefixtures("private_cache")]


def bench(*args: str) -> int:
    return main(["bench", *args, "--precision", "fp32"])


def results(out: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.rglob("*.json"))
            if p.name == "results.json" or p.name.startswith("eval-")]


@pytest.mark.slow
def test_budget_fewshot_runs_end_to_end_and_reports(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "out"
    args = ["fewshot", "--out", str(out), "--root", str(FIXTURES), "--model", str(tiny_model_file), "--datasets",
            "dtd", "oxford_flowers", "--shots", "1", "2", "--seeds", "1", "2", "--budget"]
    assert bench(*args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("*** SMOKE TEST (--budget)")
    assert "18 run(s): 0 already finished, 18 done now, 0 failed, 0 not finished" in printed
    found = results(out)
    assert len(found) == 18
    assert {(r["protocol"], r["budget"], r["model"]) for r in found} == {("fewshot", True, str(tiny_model_file))}
    assert sorted({(r["method"], r["shots"]) for r in found}) == [
        ("coop", 1), ("coop", 2), ("linear_probe", 1), ("linear_probe", 2), ("zeroshot", 0)]
    coop = json.loads((out / "fewshot-budget/tiny/dtd/coop/shots2/seed2/results.json").read_text())
    assert coop["config"]["train"]["epochs"] == 2 and coop["seed"] == 2
    assert coop["metrics"]["num_samples"] == 15  # the fixture's whole test split: 5 classes x 3
    summary = json.loads((out / "bench-fewshot-budget.json").read_text())
    assert summary["budget"] is True and "SMOKE TEST" in summary["banner"] and summary["unfinished"] == []

    assert bench(*args) == 0  # again: nothing to do
    assert "18 run(s): 18 already finished, 0 done now" in capsys.readouterr().out

    assert main(["report", str(out)]) == 0
    report = out / "report"
    slug = slugify(tiny_model_file.stem) + "-budget"  # files are named after the backbone's short name, budget marked
    names = {p.name for p in report.iterdir()}
    for table in ("fewshot_coop", "fewshot_linear-probe", "fewshot_1shots", "fewshot_2shots"):
        assert {f"{slug}_{table}.md", f"{slug}_{table}.csv"} <= names
    assert {f"{slug}_fewshot.png", f"{slug}_fewshot.svg", "report.html", "tables.md"} <= names
    coop_table = (report / f"{slug}_fewshot_coop.md").read_text()
    assert "SMOKE TEST (budget)" in coop_table
    dtd_row = next(line for line in coop_table.splitlines() if line.startswith("| DTD"))
    mean = sum(json.loads((out / f"fewshot-budget/tiny/dtd/coop/shots1/seed{s}/results.json").read_text())
               ["metrics"]["accuracy"] for s in (1, 2)) / 2
    assert f"{mean:.2f}" in dtd_row  # the 1-shot cell: the mean over the two seeds
    assert "SMOKE TEST (budget)" in (report / "report.html").read_text()
    assert "fewshot 18 run(s)" in capsys.readouterr().out


@dataclass
class CountingRunner:
    """The pipeline runner, remembering which runs it was asked to do."""

    keys: list[str] = field(default_factory=list)

    def __call__(self, request: RunRequest) -> None:
        self.keys.append(request.run.key)
        PipelineRunner(progress=False)(request)


@pytest.mark.slow
def test_killed_protocol_completes_only_what_was_missing(tmp_path, tiny_model_file):
    out = tmp_path / "out"
    args = ["fewshot", "--out", str(out), "--root", str(FIXTURES), "--model", str(tiny_model_file), "--datasets", "dtd",
            "--shots", "1", "--seeds", "1", "2", "--budget", "--epochs", "3", "--precision", "fp32"]
    command = [sys.executable, "-c", "import sys; from vlprompt.harness.cli.main import main; sys.exit(main(sys.argv[1:]))",
               "bench", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    done = 0
    assert process.stdout is not None
    for line in process.stdout:  # kill it (no clean-up at all) once 2 of the 5 runs are finished
        done += line.startswith("done ")
        if done == 2:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    runs = build_plan("fewshot", ProtocolOptions(out=out, root=str(FIXTURES), model=str(tiny_model_file), budget=True,
                                                 datasets=("dtd",), shots=(1,), seeds=(1, 2),
                                                 train=TrainConfig(epochs=3, precision="fp32")))
    states = {run.key: inspect_run(run, out).state for run in runs}
    finished = [key for key, state in states.items() if state is RunState.FINISHED]
    assert len(runs) == 5 and 2 <= len(finished) < len(runs)
    assert RunState.BUSY not in states.values()  # the dead process holds nothing

    runner = CountingRunner()
    result = execute_plan(runs, out, runner, log=lambda line: None)
    assert result.exit_code == 0 and result.unfinished == [], "\n".join(
        [*result.lines(), *(p.read_text() for p in (out / ".bench" / "errors").glob("*.json"))])
    assert runner.keys == [key for key in states if key not in finished]  # only the missing ones, in plan order
    assert sorted(result.skipped) == sorted(finished)


def _image(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sorted((FIXTURES / "dtd" / "images").rglob("*.jpg"))[seed], path)
    Image.open(path).verify()


def synthetic_imagenet(root: Path) -> None:
    """A 3-class ImageNet with its four variants (A and R on 2-class subsets), made of fixture photographs."""
    wnids = {"n01": "goldfish", "n02": "tabby cat", "n03": "red fox"}
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    number = 0
    for label, wnid in enumerate(wnids):
        for i in range(3):
            _image(root / "imagenet/images/train" / wnid / f"{wnid}_{i}.JPEG", number := number + 1)
        _image(root / "imagenet/images/val" / wnid / f"val_{label}.JPEG", number := number + 1)
        _image(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg", number)
        _image(root / "imagenet-sketch/images" / wnid / "s.JPEG", number := number + 1)
    for folder, sub, chosen in (("imagenet-adversarial", "imagenet-a", ("n01", "n02")),
                                ("imagenet-rendition", "imagenet-r", ("n02", "n03"))):
        for wnid in chosen:
            _image(root / folder / sub / wnid / "x.jpg", number := number + 1)
    (root / "dtd").symlink_to(FIXTURES / "dtd")


@pytest.mark.slow
def test_crossdataset_and_domainshift_share_the_imagenet_runs(tmp_path, tiny_model_file, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    synthetic_imagenet(root)
    common = ["--out", str(out), "--root", str(root), "--model", str(tiny_model_file), "--methods", "coop",
              "--seeds", "1", "--budget"]
    assert bench("crossdataset", *common, "--targets", "dtd") == 0
    run = out / "transfer-budget/tiny/imagenet/coop/shots16/seed1"
    assert sorted(p.name for p in run.glob("*.json") if p.name != "config.json") == [
        "eval-dtd.json", "fewshot.json", "results.json", "state.json"]
    params = (run / "params.safetensors").read_bytes()
    capsys.readouterr()

    assert bench("domainshift", *common, "--dry-run") == 0
    assert "evaluate evaluate  transfer-budget/tiny/imagenet/coop/shots16/seed1" in capsys.readouterr().out
    assert bench("domainshift", *common) == 0
    assert "evaluate" in capsys.readouterr().out
    assert (run / "params.safetensors").read_bytes() == params  # evaluated, not trained again
    own = json.loads((run / "results.json").read_text())
    labelled = {p.name: json.loads(p.read_text()) for p in run.glob("eval-*.json")}
    assert labelled["eval-dtd.json"]["protocol"] == "crossdataset"
    for name in ("imagenet-domainshift", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert labelled[f"eval-{name}.json"]["protocol"] == "domainshift"
    source = labelled["eval-imagenet-domainshift.json"]
    assert source["metrics"] == own["metrics"] and source["eval_dataset"] == "imagenet"
    assert labelled["eval-imagenet_a.json"]["metrics"]["num_samples"] == 2  # the 2-class subset
    assert len(labelled["eval-imagenet_r.json"]["metrics"]["confusion_matrix"]) == 2
    assert labelled["eval-imagenetv2.json"]["metrics"]["num_samples"] == 3

    assert main(["report", str(out)]) == 0
    slug = slugify(tiny_model_file.stem) + "-budget"
    names = {p.name for p in (out / "report").iterdir()}
    assert {f"{slug}_crossdataset_imagenet.md", f"{slug}_domainshift_imagenet.md"} <= names
    table = (out / "report" / f"{slug}_domainshift_imagenet.md").read_text()
    for column in ("ImageNet (source)", "ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R"):
        assert column in table
    assert f"{own['metrics']['accuracy']:.2f}" in table


@pytest.mark.slow
def test_budget_base2novel_writes_base_and_novel(tmp_path, tiny_model_file):
    out = tmp_path / "out"
    assert bench("base2novel", "--out", str(out), "--root", str(FIXTURES), "--model", str(tiny_model_file),
                 "--datasets", "dtd", "--seeds", "1", "--budget") == 0
    for method in ("zeroshot", "coop/shots16/seed1", "cocoop/shots16/seed1"):
        folder = out / "base2novel-budget/tiny/dtd" / method
        base = json.loads((folder / "results.json").read_text())
        new = json.loads((folder / "eval-dtd-new.json").read_text())
        assert (base["subset"], new["subset"], base["protocol"], new["protocol"]) == (
            "base", "new", "base2novel", "base2novel")
        # dtd fixture: 5 classes -> 3 base, 2 novel; 3 test images each
        assert (base["metrics"]["num_samples"], new["metrics"]["num_samples"]) == (9, 6)
    config = json.loads((out / "base2novel-budget/tiny/dtd/coop/shots16/seed1/config.json").read_text())
    assert (config["method_config"]["n_ctx"], config["method_config"]["ctx_init"]) == (4, "a photo of a")
    assert main(["report", str(out)]) == 0
    table = (out / "report" / f"{slugify(tiny_model_file.stem)}-budget_base2novel_coop.md").read_text()
    folder = out / "base2novel-budget/tiny/dtd/coop/shots16/seed1"
    base = json.loads((folder / "results.json").read_text())["metrics"]["accuracy"]
    novel = json.loads((folder / "eval-dtd-new.json").read_text())["metrics"]["accuracy"]
    harmonic = 2 * base * novel / (base + novel) if base + novel else 0.0
    assert f"| DTD | {base:.2f} | {novel:.2f} | {harmonic:.2f} |" in table


@pytest.mark.slow
def test_two_worker_processes_run_a_budget_protocol(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "out"
    assert bench("fewshot", "--out", str(out), "--root", str(FIXTURES), "--model", str(tiny_model_file), "--datasets",
                 "dtd", "--shots", "1", "--seeds", "1", "2", "3", "--methods", "coop", "--no-baselines", "--budget",
                 "--jobs", "2", "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "fewshot: 3 run(s) under" in printed and "with 2 workers" in printed
    assert "3 run(s): 0 already finished, 3 done now, 0 failed, 0 not finished" in printed
    started = [line for line in printed.splitlines() if line.startswith("[worker ") and "] run " in line]
    assert len(started) == 3 and all(line.endswith("on cpu") for line in started)
    for seed in (1, 2, 3):
        result = json.loads((out / f"fewshot-budget/tiny/dtd/coop/shots1/seed{seed}/results.json").read_text())
        assert (result["seed"], result["budget"], result["config"]["train"]["device"]) == (seed, True, "cpu")
