"""The official per-setting recipes (vlprompt.methods.recipe): the protocols' plans carry each method's recipe of
their setting, `vlprompt train --protocol P` and the API get the same values, explicit values win, and run folders
record the resolved values (so resuming and plan comparisons see the same run).

Each expected value names its source (official configs / scripts); the recipe functions in methods/configs.py carry
the same sources per value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vlprompt.errors import ConfigError
from vlprompt.harness.bench.protocols import PROTOCOLS, ProtocolOptions, build_plan
from vlprompt.harness.config import RunConfig
from vlprompt.harness.pipeline import resolve_run_config
from vlprompt.harness.rundir import config_differences
from vlprompt.methods import METHODS, RecipeContext, method_config
from vlprompt.methods.configs import MaPLeConfig, PromptSRCConfig
from vlprompt.common.vocab import PROTOCOL_RECIPES
from vlprompt.training.config import TrainConfig

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "coop_data"


def plan(tmp_path, protocol, **kwargs):
    return build_plan(protocol, ProtocolOptions(out=tmp_path, baselines=False, seeds=(1,), **kwargs))


def recipe_of(run):
    """(resolved training values, method config) of a planned run, as the pipeline will run it."""
    resolved = resolve_run_config(run.config)
    train = {k: getattr(resolved.train, k) for k in ("epochs", "batch_size", "lr", "optimizer", "adam_eps")}
    return train, resolved.method_config


def test_protocol_names_are_the_registry():
    assert tuple(PROTOCOLS) == tuple(PROTOCOL_RECIPES)


def test_the_recipe_of_a_context():
    assert RecipeContext().recipe == "fewshot"
    assert RecipeContext(subset="base").recipe == "base2novel"
    assert RecipeContext(subset="new").recipe == "base2novel"
    assert RecipeContext(protocol="domainshift").recipe == "crossdataset"
    assert RecipeContext(subset="base", protocol="fewshot").recipe == "fewshot"  # a stated protocol wins
    # another label (0.1 accepted any; it only labels the results) selects no recipe
    assert RecipeContext(protocol="my-study").recipe == "fewshot"
    assert RecipeContext(subset="base", protocol="my-study").recipe == "base2novel"


# ---------------------------------------------------------------------------------------------------- the plans


@pytest.mark.parametrize(("dataset", "gpa"), [
    # PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml: GPA_MEAN 30 / GPA_STD 30 for
    # ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397; 45 / 5 for StanfordCars, Flowers102, FGVCAircraft,
    # DTD, EuroSAT (the config's comments)
    ("imagenet", (30.0, 30.0)), ("caltech101", (30.0, 30.0)), ("oxford_pets", (30.0, 30.0)),
    ("food101", (30.0, 30.0)), ("ucf101", (30.0, 30.0)), ("sun397", (30.0, 30.0)),
    ("stanford_cars", (45.0, 5.0)), ("oxford_flowers", (45.0, 5.0)), ("fgvc_aircraft", (45.0, 5.0)),
    ("dtd", (45.0, 5.0)), ("eurosat", (45.0, 5.0)),
])
def test_fewshot_plan_carries_promptsrc_few_shot_recipe(tmp_path, dataset, gpa):
    runs = plan(tmp_path, "fewshot", methods=("promptsrc",), datasets=(dataset,), shots=(1, 16))
    assert len(runs) == 2
    for run in runs:
        train, config = recipe_of(run)
        # same config: OPTIM.MAX_EPOCH 50, LR 0.0025, BATCH_SIZE 4; PROMPT_DEPTH_TEXT / _VISION 9
        assert train == {"epochs": 50, "batch_size": 4, "lr": 0.0025, "optimizer": None, "adam_eps": None}
        assert (config.prompt_depth_text, config.prompt_depth_vision) == (9, 9)
        assert (config.gpa_mean, config.gpa_std) == gpa
        assert (config.text_loss_weight, config.image_loss_weight) == (25.0, 10.0)  # TEXT/IMAGE_LOSS_WEIGHT


def test_base2novel_plan_carries_the_base_to_novel_recipes(tmp_path):
    runs = {run.config.method: run for run in plan(tmp_path, "base2novel", datasets=("dtd",),
                                                   methods=("promptsrc", "maple", "ivlp", "kgcoop", "prograd"))}
    train, src = recipe_of(runs["promptsrc"])
    # PromptSRC vit_b16_c2_ep20_batch4_4+4ctx.yaml: MAX_EPOCH 20, LR 0.0025, batch 4, depth 9 + 9, GPA 15 / 1
    assert (train["epochs"], train["batch_size"], train["lr"]) == (20, 4, 0.0025)
    assert (src.prompt_depth_text, src.prompt_depth_vision, src.gpa_mean, src.gpa_std) == (9, 9, 15.0, 1.0)
    train, maple = recipe_of(runs["maple"])
    # MaPLe configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: MAX_EPOCH 5, LR 0.0035, batch 4, PROMPT_DEPTH 9
    assert (train["epochs"], train["batch_size"], train["lr"], maple.prompt_depth) == (5, 4, 0.0035, 9)
    train, ivlp = recipe_of(runs["ivlp"])
    # PromptSRC repository configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml (its only IVLP config)
    assert (train["epochs"], train["lr"], ivlp.prompt_depth_text, ivlp.prompt_depth_vision) == (20, 0.0025, 9, 9)
    # KgCoOp configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml (scripts/base2new_train.sh): batch 128, 100 epochs
    assert recipe_of(runs["kgcoop"])[0]["batch_size"] == 128 and recipe_of(runs["kgcoop"])[0]["epochs"] == 100
    # ProGrad scripts/base2new_train_prograd.sh CFG=rn50_ep100: 100 epochs
    assert recipe_of(runs["prograd"])[0]["epochs"] == 100


@pytest.mark.parametrize("protocol", ["crossdataset", "domainshift"])
def test_transfer_plans_carry_the_cross_dataset_recipes(tmp_path, protocol):
    runs = {run.config.method: run for run in plan(tmp_path, protocol, methods=("promptsrc", "maple", "ivlp"))}
    for run in runs.values():
        assert run.config.protocol == "crossdataset" and run.config.dataset == "imagenet"
        assert run.config.shots == 16 and run.config.subset == "all"
    train, maple = recipe_of(runs["maple"])
    # MaPLe vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml: MAX_EPOCH 2, LR 0.0026, batch 4, PROMPT_DEPTH 3
    assert (train["epochs"], train["batch_size"], train["lr"], maple.prompt_depth) == (2, 4, 0.0026, 3)
    train, src = recipe_of(runs["promptsrc"])
    # PromptSRC vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml: MAX_EPOCH 20, LR 0.0025, depth 3 + 3, GPA 6 / 10
    assert (train["epochs"], train["batch_size"], train["lr"]) == (20, 4, 0.0025)
    assert (src.prompt_depth_text, src.prompt_depth_vision, src.gpa_mean, src.gpa_std) == (3, 3, 6.0, 10.0)
    # IVLP: one official config, whatever the setting
    assert recipe_of(runs["ivlp"])[1].prompt_depth_text == 9


def test_other_methods_keep_one_recipe_across_settings(tmp_path):
    """CoOp, CoCoOp and TCP have one schedule in their official scripts; KgCoOp and ProGrad differ only in
    base-to-novel (checked above); the few-shot and transfer settings agree."""
    for method in ("coop", "cocoop", "tcp", "kgcoop", "prograd"):
        fewshot = recipe_of(plan(tmp_path, "fewshot", methods=(method,), datasets=("imagenet",), shots=(16,))[0])
        transfer = recipe_of(plan(tmp_path, "crossdataset", methods=(method,))[0])
        assert fewshot[0] == transfer[0], method
    tcp = recipe_of(plan(tmp_path, "base2novel", methods=("tcp",), datasets=("dtd",))[0])[0]
    assert tcp == {"epochs": 50, "batch_size": 32, "lr": 0.002, "optimizer": "adam", "adam_eps": 1e-3}


# ------------------------------------------------------------------------------------------ explicit values win


def test_explicit_values_override_the_recipe_in_plans(tmp_path):
    runs = plan(tmp_path, "crossdataset", methods=("promptsrc", "maple"),
                method_options={"promptsrc": {"gpa_mean": 12.0, "prompt_depth_text": 5},
                                "maple": {"prompt_depth": 2}},
                train=TrainConfig(epochs=7, lr=0.01))
    by_method = {run.config.method: recipe_of(run) for run in runs}
    train, src = by_method["promptsrc"]
    assert (train["epochs"], train["lr"]) == (7, 0.01)
    assert (src.gpa_mean, src.gpa_std, src.prompt_depth_text, src.prompt_depth_vision) == (12.0, 10.0, 5, 3)
    assert by_method["maple"][1].prompt_depth == 2 and by_method["maple"][0]["epochs"] == 7


def test_explicit_values_override_the_recipe_in_configs_and_the_api_context():
    config = RunConfig(method="promptsrc", dataset="dtd", protocol="crossdataset",
                       method_config={"gpa_std": 2.0}, train=TrainConfig(batch_size=8))
    assert (config.method_config.gpa_mean, config.method_config.gpa_std) == (6.0, 2.0)
    assert config.resolved().train.batch_size == 8 and config.resolved().train.epochs == 20
    typed = method_config(METHODS["maple"], MaPLeConfig(prompt_depth=4), RecipeContext(protocol="crossdataset"))
    assert typed.prompt_depth == 4
    assert method_config(METHODS["maple"], {}, RecipeContext(protocol="crossdataset")).prompt_depth == 3
    # no setting given: few-shot's recipe (the dataset decides PromptSRC's aggregation)
    assert method_config(METHODS["promptsrc"], {}, RecipeContext(dataset="eurosat")).gpa_mean == 45.0
    assert PromptSRCConfig().gpa_mean is None  # the config itself leaves it to the recipe


def test_without_a_protocol_the_subset_selects_the_recipe():
    base = RunConfig(method="promptsrc", dataset="dtd", subset="base")
    assert base.method_config.gpa_mean == 15.0 and base.resolved().train.epochs == 20
    plain = RunConfig(method="promptsrc", dataset="dtd")
    assert plain.method_config.gpa_mean == 45.0 and plain.resolved().train.epochs == 50
    assert RunConfig(method="kgcoop", dataset="dtd", subset="base").resolved().train.batch_size == 128


def test_a_protocol_label_outside_the_protocols_selects_no_recipe():
    config = RunConfig(method="promptsrc", dataset="dtd", protocol="my-study")
    assert config.method_config.gpa_mean == 45.0 and config.resolved().train.epochs == 50  # few-shot's
    with pytest.raises(ConfigError, match="protocol must be a non-empty string"):
        RunConfig(method="coop", dataset="dtd", protocol="")


# -------------------------------------------------------------------------------------- run folders and resume


def test_the_saved_config_holds_the_resolved_recipe_and_compares_equal(tmp_path):
    run = plan(tmp_path, "fewshot", methods=("promptsrc",), datasets=("dtd",), shots=(4,))[0]
    saved = resolve_run_config(run.config).to_dict()  # what the run folder's config.json holds
    assert saved["method_config"]["gpa_mean"] == 45.0 and saved["train"]["epochs"] == 50
    assert saved["protocol"] == "fewshot"
    reread = RunConfig.from_dict(json.loads(json.dumps(saved)))
    assert reread.to_dict() == saved and resolve_run_config(reread).to_dict() == saved
    # the bench's comparison (planned vs saved) and the pipeline's (resolved vs saved) see the same run
    assert config_differences(saved, run.config.to_dict(), stated_only=True) == []
    assert config_differences(saved, resolve_run_config(run.config).to_dict()) == []
    # a run trained with another recipe is another run
    other = plan(tmp_path, "base2novel", methods=("promptsrc",), datasets=("dtd",), shots=(4,))[0]
    assert any(d.startswith("method_config.gpa_mean") for d in config_differences(saved, other.config.to_dict(),
                                                                                  stated_only=True))


def test_replacing_the_protocol_of_a_config_keeps_filled_values_explicit():
    """A RunConfig fills the recipe's values when it is made: they are then its values (documented)."""
    config = RunConfig(method="maple", dataset="imagenet", protocol="crossdataset")
    moved = dataclasses.replace(config, protocol="base2novel")
    assert moved.method_config.prompt_depth == 3
    assert RunConfig(method="maple", dataset="imagenet", protocol="base2novel").method_config.prompt_depth == 9


# --------------------------------------------------------------------------------------------------------- CLI


class _Stop(Exception):
    pass


def _train_config(monkeypatch, *args: str) -> RunConfig:
    """The resolved RunConfig `vlprompt train ARGS` would run (run_experiment stubbed)."""
    import vlprompt.harness.pipeline as pipeline
    from vlprompt.harness.cli.main import main

    seen: list[RunConfig] = []

    def stub(config, out_dir, **kwargs):
        seen.append(resolve_run_config(config))
        raise _Stop

    monkeypatch.setattr(pipeline, "run_experiment", stub)
    with pytest.raises(_Stop):
        main(["train", *args, "--dataset", "dtd", "--out", "unused", "--root", "unused"])
    return seen[0]


def test_cli_train_gets_the_protocol_recipe(monkeypatch):
    config = _train_config(monkeypatch, "--method", "maple", "--protocol", "crossdataset")
    assert (config.train.epochs, config.train.lr, config.method_config.prompt_depth) == (2, 0.0026, 3)
    config = _train_config(monkeypatch, "--method", "maple", "--protocol", "crossdataset", "--prompt-depth", "5",
                           "--lr", "0.1")
    assert (config.train.epochs, config.train.lr, config.method_config.prompt_depth) == (2, 0.1, 5)
    config = _train_config(monkeypatch, "--method", "promptsrc", "--shots", "2")
    assert (config.train.epochs, config.method_config.gpa_mean, config.method_config.gpa_std) == (50, 45.0, 5.0)
    config = _train_config(monkeypatch, "--method", "promptsrc", "--subset", "base", "--gpa-std", "3")
    assert (config.train.epochs, config.method_config.gpa_mean, config.method_config.gpa_std) == (20, 15.0, 3.0)


def test_cli_protocol_help_names_the_protocols(capsys):
    from vlprompt.harness.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the protocol setting of the run (fewshot, base2novel, crossdataset, domainshift)" in text


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures (../shared) absent")
def test_a_cli_run_records_the_recipe_in_its_folder(tmp_path, monkeypatch, capsys, tiny_model_file):
    """MaPLe's cross-dataset recipe end to end on the tiny CLIP (depth 2 explicit: the tiny towers have 2 layers):
    config.json and results.json hold the recipe's epochs / lr and the explicit depth."""
    from vlprompt.harness.cli.main import main

    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", "--method", "maple", "--protocol", "crossdataset", "--prompt-depth", "2", "--dataset", "dtd",
            "--root", str(FIXTURES), "--shots", "1", "--model", str(tiny_model_file), "--device", "cpu",
            "--num-workers", "0", "--precision", "fp32", "--max-test-images", "8", "--out", str(out), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["train"]["epochs"], saved["train"]["lr"], saved["method_config"]["prompt_depth"]) == (2, 0.0026, 2)
    assert saved["protocol"] == "crossdataset"
    results = json.loads((out / "results.json").read_text())
    assert results["fit"]["epochs"] == 2 and results["protocol"] == "crossdataset"
