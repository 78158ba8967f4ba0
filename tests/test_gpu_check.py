import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import bench
import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_sized_check_runs_every_section_on_the_cpu(tmp_path):
    # One thread: on a busy 2-core machine two threads per process can be 50x slower.
    result = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--smoke", "--output-dir",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert not [name for name in gpu_check.SECTIONS if "error" in report[name]], report
    step = report["step"]
    assert [row["variant"] for row in step["rows"]] == list(bench.VARIANTS)
    assert step["rows"][0]["compiled_img_s"] > 0 and "compiled_img_s" not in step["rows"][1]  # budget 0: baseline
    assert step["dynamo_graphs_after_compiling"] == step["dynamo_graphs_after_timing"] == 1  # compiled once
    assert "needs CUDA" in report["sync"]["skipped"]
    assert report["pipeline"]["loop_img_s"] > 0 and report["pipeline"]["projected_baseline_s"] > 0
    train = report["train"]
    assert train["returncode"] == 0 and train["complete"] and train["steps"] == 320 // 4 and train["img_per_s"] > 0
    assert (tmp_path / "train-run" / "checkpoint.pt").exists()
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert all(f"## {name} (" in markdown for name in gpu_check.SECTIONS)
    assert "| baseline |" in markdown and "loop / bare =" in markdown and "| img_per_s |" in markdown


def test_a_synchronising_op_is_reported_with_where_it_was_called(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def synchronises():
        raise RuntimeError("called a synchronizing CUDA operation\nthe rest")

    assert gpu_check.first_sync(lambda: None) == "clean"
    report = gpu_check.first_sync(synchronises)
    assert report.startswith("called a synchronizing CUDA operation, at test_gpu_check.py:")
    assert "`raise RuntimeError(" in report
    assert modes == ["error", "default"] * 2  # the debug mode is always switched off again
