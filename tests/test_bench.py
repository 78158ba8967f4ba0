import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_the_gpu_check_at_smoke_size_runs_every_section_on_the_cpu(tmp_path):
    # One thread: on a busy 2-core machine two threads per process can be 50x slower.
    result = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--device", "cpu", "--smoke", "--output-dir",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    # The most telling sections first, and every one without an error.
    assert [name for name in report if name in bench.SECTIONS] == bench.GPU_CHECK.split(",")
    assert [name for name in bench.SECTIONS if "error" in report[name]] == [], report
    assert [row["variant"] for row in report["step"]["rows"]] == list(bench.VARIANTS)
    assert [row["precision"] for row in report["precision"]["rows"]] == ["fp32", "bf16", "fp16"]
    assert report["sdpa"]["kernels_that_ran"] and "MATH" in [row["backend"] for row in report["sdpa"]["rows"]]
    compiled = report["compile"]
    assert [row["step"] for row in compiled["rows"]] == ["eager", "compiled", "compiled, math"]
    assert compiled["errors"] == [] and compiled["fastest compile mode"].startswith("compiled, ")
    # The forced math kernel got a graph of its own: no fused attention op in it.
    attention = [row["attention"] for row in compiled["rows"]]
    assert "flash_attention_for_cpu" in attention[1] and attention[2] == "none"
    assert [row["step"] for row in report["ddp"]["rows"]] == ["eager", "compiled"] and report["ddp"]["batch_size"] == 4
    assert "needs CUDA" in report["sync"]["skipped"]
    assert report["pipeline"]["loop_over_bare"] > 0 and report["pipeline"]["projected_baseline_s"] > 0
    train = report["train"]
    assert train["returncode"] == 0 and train["rows"][0]["complete"] and train["rows"][0]["img_per_s"] > 0
    assert "--compile-mode default" in train["command"] and train["notes"] == ["train.py: note: --amp: bf16 autocast"]
    # What a GPU machine sends back: at most 7 files of at most 16 MiB; the train run's checkpoint is not among them.
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["bench.json", "bench.md", "train-metrics.jsonl", "train-summary.json"]
    assert all(path.stat().st_size <= 16 * 2**20 for path in tmp_path.iterdir())
    assert json.loads((tmp_path / "train-summary.json").read_text())["img_per_s"] == train["rows"][0]["img_per_s"]
    markdown = (tmp_path / "bench.md").read_text()
    assert all(f"## {name} (" in markdown for name in bench.SECTIONS if name != "sync")
    assert "## sync: skipped, set_sync_debug_mode needs CUDA" in markdown
    assert "| baseline |" in markdown and "| training loop (loader, augmentation, mixing, step) |" in markdown


def test_the_cpu_sections_print_their_tables():
    result = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--rounds", "1", "--steps", "1",
                             "--warmup", "0", "--batch-size", "8"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the smoke test
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

    message = error_of("--sections", "steps", "--device", "cpu")
    assert "bench.py: error: --sections steps: choose from compile, sync" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "bench.py: error: --device cuda, but CUDA cannot start" in error_of("--device", "cuda")


def smoke_options(**changes):
    return argparse.Namespace(**{**vars(bench.get_args_parser().parse_args([])), **bench.SMOKE, **changes})


# In a process of its own: Dynamo state a compile leaves behind, which torch._dynamo.reset() keeps, would change
# what later tests compile (test_train's graph count).
STATIC_GRAPHS = """
import json, sys, torch, bench
static = []  # per graph Dynamo builds: whether every size in it is a number (not a symbol)
def backend(graph, example_inputs):
    values = [node.meta["example_value"] for node in graph.graph.nodes if node.op == "placeholder"]
    sizes = [size for value in values for size in (value.shape if isinstance(value, torch.Tensor) else [value])]
    static.append(all(type(size) is int for size in sizes))
    return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)
opts = bench.get_args_parser().parse_args([])
vars(opts).update(bench.SMOKE, compile_backend=backend)
results = [bench.compare_compiled(batch, {}, opts, torch.device("cpu"))[:2] for batch in (8, 4)]
print(json.dumps({"static": static, "results": results}))
"""


def test_each_batch_is_compiled_as_a_static_graph_of_its_own():
    result = subprocess.run([sys.executable, "-c", STATIC_GRAPHS], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    # Batch 8, then batch 4: without a fresh Dynamo and dynamic=False, batch 4's graph has a symbolic batch size.
    assert report["static"] == [True, True]
    for rows, errors in report["results"]:
        assert [row["step"] for row in rows] == ["eager", "compiled"] and errors == []


def test_host_and_gpu_time_queue_the_calls_behind_a_sleeping_kernel(monkeypatch):
    # A CUDA device, faked: the order of what reaches it.
    calls = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            calls.append("event")

        def synchronize(self):
            calls.append("wait for the last event")

        def elapsed_time(self, other):
            return 6.0  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append(f"sleep {cycles} cycles"))
    monkeypatch.setattr(bench, "synchronize", lambda device: calls.append("synchronize"))
    monkeypatch.setattr(bench.time, "perf_counter", iter([10.0, 10.0078125]).__next__)  # 2**-8 s a step
    host, gpu = bench.host_and_gpu_seconds(lambda: calls.append("step"), torch.device("cuda", 0))
    # The host's steps from an idle GPU; the GPU's behind a sleep of twice the host's time (2 x 2 x 2**-8 s, 3 GHz).
    assert calls == ["synchronize", "step", "step", "synchronize", "sleep 46875000 cycles", "event", "step", "step",
                     "event", "wait for the last event"]
    assert host == 2**-8 and gpu == 0.003  # the GPU's: 6 ms between the events, over 2 steps


def test_the_time_limit_skips_a_section_that_cannot_finish_and_stops_one_that_runs_past_it(monkeypatch, tmp_path):
    def sleeps(opts, device, check):
        try:
            time.sleep(60)
        except Exception:  # as a section's compile failing: the time limit must not end there
            return {"rows": []}

    monkeypatch.setitem(bench.SECTIONS, "augment", sleeps)
    monkeypatch.setitem(bench.SECONDS_NEEDED, "augment", 0)
    handler = signal.getsignal(signal.SIGALRM)
    start = time.time()
    try:
        results = bench.main(bench.get_args_parser().parse_args(
            ["--sections", "augment,step", "--device", "cpu", "--time-limit", "2", "--output-dir", str(tmp_path)]))
    finally:
        signal.signal(signal.SIGALRM, handler)
    assert time.time() - start < 30
    assert results["augment"]["error"] == "stopped at --time-limit 2 s"
    assert results["step"] == {"skipped": "0 s of --time-limit left, it needs about 30"}
    markdown = (tmp_path / "bench.md").read_text()
    assert "stopped at --time-limit 2 s" in markdown and "\n## step: skipped, 0 s of --time-limit left" in markdown


def test_a_train_run_past_the_time_limit_is_said_in_one_line(monkeypatch, tmp_path):
    def times_out(command, **kwargs):  # as subprocess.run raises it: the output as bytes, whatever text= asked for
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], stderr=b"epoch 1: 40%|####\nstill compiling\n")

    monkeypatch.setattr(bench.subprocess, "run", times_out)
    check = argparse.Namespace(out=tmp_path, end=time.time() + 100.4)
    figures = bench.bench_train(smoke_options(), CPU, check)
    assert figures["error"] == "timed out after 90 s (--time-limit); its last line: still compiling"
    assert figures["rows"] == [] and list(tmp_path.iterdir()) == []


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
