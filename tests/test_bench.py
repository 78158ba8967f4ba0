import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_at_smoke_size_runs_every_section_on_the_cpu(tmp_path):
    # One thread: on a busy 2-core machine two threads per process can be 50x slower.
    result = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--device", "cpu", "--smoke", "--output-dir",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [name for name in bench.SECTIONS if "error" in report[name]] == [], report
    assert [row[""] for row in report["step"]["rows"]] == list(bench.VARIANTS)
    assert [row[""] for row in report["precision"]["rows"]] == ["fp32", "bf16", "fp16"]
    assert report["sdpa"]["kernels_that_ran"] and "MATH" in [row[""] for row in report["sdpa"]["rows"]]
    compiled = report["compile"]
    assert [(row["batch"], row[""]) for row in compiled["rows"]] == [(8, "eager"), (8, "compiled"), (4, "eager"),
                                                                   (4, "compiled")]
    assert compiled["errors"] == [] and compiled["dynamo_graphs"] == 2  # each batch compiled once
    assert "needs CUDA" in report["sync"]["skipped"]
    assert report["pipeline"]["loop_over_bare"] > 0 and report["pipeline"]["projected_baseline_s"] > 0
    assert all(row["host ms/step"] > 0 for row in report["pipeline"]["rows"])
    train = report["train"]
    assert train["returncode"] == 0 and train["rows"][0]["complete"] and train["rows"][0]["img_per_s"] > 0
    assert "--compile-mode default" in train["command"] and (tmp_path / "train-run" / "checkpoint.pt").exists()
    markdown = (tmp_path / "bench.md").read_text()
    assert all(f"## {name} (" in markdown for name in bench.SECTIONS)
    assert "| baseline |" in markdown and "| training loop (loader, augmentation, mixing, step) |" in markdown


def test_the_cpu_sections_print_their_tables():
    result = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--rounds", "1", "--steps", "1",
                             "--warmup", "0", "--batch-size", "8"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("| baseline |", "| mla-qkv |", "| cls-4 |", "| torchvision per-image PIL, 1 process |",
                "| batched, on cpu", "| training loop", "loop_over_bare:"):
        assert row in result.stdout, row


def test_an_unknown_section_or_a_missing_cuda_is_one_line(monkeypatch, capsys):
    def error_of(*argv):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(bench.get_args_parser().parse_args(argv))
        lines = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        return lines[0]

    assert "bench.py: error: --sections steps: choose from step, precision" in error_of("--sections", "steps",
                                                                                       "--device", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "bench.py: error: --device cuda, but CUDA cannot start" in error_of("--device", "cuda")


def test_a_synchronising_op_is_reported_with_where_it_was_called(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def synchronises():
        raise RuntimeError("called a synchronizing CUDA operation\nthe rest")

    assert bench.first_sync(lambda: None) == "clean"
    report = bench.first_sync(synchronises)
    assert report.startswith("called a synchronizing CUDA operation, at test_bench.py:")
    assert "`raise RuntimeError(" in report
    assert modes == ["error", "default"] * 2  # the debug mode is always switched off again
