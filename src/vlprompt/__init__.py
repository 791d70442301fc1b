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
    "nearest_words": "vlprompt.interpret:nearest_words",
    "load_dataset": "vlprompt.data:load_dataset",
    "DATASETS": "vlprompt.data:DATASETS",
    "sample_fewshot": "vlprompt.data:sample_fewshot",
    "build_method": "vlprompt.api:build_method",
    "fit": "vlprompt.api:fit",
    "evaluate_method": "vlprompt.api:evaluate",
    "Predictor": "vlprompt.predict:Predictor",
    "Prediction": "vlprompt.predict:Prediction",
    "run_experiment": "vlprompt.pipeline:run_experiment",
    "evaluate_run": "vlprompt.pipeline:evaluate_run",
    "EvalSpec": "vlprompt.pipeline:EvalSpec",
    "RunConfig": "vlprompt.config:RunConfig",
    "TrainConfig": "vlprompt.config:TrainConfig",
    "FeatureSet": "vlprompt.features:FeatureSet",
    "FeatureCache": "vlprompt.feature_cache:FeatureCache",
    "extract_features": "vlprompt.features:extract_features",
    "augmented_views": "vlprompt.features:augmented_views",
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
