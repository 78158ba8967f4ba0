"""One command for a GPU machine: the figures that say how fast PoorViTs (arXiv 2501.06220) trains there, printed
and written as Markdown and JSON. The goal: the 100-epoch baseline (15 M samples) in <= 300 s on one H100.

    python gpu_check.py                          # or: make gpu-check; at most --time-limit (7.5 min) plus start-up
    python gpu_check.py --device cpu --smoke     # every section at a tiny size (the tests run this)
    python gpu_check.py --sections sync,train    # only some sections

Sections, in this order; a section that fails is recorded with its error and the check goes on:
  step      train-step img/s per variant at batch 256 (bf16 autocast on CUDA), eager vs torch.compile'd, with the
            compile times and Dynamo's graph count; variants are compiled baseline first while --compile-budget lasts
  sync      whether a warmed-up training step (eager, compiled) and a device-loader chunk run under
            torch.cuda.set_sync_debug_mode("error"), and if not, where the first synchronising op was called
  pipeline  bench.py's training loop vs bare step (compiled): img/s, loop/bare, projected 100-epoch time, peak memory
  train     a 1-epoch train.py run with the baseline's flags on random CIFAR-10-shaped uint8 data written in the real
            on-disk format (no download needed); its summary's speed and times
OUTPUT_DIR/gpu-check.md and gpu-check.json are rewritten after every section: a check cut short keeps its figures.
"""
import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import bench
import data
import train

ROOT = Path(__file__).resolve().parent
# --smoke: sizes for a CPU test of every section. aot_eager compiles without inductor's C++ build (minutes here).
SMOKE = dict(batch_size=4, steps=1, warmup=1, rounds=1, compile_backend="aot_eager", compile_budget=0.0,
             train_images=320, train_args="--dim 32 --depth 2 --heads 4 --patch-size 8 --ra-reps 1 --log-every 10")


def get_args_parser():
    parser = argparse.ArgumentParser(description="One-command speed check of PoorViTs for a GPU machine.")
    parser.add_argument("--device", default=None, type=str, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--output-dir", default="runs/gpu-check", type=str,
                        help="where gpu-check.md, gpu-check.json and the train.py run (train-run/, replaced) go")
    parser.add_argument("--sections", default="step,sync,pipeline,train", type=str,
                        help="comma-separated, from step, sync, pipeline, train")
    parser.add_argument("--batch-size", default=256, type=int, help="images per step, every section (the recipe's)")
    parser.add_argument("--steps", default=50, type=int, help="timed steps per round")
    parser.add_argument("--warmup", default=20, type=int, help="untimed steps of each step function first")
    parser.add_argument("--rounds", default=5, type=int, help="interleaved rounds; the median round counts")
    parser.add_argument("--compile-mode", default="default", choices=train.COMPILE_MODES, help="torch.compile mode")
    parser.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"),
                        help="torch.compile backend; aot_eager builds the graphs without generating code, which "
                             "tells a Dynamo problem from an Inductor one")
    parser.add_argument("--compile-budget", default=150.0, type=float,
                        help="seconds of compiling in the step section: the baseline is always compiled, a further "
                             "variant only while the budget left covers the slowest compile so far")
    parser.add_argument("--train-images", default=50_000, type=int,
                        help="training images of the synthetic CIFAR-10 for the train.py run (test images: a fifth)")
    parser.add_argument("--train-args", default="", type=str, help="extra train.py flags for the 1-epoch run")
    parser.add_argument("--time-limit", default=450.0, type=float,
                        help="seconds for the whole check: the train.py run gets what is left, at least 60")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes for a CPU test (replaces the sizes, backend and --train-args above)")
    return parser


def tail(text, lines=15):
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def machine_info(device):
    info = train.run_info(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, gpu_memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count)
    else:
        info["threads"] = torch.get_num_threads()
    return info


# ---- the sections: each takes the Check and returns its figures (a JSON-able dict)
def compile_variants(check, variants):
    """Compiled trainers, in order; a further variant only while --compile-budget covers another compile as slow as
    the slowest so far. A compile's time is that of the first step (forward and backward graphs). A compile that
    fails ends the compiling; its error is returned (None: none failed)."""
    images, labels, no_mix = bench.fixed_batch(check.opts.batch_size, check.device)
    trainers, seconds = {}, {}
    for name, overrides in variants.items():
        if seconds and sum(seconds.values()) + max(seconds.values()) > check.opts.compile_budget:
            break
        start = time.perf_counter()
        try:
            trainer = bench.make_trainer(overrides, check.device, check.compile_options)
            trainer[2](images, labels, no_mix)
            bench.synchronize(check.device)
        except Exception:  # the eager figures still count; the error is the finding
            return trainers, seconds, f"{name}: {tail(traceback.format_exc())}"
        seconds[name], trainers[name] = time.perf_counter() - start, trainer
    return trainers, seconds, None


def baseline_trainers(check):
    """The eager and compiled baseline trainers: the step section's, or built when it did not run. "compiled" is
    None when compiling failed."""
    if check.baseline is None:
        compiled, _, _ = compile_variants(check, {"baseline": {}})
        check.baseline = {"eager": bench.make_trainer({}, check.device), "compiled": compiled.get("baseline")}
    return check.baseline


def check_step(check):
    opts, device = check.opts, check.device
    bench.reset_peak_memory(device)
    eager = {name: bench.make_trainer(overrides, device) for name, overrides in bench.VARIANTS.items()}
    compiled, compile_seconds, compile_error = compile_variants(check, bench.VARIANTS)
    graphs_compiled = counters["stats"]["unique_graphs"]
    steps = {f"{name} eager": trainer[2] for name, trainer in eager.items()}
    steps.update({f"{name} compiled": trainer[2] for name, trainer in compiled.items()})
    rounds = bench.time_steps(steps, opts, device)
    rows = []
    for name in bench.VARIANTS:
        seconds = statistics.median(rounds[f"{name} eager"])
        row = {"variant": name, "eager_img_s": opts.batch_size / seconds, "eager_ms": 1000 * seconds}
        if name in compiled:
            seconds = statistics.median(rounds[f"{name} compiled"])
            row.update(compiled_img_s=opts.batch_size / seconds, compiled_ms=1000 * seconds,
                       compiled_vs_eager=bench.speedup(rounds, f"{name} eager", f"{name} compiled"),
                       compile_s=compile_seconds[name])
        rows.append(row)
    check.baseline = {"eager": eager["baseline"], "compiled": compiled.get("baseline")}
    return {"batch_size": opts.batch_size, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "rounds": opts.rounds, "steps_per_round": opts.steps, "rows": rows, "compile_error": compile_error,
            # One graph per compiled variant, none added by the timed steps: each is compiled once.
            "dynamo_graphs_after_compiling": graphs_compiled,
            "dynamo_graphs_after_timing": counters["stats"]["unique_graphs"],
            "peak_memory_gib": bench.peak_memory_gib(device)}


def first_sync(fn):
    """"clean" if fn runs under torch.cuda.set_sync_debug_mode("error"); else the error and where the op that
    synchronised was called: the innermost frame in the repository's other files, then the innermost of all."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "clean"
    except RuntimeError as e:
        frames = traceback.extract_tb(e.__traceback__)
        here = Path(__file__).resolve()
        ours = [f for f in frames if (path := Path(f.filename).resolve()).parent == ROOT and path != here]
        places = dict.fromkeys(f"{Path(f.filename).name}:{f.lineno} `{f.line}`" for f in ours[-1:] + frames[-1:])
        return f"{str(e).strip().splitlines()[0]}, at " + " -> ".join(places)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_sync(check):
    device, batch = check.device, check.opts.batch_size
    if device.type != "cuda":
        return {"skipped": "set_sync_debug_mode needs CUDA"}
    baseline = baseline_trainers(check)
    images, labels, _ = bench.fixed_batch(batch, device)
    mix, state = data.BatchMix(10), train.TrainingState(device)  # the recipe's mixing, train.py's loss bookkeeping

    def step_of(trainer):
        def step():
            train.seed_step(0, 0, state.step)
            state.add(trainer[2](images, labels, mix))
        return step

    loader = bench.recipe_loader(*bench.random_batch(4 * batch, device), batch, device, chunk_images=2 * batch)
    checks = {"train step, eager": step_of(baseline["eager"])}
    if baseline["compiled"] is not None:
        checks["train step, compiled"] = step_of(baseline["compiled"])
    checks["device loader, one augmentation chunk"] = lambda: next(iter(loader))
    results = {}
    for name, fn in checks.items():
        for _ in range(2):  # warm-up: allocator, cuBLAS handles, compilation
            fn()
        torch.cuda.synchronize(device)
        results[name] = first_sync(fn)
        torch.cuda.synchronize(device)
    return results


def check_pipeline(check):
    # The step section's compiled baseline if it ran: compiling another model would only cost time.
    baseline = baseline_trainers(check)
    trainer = baseline["compiled"] or baseline["eager"]
    return {"compiled": baseline["compiled"] is not None,
            **bench.measure_pipeline(trainer[2], check.device, check.opts)}


def check_train(check):
    opts, run_dir = check.opts, check.out / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # train.py never overwrites a run: a check run again replaces its own
    with tempfile.TemporaryDirectory() as data_dir:
        data.write_cifar(data_dir, "cifar10", per_batch=opts.train_images // 5)
        cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "cifar10", "--data-dir", data_dir, "--epochs", "1",
               "--warmup-epochs", "1", "--batch-size", str(opts.batch_size), "--amp", "--device", check.device.type,
               "--output-dir", str(run_dir), *shlex.split(opts.train_args)]
        timeout = max(60.0, check.seconds_left())
        try:
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"command": shlex.join(cmd), "error": f"timed out after {timeout:.0f} s: {tail(e.stderr)}"}
    figures = {"command": shlex.join(cmd), "returncode": result.returncode}
    if result.returncode:
        figures["error"] = tail(result.stderr)
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        figures.update({key: summary[key] for key in ("complete", "steps", "img_per_s", "ms_per_step",
                                                      "train_seconds", "total_seconds", "final_acc")})
        figures["compiled"] = summary["args"]["compile"]
        if summary["img_per_s"]:  # at this speed, the 100-epoch baseline's steps (evaluation and saving excluded)
            figures["projected_baseline_s"] = bench.BASELINE_SAMPLES / summary["img_per_s"]
    return figures


SECTIONS = {"step": check_step, "sync": check_sync, "pipeline": check_pipeline, "train": check_train}


# ---- Markdown
def fmt(value, spec=",.0f"):
    return "—" if value is None else format(value, spec)


def cell(value):
    """A Markdown table cell: floats with two decimals, and no | that would split the cell."""
    return (fmt(value, ",.2f") if isinstance(value, float) else str(value)).replace("|", "\\|")


def markdown_step(r):
    lines = [f"Batch {r['batch_size']}, {r['precision']}; medians of {r['rounds']} interleaved rounds of "
             f"{r['steps_per_round']} steps.", "",
             "| variant | eager img/s | eager ms | compiled img/s | compiled ms | compiled / eager (x) | compile s |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {fmt(row['eager_img_s'])} | {fmt(row['eager_ms'], '.2f')} "
                     f"| {fmt(row.get('compiled_img_s'))} | {fmt(row.get('compiled_ms'), '.2f')} "
                     f"| {fmt(row.get('compiled_vs_eager'), '.2f')} | {fmt(row.get('compile_s'), '.0f')} |")
    lines += ["", f"Dynamo graphs: {r['dynamo_graphs_after_compiling']} after compiling, "
                  f"{r['dynamo_graphs_after_timing']} after the timed steps. "
                  f"Peak memory: {fmt(r['peak_memory_gib'], '.2f')} GiB."]
    return lines + (["", "**compiling failed**:", "", "```", r["compile_error"], "```"] if r["compile_error"] else [])


def markdown_pipeline(r):
    return [f"Baseline model, {'compiled' if r['compiled'] else 'eager (compiling failed)'}.", "",
            "| measurement | img/s | ms/step |", "|---|---|---|",
            f"| bare step (fixed batch, no mixing) | {fmt(r['bare_img_s'])} | {fmt(r['bare_ms'], '.2f')} |",
            f"| training loop (device loader, augmentation, mixing, step) | {fmt(r['loop_img_s'])} "
            f"| {fmt(r['loop_ms'], '.2f')} |", "",
            f"loop / bare = {r['loop_over_bare']:.3f}; projected 100-epoch baseline (15 M samples, no evaluation): "
            f"**{r['projected_baseline_s']:,.0f} s**; peak memory {fmt(r['peak_memory_gib'], '.2f')} GiB."]


def markdown_sync(r):
    return ["| under set_sync_debug_mode(\"error\") | result |", "|---|---|"] + [
        f"| {name} | {cell(result)} |" for name, result in r.items() if name != "seconds"]


def markdown_section(name, r):
    if "error" in r and name != "train":
        return ["**failed**:", "", "```", r["error"], "```"]
    if "skipped" in r:
        return [f"skipped: {r['skipped']}"]
    if name == "step":
        return markdown_step(r)
    if name == "pipeline":
        return markdown_pipeline(r)
    if name == "sync":
        return markdown_sync(r)
    lines = ["| | |", "|---|---|"] + [f"| {key} | {cell(value)} |" for key, value in r.items() if key != "error"]
    return lines + (["", "**failed**:", "", "```", r["error"], "```"] if "error" in r else [])


class Check:
    """The options, the device, the results so far, and the files they are written to."""

    def __init__(self, opts, device):
        self.opts, self.device, self.start = opts, device, time.monotonic()
        self.out = Path(opts.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.compile_options = {"mode": opts.compile_mode, "backend": opts.compile_backend}
        self.results = {"machine": machine_info(device), "options": vars(opts)}
        self.baseline = None  # the step section's eager and compiled baseline trainers, for the sync section

    def seconds_left(self):
        return self.opts.time_limit - (time.monotonic() - self.start)

    def run(self, name):
        start = time.monotonic()
        try:
            self.results[name] = SECTIONS[name](self)
        except Exception:  # a failing section is a finding: record it and go on
            self.results[name] = {"error": tail(traceback.format_exc(), 25)}
        self.results[name]["seconds"] = time.monotonic() - start
        self.write()
        print("\n".join(self.section_markdown(name)), flush=True)

    def section_markdown(self, name):
        result = self.results[name]
        return ["", f"## {name} ({result['seconds']:.0f} s)", ""] + markdown_section(name, result)

    def write(self):
        machine = self.results["machine"]
        lines = ["# PoorViTs GPU check", "", f"{machine['device_name']}, torch {machine['torch']}, commit "
                 f"{machine['git_commit']}, {time.strftime('%Y-%m-%d %H:%M')}"]
        for name in SECTIONS:
            if name in self.results:
                lines += self.section_markdown(name)
        (self.out / "gpu-check.md").write_text("\n".join(lines) + "\n")
        (self.out / "gpu-check.json").write_text(json.dumps(self.results, indent=2) + "\n")


def main(opts):
    if opts.smoke:
        vars(opts).update(SMOKE)
    chosen = opts.sections.split(",")
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"gpu_check.py: error: --sections {','.join(unknown)}: choose from {', '.join(SECTIONS)}")
    if opts.compile_backend != "inductor" and opts.compile_mode != "default":
        raise SystemExit(f"gpu_check.py: error: --compile-mode {opts.compile_mode} needs --compile-backend inductor")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: --device cuda: no CUDA device is available here (use --device cpu)")
    check = Check(opts, device)
    check.write()
    print(f"{bench.machine(device)}; writing {check.out / 'gpu-check.md'} and gpu-check.json", flush=True)
    for name in chosen:
        check.run(name)
    return check.results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
