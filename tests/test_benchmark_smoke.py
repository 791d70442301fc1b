"""Smoke test of the speed benchmark (benchmarks/bench_speed.py): every section runs on a tiny CLIP with tiny sizes.

No timing is asserted (timings belong to the benchmark, not to the test suite); the test only checks that the code
keeps working against the library's public functions and that the JSON report has its parts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlprompt_bench_speed", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def test_benchmark_runs_every_section_on_a_tiny_model(bench: ModuleType, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    results = bench.main([
        "--model", "tiny", "--classes", "3,5", "--reps", "1", "--reps-slow", "1", "--slow-s", "60",
        "--plain-max-classes", "4",  # K=5 takes the extrapolation path (plain measured at K=2, 4)
        "--adapter-classes", "3",
        "--matmul-size", "64", "--eval-images", "120", "--eval-batch-sizes", "40,60",
        "--eval-plain-max-batches", "1", "--shots", "2", "--fullrun-classes", "3", "--fullrun-epochs", "3",
        "--fullrun-ours-epochs", "2", "--fullrun-plain-epochs", "1", "--fullrun-plain-steps", "1", "--views", "1", "--fullrun-measured-views", "2",
        "--precision", "fp32", "--profile",
        "--deep-workers", "0", "--deep-epochs", "2", "--lora-classes", "3,5", "--json", str(report),
    ])
    saved = json.loads(report.read_text())
    assert {"env", "steps", "successors", "adapters", "eval", "fullrun", "targets", "profile", "deep",
            "deep_data_path", "lora", "tpt"} <= saved.keys()
    assert [(row["method"], row["classes"]) for row in saved["lora"]] == [("clip_lora", 3), ("clip_lora", 5)]
    for row in saved["lora"]:  # --plain-max-classes 4: K = 5 has ours only
        assert row["ours_s"] > 0 and row["ours_peak_bytes"] > 0 and (row["plain_s"] is None) == (row["classes"] > 4)
    assert [row["method"] for row in saved["adapters"]] == ["clip_adapter", "clap", "tip_adapter_f", "lp_plus_plus"]
    assert all(row["plain_s"] > 0 and row["ours_s"] > 0 for row in saved["adapters"])
    assert [(row["method"], row["classes"]) for row in saved["successors"]] == [
        (m, k) for m in ("kgcoop", "prograd", "tcp") for k in (3, 5)]
    for row in saved["successors"]:
        assert row["ours_s"] > 0 and (row["plain_s"] is None) == (row["classes"] > 4)  # --plain-max-classes 4
    assert [(g["method"], g["classes"]) for g in saved["deep"]] == [("maple", 3), ("maple", 5), ("promptsrc", 3),
                                                                    ("promptsrc", 5)]
    for group in saved["deep"]:
        assert {"plain", "ours"} <= group["paths"].keys() and group["paths"]["ours"]["peak_bytes"] > 0
    assert saved["deep_data_path"]["epochs_images_per_s"] > 0 and saved["deep_data_path"]["loader_images_per_s"] > 0
    assert len(results["steps"]) == 4  # coop and cocoop at K = 3, 5
    for group in saved["steps"]:
        assert {"plain", "ours", "text_fast_fp32"} <= group["paths"].keys()
        assert group["floor_flops"] > 0
        assert group["paths"]["ours"]["peak_bytes"] > 0
        extrapolated = group["classes"] == 5
        assert ("extrapolated" in group["paths"]["plain"]["note"]) == extrapolated
    ours_eval = [row for row in saved["eval"] if row["path"] == "ours"]
    plain_eval = [row for row in saved["eval"] if row["path"] == "plain"]
    ours_calls = [row["text_encodings"] for row in ours_eval]
    # once, whatever the number of batches (ln_final runs once per length bucket of that one encoding: <= 4)
    assert ours_calls[0] == ours_calls[1] and 1 <= ours_calls[0] <= 4
    assert [row["text_encodings"] for row in plain_eval] == [row["batches"] for row in plain_eval]
    full = saved["fullrun"]
    assert set(full["recipes"]) == set(full["extraction"]) == {"default (--views epochs)", "--views 1"}
    measured = full["extraction"]["default (--views epochs)"]
    assert full["images"] == 6 and measured["views"] == 2  # --fullrun-measured-views 2 of the 3 needed
    assert full["extraction"]["--views 1"]["views"] == 1  # measured itself
    default, one = full["recipes"]["default (--views epochs)"], full["recipes"]["--views 1"]
    assert default["views"] == 3 and one["views"] == 1
    assert "extraction scaled" in default["note"] and "extraction scaled" not in one["note"]
    assert set(default["where"]) == {"decode_s", "augment_s", "tower_s", "cache_write_s", "overlap_other_s"}
    assert default["extract_s"] == pytest.approx(1.5 * measured["seconds"])  # 3 views at the rate of 2
    assert full["plain"]["measured_steps"] == 1 and "extrapolated from 1 step" in full["plain"]["note"]
    assert full["components"]["tower_gflops"] > 0 and full["components"]["matmul_gflops"] > 0
    out = capsys.readouterr().out
    assert "Training steps" in out and "Targets" in out and "floor" in out


def test_floor_formula_counts_the_minimal_computation(bench: ModuleType) -> None:
    shape = bench.TextShape(width=64, layers=2, embed_dim=32, context_length=77)
    # one class, prefix of 2 positions, EOT at position 3: suffix of 2 positions, no padding
    minimal = bench.minimal_text_flops(shape, 2, [3], prefixes=1, images=1)
    padded = bench.fast_text_flops(shape, 2, [3], prefixes=1, images=1)
    tokens, keys = 4, 1 + 2 + 3 + 4  # causal: position p attends p + 1 keys
    blocks = 2 * (24 * tokens * 64 * 64) * 2 + 2 * (4 + 8) * 64 * keys
    head = 2 * 2 * 64 * 32 + 2 * 2 * 32
    assert minimal == pytest.approx(blocks + head)
    assert padded >= minimal  # the padded path scores the full suffix block
    # two classes needing 1 and 3 suffix positions: one bucket of 3 when the split gains little, never less work
    assert bench.fast_text_flops(shape, 2, [2, 4], prefixes=1, images=1) >= \
        bench.minimal_text_flops(shape, 2, [2, 4], prefixes=1, images=1)


def test_class_names_are_real_and_mostly_distinct(bench: ModuleType) -> None:
    flowers, source = bench.class_names(102)
    assert source == "Flowers102" and len(flowers) == 102
    mixed, _ = bench.class_names(1000)
    assert len(mixed) == 1000 and len(set(mixed)) > 990  # the shipped sets share a few names (as ImageNet has)


def test_tpt_section_gives_the_per_image_ratios(bench: ModuleType, tmp_path: Path) -> None:
    report = tmp_path / "tpt.json"
    bench.main(["--model", "tiny", "--sections", "tpt", "--classes", "3,5", "--plain-max-classes", "4", "--reps", "1",
                "--reps-slow", "1", "--slow-s", "60", "--precision", "fp32", "--json", str(report)])
    rows = json.loads(report.read_text())["tpt"]
    assert [(row["classes"], row["views"]) for row in rows] == [(3, 64), (5, 64)]
    for row in rows:
        assert row["zeroshot_s"] > 0 and row["ours_s"] > 0 and row["ours_vs_zeroshot"] > 0
        assert (row["official_s"] is None) == (row["classes"] > 4) and row["peak_mib_ours"] > 0
    assert rows[0]["speedup"] > 0
