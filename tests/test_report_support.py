"""Helpers that write hand-made result files for the report tests (imported by the other test_report_* modules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlprompt.harness.report.aggregate import parse_result


def result_payload(**fields: Any) -> dict[str, Any]:
    """A result JSON object following docs/architecture.md "Results"; ``fields`` override the defaults."""
    accuracy = fields.pop("accuracy", 50.0)
    payload: dict[str, Any] = {
        "schema": 1,
        "protocol": "fewshot",
        "method": "coop",
        "dataset": "dtd",
        "eval_dataset": fields.get("dataset", "dtd"),
        "subset": "all",
        "shots": 16,
        "seed": 1,
        "model": "ViT-B/16",
        "budget": False,
        "metrics": {"accuracy": accuracy, "macro_f1": accuracy, "per_class_accuracy": {}, "confusion_matrix": [[1]],
                    "num_samples": 10},
        "config": {},
        "versions": {"vlprompt": "0.1.0", "torch": "2.13.0"},
        "timing": {"train_s": 0.0, "eval_s": 0.0},
    }
    payload.update(fields)
    return payload


def write_result(root: Path, **fields: Any) -> Path:
    """Write one result file in its own run folder (named after the fields) and return its path."""
    payload = result_payload(**fields)
    name = "results.json" if payload["eval_dataset"] == payload["dataset"] else f"eval-{payload['eval_dataset']}.json"
    folder = "-".join(
        str(payload[k]) for k in ("protocol", "method", "dataset", "subset", "shots", "seed", "model", "budget")
    ).replace("/", "")
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def write_seeds(root: Path, accuracies: list[float], **fields: Any) -> list[Path]:
    """One result per seed (1, 2, ...) with the given accuracies."""
    return [write_result(root, seed=i + 1, accuracy=acc, **fields) for i, acc in enumerate(accuracies)]


def test_written_result_parses_back(tmp_path):
    path = write_result(tmp_path, protocol="crossdataset", dataset="imagenet", eval_dataset="dtd", seed=2,
                        accuracy=44.5)
    assert path.name == "eval-dtd.json"
    record = parse_result(path)
    assert (record.protocol, record.method, record.dataset, record.eval_dataset) == (
        "crossdataset", "coop", "imagenet", "dtd")
    assert (record.subset, record.shots, record.seed, record.model, record.budget) == ("all", 16, 2, "ViT-B/16", False)
    assert record.accuracy == 44.5
