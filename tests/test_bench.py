import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*flags):
    return subprocess.run([sys.executable, "bench.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_prints_every_section_table():
    result = bench("--sections", "step,augment,pipeline,concat", "--rounds", "1", "--steps", "1", "--warmup", "0",
                   "--batch-size", "8", "--aug-images", "64")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for row in ("| baseline |", "| mla-q |", "| mla-qkv |", "| cls-4 |", "| torchvision per-image PIL, 1 process |",
                "| batched, on cpu", "| training loop", "loop / bare =", "| mla-kv shared |"):
        assert row in out, row


def test_bench_rejects_an_unknown_section():
    import bench as bench_module  # in-process: a subprocess would spend seconds importing torch to fail at once

    with pytest.raises(SystemExit) as exit_info:
        bench_module.main(bench_module.get_args_parser().parse_args(["--sections", "steps", "--device", "cpu"]))
    assert "--sections steps" in str(exit_info.value.code)
