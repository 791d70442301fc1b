"""`import vlprompt`, its configs and registries, building the CLI parser and every command's --help import no heavy
module (torch, numpy, PIL, the tokenizer, safetensors, the feature cache's sqlite3, tqdm, matplotlib, submitit, ...)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "numpy", "PIL", "tokenizers", "ftfy", "safetensors", "sqlite3", "tqdm", "filelock", "matplotlib",
         "sklearn", "submitit", "transformers", "huggingface_hub", "platformdirs")

_PROBE = """
import contextlib, io, sys
HEAVY = {heavy!r}

def loaded():
    return sorted({{name.split(".")[0] for name in sys.modules}} & set(HEAVY))

import vlprompt
print("import vlprompt", loaded())
for name in ("RunConfig", "EvalSpec", "TrainConfig", "METHODS", "get_method", "DATASETS"):  # configs and registries
    getattr(vlprompt, name)
print("vlprompt.RunConfig ...", loaded())
from vlprompt.harness.cli.main import build_parser, main
parser = build_parser()
print("parser", loaded())

def commands(command, prefix):
    for action in command._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield [*prefix, name]
                yield from commands(sub, [*prefix, name])

for argv in [[], *commands(parser, [])]:
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        try:
            main([*argv, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    assert "usage: vlprompt" in shown.getvalue(), argv
    print(" ".join(["vlprompt", *argv, "--help"]), loaded())
"""


def test_import_and_every_help_stay_light():
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) >= 2 + 10, lines  # import, parser, and each command (data list, bench, train, ...)
    assert [line for line in lines if not line.endswith(" []")] == []
    assert "vlprompt data download --help []" in lines and "vlprompt train --help []" in lines
