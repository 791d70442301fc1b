"""The METHODS registry: the papers' defaults, training recipes, light import, config (de)serialisation."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from vlprompt.methods import config_for_recipe
from vlprompt.methods.recipe import RecipeContext
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS, get_method
from vlprompt.methods.configs import (
    CoCoOpConfig,
    CoOpConfig,
    EnsembleConfig,
    KgCoOpConfig,
    LinearProbeConfig,
    ProGradConfig,
    TCPConfig,
    ZeroShotConfig,
)
from vlprompt.common.options import config_from_dict, config_to_dict
from vlprompt.harness.cli.method_options import add_method_arguments


def test_registry_lists_the_methods_with_their_kinds():
    assert {name: spec.training.value for name, spec in METHODS.items()} == {
        "zeroshot": "none", "ensemble": "none", "linear_probe": "closed_form", "coop": "features",
        "cocoop": "features", "kgcoop": "features", "prograd": "features", "tcp": "features",
        "clip_adapter": "features", "tip_adapter": "closed_form", "tip_adapter_f": "closed_form",
        "lp_plus_plus": "closed_form", "clap": "features", "ivlp": "images", "maple": "images", "promptsrc": "images",
        "clip_lora": "images", "tpt": "test_time"}
    assert [name for name, spec in METHODS.items() if not spec.transfers] == [
        "linear_probe", "tip_adapter", "tip_adapter_f", "lp_plus_plus", "clap"]
    assert all(spec.name == name for name, spec in METHODS.items())
    with pytest.raises(TypeError):
        METHODS["mine"] = METHODS["coop"]  # type: ignore[index]
    with pytest.raises(ConfigError, match="unknown method 'mapel'"):
        get_method("mapel")


def test_defaults_are_the_papers():
    assert CoOpConfig() == CoOpConfig(n_ctx=16, ctx_init="", csc=False, class_token_position="end", fast_text=True)
    assert CoCoOpConfig() == CoCoOpConfig(n_ctx=4, ctx_init="a photo of a", class_token_position="end",
                                          meta_net_reduction=16, fast_text=True)
    probe = LinearProbeConfig()
    assert probe.c is None and probe.c_grid == (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
    assert probe.search_steps == 8 and probe.max_iter == 1000 and probe.normalize is False
    assert EnsembleConfig().template_set == "coop7"
    # KgCoOp: official base2new_train.sh (NCTX 4, W 8.0) and kgcoop.py ("a photo of a")
    assert KgCoOpConfig() == KgCoOpConfig(n_ctx=4, ctx_init="a photo of a", csc=False, class_token_position="end",
                                          fast_text=True, kg_weight=8.0, template="")
    # ProGrad: official prograd.sh (NCTX 16, LAMBDA 1.0), LOSS.T 1.0, CTX_INIT from the template
    assert ProGradConfig() == ProGradConfig(n_ctx=16, ctx_init="", csc=False, class_token_position="end",
                                            fast_text=True, prograd_lambda=1.0, temperature=1.0, template="")
    # TCP: official tcp.py / clip_text/model.py (4 tokens at layer 8, reduction 4, weight 8.0, random context)
    assert TCPConfig() == TCPConfig(n_ctx=4, ctx_init="", class_token_layer=8, reduction=4, kg_weight=8.0,
                                    template="", prompt_template="", fast_text=True)


def test_successor_configs_take_the_official_templates_of_the_dataset():
    assert KgCoOpConfig().for_dataset("dtd", "{} texture.").template == "a photo of a {}, a type of texture."
    assert KgCoOpConfig().for_dataset("oxford_pets", "a photo of a {}, a type of pet.").template == \
        "a photo of a {}, a type of pet."
    assert KgCoOpConfig().for_dataset("folder:mine", "a photo of a {}.").template == "a photo of a {}."
    assert ProGradConfig().for_dataset("oxford_flowers", "x {}").template == "a type of flower, a photo of a {}."
    tcp = TCPConfig().for_dataset("fgvc_aircraft", "a photo of a {}, a type of aircraft.")
    assert (tcp.template, tcp.prompt_template) == ("a photo of an aircraft {}.", "{}, a type of aircraft.")
    other = TCPConfig().for_dataset(None, "a photo of a {}.")
    assert (other.template, other.prompt_template) == ("a photo of a {}.", "{}.")
    mine = KgCoOpConfig(template="a {} here.").for_dataset("dtd", "{} texture.")
    assert mine.template == "a {} here."  # an explicit template wins
    for bad in (dict(kg_weight=-1.0), dict(template="no placeholder")):
        with pytest.raises(ConfigError):
            KgCoOpConfig(**bad)
    for bad in (dict(prograd_lambda=float("nan")), dict(temperature=0.0)):
        with pytest.raises(ConfigError):
            ProGradConfig(**bad)
    for bad in (dict(class_token_layer=-1), dict(reduction=0), dict(prompt_template="{} {}")):
        with pytest.raises(ConfigError):
            TCPConfig(**bad)


@pytest.mark.parametrize(("shots", "dataset", "epochs"), [
    (1, "dtd", 50), (2, "dtd", 100), (4, "eurosat", 100), (8, "dtd", 200), (16, "oxford_flowers", 200),
    (16, "imagenet", 50), (1, "ImageNet", 50), (None, "dtd", 200),
])
def test_coop_training_defaults(shots, dataset, epochs):
    recipe = METHODS["coop"].train_defaults(RecipeContext(shots, dataset))
    assert recipe == {"epochs": epochs, "batch_size": 32}  # the rest of the recipe is TrainConfig's defaults


def test_cocoop_and_untrained_defaults():
    recipe = METHODS["cocoop"].train_defaults(RecipeContext(16, "imagenet"))
    assert recipe == {"batch_size": 1, "epochs": 10}
    for name in ("zeroshot", "ensemble", "linear_probe"):
        assert METHODS[name].train_defaults(RecipeContext(16, "dtd")) == {}


def test_every_config_field_documents_itself():
    for spec in METHODS.values():
        for field in dataclasses.fields(spec.config_cls):
            assert len(field.metadata.get("help", "")) > 10, (spec.name, field.name)
    assert dataclasses.fields(CoOpConfig)[3].metadata["choices"] == ("end", "middle", "front")


@pytest.mark.parametrize("config", [
    CoOpConfig(n_ctx=4, csc=True, class_token_position="front"), CoCoOpConfig(ctx_init=""),
    EnsembleConfig(templates=("a {}.", "the {}.")), ZeroShotConfig("{} texture."), LinearProbeConfig(c=0.1),
])
def test_configs_round_trip_through_json_values(config):
    data = config_to_dict(config)
    assert all(not isinstance(value, tuple) for value in data.values())
    assert config_from_dict(type(config), data) == config


def test_config_from_dict_rejects_unknown_or_invalid_fields():
    with pytest.raises(ConfigError, match="unknown CoOpConfig field"):
        config_from_dict(CoOpConfig, {"n_ctx": 4, "colour": "red"})
    with pytest.raises(ConfigError, match="n_ctx"):
        config_from_dict(CoOpConfig, {"n_ctx": -1})


def test_importing_the_registry_does_not_import_torch():
    code = ("import sys, vlprompt.methods as m; m.METHODS['coop'].config_cls(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# config.json's method_config of run folders written before IVLP's and PromptSRC's shared prompt options were composed
# (IndependentPromptOptions), and of Tip-Adapter-F (its config extends Tip-Adapter's): keys in their recorded order
RECORDED_CONFIGS = {
    "ivlp": {"n_ctx_text": 4, "n_ctx_vision": 4, "ctx_init": "a photo of a", "prompt_depth_text": 9,
             "prompt_depth_vision": 9, "fast_text": True},
    "promptsrc": {"n_ctx_text": 4, "n_ctx_vision": 4, "ctx_init": "a photo of a", "prompt_depth_text": 9,
                  "prompt_depth_vision": 9, "text_loss_weight": 25.0, "image_loss_weight": 10.0,
                  "logit_loss_weight": 1.0, "text_templates": "imagenet60", "gpa": True, "gpa_mean": 15.0,
                  "gpa_std": 1.0, "fast_text": True},
    "tip_adapter_f": {"templates": [], "cache_views": 10, "alpha": None, "beta": 1.0, "search": True,
                      "grid_scale": [], "grid_steps": [200, 20], "finetune_epochs": None, "finetune_lr": 0.001,
                      "finetune_batch_size": 256, "finetune_eps": 1e-4, "finetune_weight_decay": 0.01},
}


@pytest.mark.parametrize("method", list(RECORDED_CONFIGS))
def test_recorded_configs_round_trip_with_their_keys_and_flags(method):
    recorded = RECORDED_CONFIGS[method]
    config_cls = get_method(method).config_cls
    config = config_from_dict(config_cls, recorded)
    # the defaults were recorded (those left to the recipe as the base-to-novel recipe resolved them)
    assert config == config_for_recipe(config_cls(), RecipeContext(16, "dtd", "base"))
    again = config_to_dict(config)
    assert list(again) == list(recorded) and again == recorded
    parser = argparse.ArgumentParser(prog="test")
    add_method_arguments(parser, {method: get_method(method)})
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags == ["--" + name.replace("_", "-") for name in recorded]
