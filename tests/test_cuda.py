"""The CUDA path (run with `python -m pytest -m cuda`; skipped where no GPU is visible).

No GPU has run this code at the time of writing: these tests are what a first GPU session runs. Tolerances: CUDA
convolutions may use TF32 (10-bit mantissa) by default, so fp32 results on the GPU are compared with the CPU at a
relative 1e-2; bf16 autocast (8-bit mantissa) at 5e-2."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_standins import LinearHead, clustered_features, tiny_prompt

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.common.precision import resolve_precision
from vlprompt.data.types import Item
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "coop_data"
CUDA = torch.device("cuda")


def dtd_items(count: int = 6) -> tuple[Path, list[Item]]:
    if not FIXTURES.is_dir():
        pytest.skip("fixtures (../shared) absent")
    root = FIXTURES / "dtd" / "images"
    items = [Item(f"{folder.name}/{image.name}", label)
             for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir()))
             for image in sorted(folder.iterdir())[:2]]
    return root, items[:count]


def test_auto_precision_on_cuda_follows_the_gpu():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", "cuda") == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_extraction_on_the_gpu_matches_the_cpu(precision, tmp_path):
    from vlprompt.features.cache import FeatureCache
    from vlprompt.features.extract import augmented_views, extract_features

    root, items = dtd_items()
    cpu = build_tiny_clip("vit", seed=0)
    gpu = build_tiny_clip("vit", seed=0).to(CUDA)
    expected = extract_features(cpu, root, items, precision="fp32").features
    cache = FeatureCache(tmp_path / "cache")
    got = extract_features(gpu, root, items, precision=precision, cache=cache, num_workers=2)
    assert got.features.device.type == "cpu" and got.features.dtype == torch.float32
    tolerance = 1e-2 if precision == "fp32" else 5e-2
    assert torch.allclose(got.features, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    again = extract_features(gpu, root, items, precision=precision, cache=cache)  # served from the cache
    assert torch.equal(again.features, got.features) and cache.hits == len(items)
    views = augmented_views(gpu, root, items, views=3, seed=0, precision=precision, batch_size=4, num_workers=2)
    assert views.features.shape == (3, len(items), cpu.config.embed_dim)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_the_gpu_learns_and_keeps_fp32_state(precision, tmp_path):
    from vlprompt.harness.rundir import RunDir

    feats = clustered_features(per_class=4)
    method = tiny_prompt()
    with torch.no_grad():
        before = F.cross_entropy(method(feats.features), feats.labels).item()
    with RunDir.create_or_open(tmp_path / "run", {"run": "cuda"}) as run:
        result = train(method, feats, TrainConfig(epochs=4, batch_size=8, lr=0.01, device="cuda",
                                                  precision=precision), run_dir=run)
    assert result.precision == precision
    assert method.ctx.device.type == "cuda" and method.ctx.dtype == torch.float32
    method.to("cpu")
    with torch.no_grad():
        after = F.cross_entropy(method(feats.features), feats.labels).item()
    assert after < before
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["precision"] == precision and (state["scaler"] != {}) == (precision == "fp16")


def test_training_on_the_gpu_is_close_to_the_cpu():
    feats = clustered_features(per_class=4)
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, precision="fp32")
    cpu, gpu = LinearHead(64, 5), LinearHead(64, 5)
    train(cpu, feats, config, device="cpu")
    train(gpu, feats, config, device="cuda")
    assert torch.allclose(gpu.weight.detach().cpu(), cpu.weight.detach(), rtol=1e-3, atol=1e-5)


def test_a_whole_run_on_the_gpu(tmp_path, monkeypatch):
    from vlprompt.harness.pipeline import evaluate_run, run_experiment
    from vlprompt.harness.config import RunConfig

    dtd_items()
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    clip = build_tiny_clip("vit", seed=0).to(CUDA)
    config = RunConfig(method="coop", dataset="dtd", root=str(FIXTURES), shots=2, model="tiny-test",
                       method_config={"n_ctx": 2}, train=TrainConfig(epochs=2, device="cuda", views=2))
    payload = run_experiment(config, tmp_path / "run", clip=clip)
    assert payload["precision"] == resolve_precision("auto", "cuda") == payload["fit"]["precision"]
    assert 0.0 <= payload["metrics"]["accuracy"] <= 100.0
    cross = evaluate_run(tmp_path / "run", dataset="oxford_flowers", clip=clip)
    assert cross["metrics"]["num_samples"] > 0


def test_the_speed_benchmark_runs_on_the_gpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed.py"
    spec = importlib.util.spec_from_file_location("vlprompt_bench_speed_cuda", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    results = bench.main(["--device", "cuda", "--model", "tiny", "--classes", "3", "--reps", "1", "--reps-slow", "1",
                          "--matmul-size", "256", "--eval-images", "120", "--eval-batch-sizes", "60",
                          "--eval-plain-max-batches", "1", "--shots", "2", "--fullrun-classes", "3",
                          "--fullrun-epochs", "3", "--fullrun-ours-epochs", "2", "--fullrun-plain-epochs", "1",
                          "--views", "1", "--json", str(tmp_path / "bench.json")])
    assert results["env"]["gpu"] and results["env"]["device"] == "cuda"
    assert all(group["paths"]["ours"]["peak_bytes"] > 0 for group in results["steps"])
    assert results["fullrun"]["components"]["tower_gflops"] > 0
