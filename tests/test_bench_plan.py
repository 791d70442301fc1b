"""Protocol plans: which runs each protocol lists, where they go, with which configuration; the dry-run listing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vlprompt.harness.bench.plan import model_tag, run_key
from vlprompt.harness.bench.protocols import (
    BENCHMARKS,
    COCOOP_PAPER_COOP,
    IMAGENET_VARIANTS,
    ProtocolOptions,
    build_plan,
)
from vlprompt.harness.cli import bench_cmd
from vlprompt.methods.configs import CoCoOpConfig, CoOpConfig, LinearProbeConfig
from run_folders import fake_run_folder
from vlprompt.harness.cli.main import main
from vlprompt.training.config import TrainConfig
from vlprompt.errors import ConfigError



def plan(protocol, tmp_path, **kwargs):
    return build_plan(protocol, ProtocolOptions(out=tmp_path, **kwargs))


def keys(runs):
    return [run.key for run in runs]


# ------------------------------------------------------------------------------------------------------ fewshot


def test_fewshot_lists_every_method_dataset_shots_seed(tmp_path):
    runs = plan("fewshot", tmp_path, datasets=("dtd", "Flowers102"), shots=(2, 1), seeds=(1, 2), model="RN50")
    expected = []
    for dataset in ("dtd", "oxford_flowers"):
        expected.append(f"fewshot/rn50/{dataset}/zeroshot")
        for method in ("linear_probe", "coop"):
            expected += [f"fewshot/rn50/{dataset}/{method}/shots{k}/seed{s}" for k in (1, 2) for s in (1, 2)]
    assert keys(runs) == expected  # baselines first, shots sorted, deterministic order
    for run in runs:
        assert run.run_dir == tmp_path.joinpath(*run.key.split("/"))
        assert run.config.protocol == "fewshot" and run.config.subset == "all" and run.evals == ()
        assert run.config.model == "RN50" and run.config.budget is False
    zeroshot = runs[0].config
    assert (zeroshot.method, zeroshot.shots, zeroshot.seed) == ("zeroshot", 0, 1)
    coop = runs[-1].config
    assert (coop.method, coop.dataset, coop.shots, coop.seed) == ("coop", "oxford_flowers", 2, 2)
    assert coop.method_config == CoOpConfig()  # CoOp's own defaults (M=16, random init) in the few-shot protocol
    assert coop.train.seed == 2 and coop.train.epochs is None  # the method's reference epochs


def test_fewshot_defaults_are_the_papers(tmp_path):
    runs = plan("fewshot", tmp_path)
    # 11 datasets x (1 zero-shot + 2 methods x 5 shots x 3 seeds)
    assert len(runs) == 11 * (1 + 2 * 5 * 3)
    assert {r.config.dataset for r in runs} == set(BENCHMARKS)
    assert {r.config.shots for r in runs if r.config.method == "coop"} == {1, 2, 4, 8, 16}
    assert {r.config.seed for r in runs if r.config.method == "coop"} == {1, 2, 3}
    assert {r.config.model for r in runs} == {"RN50"}


def test_no_baselines_and_explicit_methods(tmp_path):
    runs = plan("fewshot", tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("cocoop", "ensemble"),
                baselines=False)
    assert keys(runs) == ["fewshot/rn50/dtd/cocoop/shots1/seed1", "fewshot/rn50/dtd/ensemble"]


def test_budget_runs_have_their_own_tree_and_two_epochs(tmp_path):
    runs = plan("fewshot", tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), budget=True)
    assert all(run.key.startswith("fewshot-budget/") for run in runs)
    assert {run.config.budget for run in runs} == {True}
    assert {run.config.train.epochs for run in runs} == {2}
    probe = next(run.config for run in runs if run.config.method == "linear_probe")
    assert probe.method_config == LinearProbeConfig(c_grid=(0.01, 1.0, 100.0), search_steps=0, max_iter=100)
    given = plan("fewshot", tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), budget=True,
                 train=TrainConfig(epochs=3, precision="fp32"))
    assert {run.config.train.epochs for run in given} == {3}  # --epochs wins over the budget's 2


def test_method_options_reach_the_configs_and_are_checked(tmp_path):
    runs = plan("fewshot", tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), baselines=False,
                method_options={"coop": {"n_ctx": 8, "csc": True}})
    assert runs[0].config.method_config == CoOpConfig(n_ctx=8, csc=True)
    with pytest.raises(ConfigError, match="n_kontext"):
        plan("fewshot", tmp_path, datasets=("dtd",), method_options={"coop": {"n_kontext": 8}})
    with pytest.raises(ConfigError, match="cocoop"):
        plan("fewshot", tmp_path, datasets=("dtd",), method_options={"cocoop": {"n_ctx": 8}})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"methods": ("coopp",)}, "unknown method"),
    ({"datasets": ("dtdd",)}, "unknown training dataset"),
    ({"datasets": ("imagenet_a",)}, "test-only"),
    ({"shots": (0,)}, "--shots must be integers >= 1"),
    ({"seeds": ()}, "--seeds is empty"),
    ({"source": "imagenet"}, "--source and --targets belong"),
])
def test_fewshot_bad_options_are_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan("fewshot", tmp_path, **kwargs)


def test_unknown_protocol(tmp_path):
    with pytest.raises(ConfigError, match="choose one of fewshot, base2novel, crossdataset, domainshift"):
        plan("fewshots", tmp_path)


# --------------------------------------------------------------------------------------------------- base2novel


def test_base2novel_trains_on_base_and_evaluates_novel(tmp_path):
    runs = plan("base2novel", tmp_path, datasets=("dtd",), seeds=(1, 2, 3), model="ViT-B/16")
    assert keys(runs) == ["base2novel/vit-b-16/dtd/zeroshot"] + [
        f"base2novel/vit-b-16/dtd/{m}/shots16/seed{s}" for m in ("coop", "cocoop") for s in (1, 2, 3)]
    for run in runs:
        assert run.config.subset == "base" and run.config.protocol == "base2novel"
        assert [(e.dataset, e.subset, e.filename, e.protocol) for e in run.evals] == [
            ("dtd", "new", "eval-dtd-new.json", None)]
        assert run.result_files == ("results.json", "eval-dtd-new.json")
    coop = runs[1].config
    assert coop.shots == 16 and coop.method_config == CoOpConfig(**COCOOP_PAPER_COOP) == CoOpConfig(
        n_ctx=4, ctx_init="a photo of a")
    assert runs[-1].config.method_config == CoCoOpConfig()  # CoCoOp's config already is the paper's
    assert runs[0].config.shots == 0


def test_base2novel_refuses_the_linear_probe(tmp_path):
    with pytest.raises(ConfigError, match="novel classes"):
        plan("base2novel", tmp_path, datasets=("dtd",), methods=("linear_probe",))


# ------------------------------------------------------------------------------------------------------ transfer


def test_crossdataset_trains_on_imagenet_and_evaluates_the_other_ten(tmp_path):
    runs = plan("crossdataset", tmp_path, seeds=(1, 2))
    assert keys(runs) == [f"transfer/vit-b-16/imagenet/{m}/shots16/seed{s}" for m in ("coop", "cocoop")
                          for s in (1, 2)]
    others = [d for d in BENCHMARKS if d != "imagenet"]
    assert len(others) == 10
    for run in runs:
        config = run.config
        assert (config.dataset, config.subset, config.shots, config.protocol) == ("imagenet", "all", 16,
                                                                                 "crossdataset")
        assert [(e.dataset, e.subset, e.name, e.protocol) for e in run.evals] == [
            (d, "all", d, "crossdataset") for d in others]


def test_domainshift_reuses_the_crossdataset_runs(tmp_path):
    cross = plan("crossdataset", tmp_path, seeds=(1, 2, 3))
    shift = plan("domainshift", tmp_path, seeds=(1, 2, 3))
    assert keys(shift) == keys(cross)  # same folders ...
    assert [r.config.config_hash() for r in shift] == [r.config.config_hash() for r in cross]  # ... same runs
    for run in shift:
        assert [(e.dataset, e.name, e.protocol) for e in run.evals] == [
            ("imagenet", "imagenet-domainshift", "domainshift"),  # the source column, under this protocol's label
            *[(d, d, "domainshift") for d in IMAGENET_VARIANTS]]
        assert run.evals[0].subset == "all"


def test_transfer_options(tmp_path):
    runs = plan("crossdataset", tmp_path, source="Caltech101", targets=("dtd", "eurosat"), seeds=(1,),
                methods=("coop",), shots=(4,))
    assert keys(runs) == ["transfer/vit-b-16/caltech101/coop/shots4/seed1"]
    assert [e.name for e in runs[0].evals] == ["dtd", "eurosat"]
    with pytest.raises(ConfigError, match="test-only"):
        plan("domainshift", tmp_path, source="imagenetv2")
    with pytest.raises(ConfigError, match="leave it out of --targets"):
        plan("crossdataset", tmp_path, targets=("imagenet", "dtd"))
    with pytest.raises(ConfigError, match="--datasets belongs to fewshot"):
        plan("crossdataset", tmp_path, datasets=("dtd",))
    with pytest.raises(ConfigError, match="another dataset's classes"):
        plan("crossdataset", tmp_path, methods=("linear_probe",))
    # the domain-shift variants keep ImageNet's classes (or a subset): class-bound classifiers take part
    assert {run.config.method for run in plan("domainshift", tmp_path, methods=("linear_probe", "tip_adapter"))} == {
        "linear_probe", "tip_adapter"}


# ------------------------------------------------------------------------------------------------------ naming


@pytest.mark.parametrize(("model", "tag"), [
    ("ViT-B/16", "vit-b-16"), ("RN50", "rn50"), ("/ckpt/ViT-B-32.pt", "vit-b-32"), ("./tiny.safetensors", "tiny"),
    ("hf:openai/clip-vit-base-patch16", "hf-openai-clip-vit-base-patch16"),
])
def test_model_tag(model, tag):
    assert model_tag(model) == tag


def test_run_key_levels():
    assert run_key("fewshot", "RN50", "dtd", "coop", 4, 2) == "fewshot/rn50/dtd/coop/shots4/seed2"
    assert run_key("fewshot", "RN50", "dtd", "zeroshot") == "fewshot/rn50/dtd/zeroshot"


# ------------------------------------------------------------------------------------------------------- dry run


def _finish(run, evals=True):
    fake_run_folder(run.run_dir, run.config.to_dict())
    (run.run_dir / "results.json").write_text("{}", encoding="utf-8")
    if evals:
        for evaluation in run.evals:
            (run.run_dir / evaluation.filename).write_text("{}", encoding="utf-8")


def test_dry_run_prints_states_actions_and_totals(tmp_path, capsys):
    argv = ["bench", "base2novel", "--out", str(tmp_path), "--datasets", "dtd", "--seeds", "1,2", "--dry-run",
            "--methods", "coop"]
    runs = build_plan("base2novel", bench_cmd.options_from_args(_parse(argv)))
    zeroshot, seed1, seed2 = runs
    _finish(zeroshot)
    _finish(seed1, evals=False)  # trained, eval-dtd-new.json missing
    fake_run_folder(seed2.run_dir, seed2.config.to_dict(), progress=True)
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"base2novel: 3 run(s) under {tmp_path}"
    rows = [line.split()[:3] for line in lines[1:4]]
    assert rows == [["skip", "finished", zeroshot.key], ["evaluate", "evaluate", seed1.key],
                    ["resume", "partial", seed2.key]]
    assert "missing eval-dtd-new.json" in lines[2]
    assert lines[4] == "totals: 1 finished, 1 evaluate, 1 partial -> 2 to do, 1 to skip"
    assert not any(p.name == "run.lock" for p in tmp_path.rglob("*"))  # looking never locks anything


def test_dry_run_of_transfer_protocols_and_budget_banner(tmp_path, capsys):
    assert main(["bench", "domainshift", "--out", str(tmp_path), "--dry-run", "--budget", "--seeds", "1",
                 "--methods", "coop", "--model", "/x/ViT-B-16.pt"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("*** SMOKE TEST (--budget)")
    assert out[2].split()[:3] == ["run", "missing", "transfer-budget/vit-b-16/imagenet/coop/shots16/seed1"]
    assert "imagenet-domainshift, imagenetv2, imagenet_sketch, imagenet_a, imagenet_r" in out[2]
    assert out[3] == "totals: 1 missing -> 1 to do, 0 to skip"


def test_dry_run_does_not_import_torch(tmp_path):
    import subprocess

    code = ("import sys; from vlprompt.harness.cli.main import main; "
            f"rc = main(['bench', 'fewshot', '--out', {str(tmp_path)!r}, '--dry-run']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "totals: 341 missing -> 341 to do, 0 to skip"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["bench", "fewshot", "--out", str(tmp_path), "--shots", "one", "--dry-run"]) == 2
    assert "--shots takes whole numbers" in capsys.readouterr().err
    assert main(["bench", "fewshot", "--out", str(tmp_path), "--method-option", "coop:n_ctx=4", "--dry-run"]) == 2
    assert "METHOD.FIELD=VALUE" in capsys.readouterr().err
    assert main(["bench", "fewshot", "--out", str(tmp_path), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_method_option_values():
    assert bench_cmd.parse_method_options(["coop.n_ctx=16", "coop.ctx_init=a photo of a", "coop.csc=true",
                                           "cocoop.ctx_init="]) == {
        "coop": {"n_ctx": 16, "ctx_init": "a photo of a", "csc": True}, "cocoop": {"ctx_init": ""}}


def test_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(bench_cmd.ROOT_ENV, str(tmp_path / "data"))
    options = bench_cmd.options_from_args(_parse(["bench", "fewshot", "--out", str(tmp_path / "o")]))
    assert options.root == str((tmp_path / "data").resolve())


def _parse(argv):
    from vlprompt.harness.cli.main import build_parser

    return build_parser().parse_args(argv)


def test_skip_bad_images_reaches_every_run_config():
    from vlprompt.harness.bench.protocols import ProtocolOptions, build_plan

    runs = build_plan("fewshot", ProtocolOptions(out=Path("o"), datasets=("dtd",), shots=(1,), seeds=(1,), skip_bad_images=True))
    assert runs and all(run.config.skip_bad_images for run in runs)
    assert not any(run.config.skip_bad_images
                   for run in build_plan("fewshot", ProtocolOptions(out=Path("o"), datasets=("dtd",), shots=(1,), seeds=(1,))))
