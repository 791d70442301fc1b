"""Method options generated from the configs: one flag per field, shared flags, grouping, types, stray options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from vlprompt.harness.cli.method_options import add_method_arguments, collect_options, method_options_from_args
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS, MethodSpec, Training
from vlprompt.methods.configs import CLIPLoRAConfig, CoCoOpConfig, CoOpConfig, LinearProbeConfig


def parse(*argv: str) -> tuple[argparse.Namespace, list]:
    parser = argparse.ArgumentParser(prog="test")
    options = add_method_arguments(parser, METHODS)
    return parser.parse_args(list(argv)), options


def test_every_config_field_has_one_flag():
    fields = {f for spec in METHODS.values() for f in spec.config_cls.__dataclass_fields__}
    options = collect_options(METHODS)
    assert sorted(o.field for o in options) == sorted(fields)
    shared = {o.field: o.methods for o in options if len(o.methods) > 1}
    assert shared["n_ctx"] == ("coop", "cocoop", "kgcoop", "prograd", "tcp", "maple", "tpt")
    assert shared["template"] == ("zeroshot", "ensemble", "kgcoop", "prograd", "tcp", "clip_lora")
    assert shared["kg_weight"] == ("kgcoop", "tcp") and "prograd_lambda" not in shared
    assert shared["prompt_depth_text"] == ("ivlp", "promptsrc")


def test_values_are_typed_and_build_the_config():
    args, options = parse("--n-ctx", "4", "--ctx-init", "a photo of a", "--csc", "--class-token-position", "middle")
    given = method_options_from_args(args, "coop", options)
    assert given == {"n_ctx": 4, "ctx_init": "a photo of a", "csc": True, "class_token_position": "middle"}
    assert CoOpConfig(**given).n_ctx == 4
    args, options = parse("--no-fast-text", "--meta-net-reduction", "8")
    assert CoCoOpConfig(**method_options_from_args(args, "cocoop", options)) == CoCoOpConfig(fast_text=False,
                                                                                              meta_net_reduction=8)
    args, options = parse("--c", "none", "--c-grid", "1", "0.5", "--normalize")
    given = method_options_from_args(args, "linear_probe", options)
    assert given == {"c": None, "c_grid": (1.0, 0.5), "normalize": True}
    assert LinearProbeConfig(**given).c_grid == (1.0, 0.5)
    args, options = parse("--c", "0.25")
    assert method_options_from_args(args, "linear_probe", options) == {"c": 0.25}
    args, options = parse()
    assert method_options_from_args(args, "coop", options) == {}  # absent options: the method's defaults apply
    args, options = parse("--params", "q", "v", "--lora-alpha", "2", "--encoder", "text")
    given = method_options_from_args(args, "clip_lora", options)
    assert given == {"params": ("q", "v"), "lora_alpha": 2.0, "encoder": "text"}
    assert CLIPLoRAConfig(**given).params == ("q", "v")


def test_bad_values_are_argparse_errors(capsys):
    for argv in (["--n-ctx", "four"], ["--class-token-position", "left"], ["--c", "big"]):
        with pytest.raises(SystemExit) as exit_info:
            parse(*argv)
        assert exit_info.value.code == 2
    assert "invalid choice: 'left'" in capsys.readouterr().err


def test_an_option_of_another_method_is_refused():
    args, options = parse("--n-ctx", "4", "--csc", "--meta-net-reduction", "2")
    with pytest.raises(ConfigError, match=r"^method coop does not take --meta-net-reduction \(an option of cocoop\);"):
        method_options_from_args(args, "coop", options)
    with pytest.raises(ConfigError, match=r"method cocoop does not take --csc \(an option of coop and kgcoop and prograd\);"):
        method_options_from_args(args, "cocoop", options)
    with pytest.raises(ConfigError, match=r"zeroshot does not take --n-ctx \(an option of coop and cocoop and kgcoop and "
                                          r"prograd and tcp and maple and tpt\), --csc"):
        method_options_from_args(args, "zeroshot", options)


def test_help_groups_by_method_set_with_each_default(capsys):
    parser = argparse.ArgumentParser(prog="test")
    add_method_arguments(parser, METHODS)
    text = " ".join(parser.format_help().split())
    assert ("options of coop and cocoop and kgcoop and prograd and tcp and maple and tpt "
            "(--method coop|cocoop|kgcoop|prograd|tcp|maple|tpt):") in text
    assert "options of coop and kgcoop and prograd (--method coop|kgcoop|prograd): --csc, --no-csc" in text
    assert "[coop, cocoop, kgcoop, prograd, tcp, maple, tpt] coop: number of context vectors M" in text
    assert "(default: coop 16, cocoop 4, kgcoop 4, prograd 16, tcp 4, maple 2, tpt 4)" in text
    assert ("(default: coop '', cocoop 'a photo of a', kgcoop 'a photo of a', prograd '', tcp '', ivlp 'a photo of a', "
            "maple 'a photo of a', promptsrc 'a photo of a', tpt 'a photo of a')") in text
    assert "options of kgcoop and tcp (--method kgcoop|tcp): --kg-weight" in text
    assert "options of ivlp and promptsrc (--method ivlp|promptsrc): --n-ctx-text" in text


def test_clashes_and_unsupported_types_are_programming_errors():
    parser = argparse.ArgumentParser(prog="test")
    parser.add_argument("--lr")

    @dataclass(frozen=True)
    class Clashing:
        lr: float = 0.1

    @dataclass(frozen=True)
    class Odd:
        mapping: dict = field(default_factory=dict)

    def spec(name: str, config_cls: type) -> MethodSpec:
        return MethodSpec(name=name, config_cls=config_cls, training=Training.NONE, build=lambda *a: None,
                          train_defaults=lambda *a: {}, description="")

    with pytest.raises(ValueError, match="clashes"):
        add_method_arguments(parser, {"clash": spec("clash", Clashing)})
    with pytest.raises(TypeError, match="cannot be turned into a command-line option"):
        add_method_arguments(argparse.ArgumentParser(), {"odd": spec("odd", Odd)})
