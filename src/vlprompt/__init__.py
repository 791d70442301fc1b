"""vlprompt: prompt learning (CoOp, CoCoOp) and baselines for CLIP-style vision-language models.

The package import is light: heavy modules (torch, transformers) load only when a public name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved on first access (PEP 562)
_LAZY: dict[str, str] = {
    "load_clip": "vlprompt.backbone.loaders:load_clip",
    "CLIP": "vlprompt.backbone.model:CLIP",
    "CLIPConfig": "vlprompt.backbone.model:CLIPConfig",
    "build_tiny_clip": "vlprompt.backbone.tiny:build_tiny_clip",
    "tokenize": "vlprompt.backbone.tokenizer:tokenize",
    "get_tokenizer": "vlprompt.backbone.tokenizer:get_tokenizer",
    "METHODS": "vlprompt.methods:METHODS",
    "get_method": "vlprompt.methods:get_method",
    "save_prompt": "vlprompt.methods.prompt_file:save_prompt",
    "load_prompt": "vlprompt.methods.prompt_file:load_prompt",
    "nearest_words": "vlprompt.prediction.interpret:nearest_words",
    "load_dataset": "vlprompt.data:load_dataset",
    "DATASETS": "vlprompt.data:DATASETS",
    "sample_fewshot": "vlprompt.data:sample_fewshot",
    "build_method": "vlprompt.api:build_method",
    "fit": "vlprompt.api:fit",
    "evaluate_method": "vlprompt.api:evaluate",
    "Predictor": "vlprompt.prediction.predictor:Predictor",
    "Prediction": "vlprompt.prediction.predictor:Prediction",
    "run_experiment": "vlprompt.harness.pipeline:run_experiment",
    "evaluate_run": "vlprompt.harness.pipeline:evaluate_run",
    "EvalSpec": "vlprompt.harness.rundir:EvalSpec",
    "RunConfig": "vlprompt.harness.config:RunConfig",
    "TrainConfig": "vlprompt.training.config:TrainConfig",
    "FeatureSet": "vlprompt.features.extract:FeatureSet",
    "FeatureCache": "vlprompt.features.cache:FeatureCache",
    "extract_features": "vlprompt.features.extract:extract_features",
    "augmented_views": "vlprompt.features.extract:augmented_views",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
