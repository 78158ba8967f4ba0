"""Speed of PoorViTs on this machine, in sections that print Markdown tables and assert nothing (docs/performance.md).

    python bench.py --device cpu                  # step, augment, pipeline: the CPU figures
    python3 bench.py --gpu-check --output-dir DIR  # every section, the most telling first, 8 minutes (make gpu-check)
    python bench.py --gpu-check --device cpu --smoke --output-dir /tmp/check   # every section, tiny (the tests)
"""
import argparse
import itertools
import json
import math
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity

import augment
import data
import predict
import run
import train
from model import ViT, ViTConfig, count_parameters, forward_macs

ROOT = Path(__file__).resolve().parent
VARIANTS = {"baseline": {}, "mla-q": {"latent": "q"}, "mla-qkv": {"latent": "qkv"}, "cls-4": {"num_cls": 4}}
RECIPE = dict(hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25)
BASELINE_SAMPLES = 100 * 3 * 50_000  # 100 epochs x 3 repeats x the CIFAR-10 training set
# The GPU check's sections, the figures that decide the GPU defaults first: a check cut short keeps those.
GPU_CHECK = "compile,sync,pipeline,train,step,precision,sdpa,augment,ddp"
GPU_CHECK_SECONDS = 480.0
# About how long each section takes on a GPU, in seconds: a section with less time left is skipped.
SECONDS_NEEDED = {"compile": 120, "sync": 15, "pipeline": 20, "train": 90, "step": 30, "precision": 25, "sdpa": 30,
                  "augment": 15, "ddp": 90}
# --smoke: sizes for a CPU test of every section (the model of train.py's tests); aot_eager builds the graphs without
# Inductor's C++ build.
SMOKE = dict(model=dict(patch_size=8, dim=32, depth=2, heads=4, latent_dim=16), batch_size=8, ddp_batch=4, steps=1,
             warmup=1, rounds=1, compile_backend="aot_eager",
             train_args="--dataset digits --dim 32 --depth 2 --heads 4 --patch-size 8 --ra-reps 1 --log-every 50")
# The calls behind a host or a GPU time: two compiled baseline steps, about 700 kernel launches, fit CUDA's launch
# queue (about 1,000 launches), so that the host never waits for room in it; eager steps launch more.
HOST_STEPS = 2
# Kernel names of the fused attention kernels (flash, memory-efficient, cuDNN) and of torch's attention ops.
ATTENTION = re.compile("flash|fmha|sdpa|attn|attention|scaled_dot_product", re.IGNORECASE)


def get_args_parser():
    parser = argparse.ArgumentParser(description="PoorViTs speed benchmarks.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--sections", default="step,augment,pipeline", help=f"comma-separated, from {GPU_CHECK}")
    add("--gpu-check", action="store_true", help="every section, into --output-dir (unset: runs/gpu-check)")
    add("--smoke", action="store_true", help="tiny sizes, aot_eager compiling: every section in seconds on a CPU")
    add("--device", help="cuda or cpu (unset: cuda on a CUDA build of torch, which must then start; else cpu)")
    add("--batch-size", default=256, type=int, help="images per step (the recipe's global batch)")
    add("--ddp-batch", default=64, type=int, help="ddp section's per-rank batch (ddp-bs256's on 4 processes)")
    add("--steps", type=int, help="timed steps per round (unset: 50 on CUDA, 1 on CPU)")
    add("--warmup", type=int, help="untimed steps first (unset: 20 on CUDA, 2 on CPU)")
    add("--rounds", type=int, help="interleaved rounds; the median counts (unset: 5 on CUDA, 24 on CPU)")
    add("--compile-mode", default="default", choices=train.COMPILE_MODES, help="of the train section's run")
    add("--compile-backend", default="inductor", help="aot_eager: graphs without code generation (Dynamo alone)")
    add("--time-limit", type=train.POSITIVE, help="seconds for all sections: one that cannot finish in what is left is "
        f"skipped, one still running at the end stopped (unset: {GPU_CHECK_SECONDS:.0f} with --gpu-check, else none)")
    add("--train-args", default="", help="extra train.py flags for the train section")
    add("--output-dir", help="where bench.md, bench.json and the train section's summary and metrics go")
    parser.set_defaults(model={})  # the paper's model
    return parser


# ---- timing
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, device, warmup=0):
    """Seconds per call of fn over `steps` calls after `warmup`, from an idle device until the device is idle again."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def host_and_gpu_seconds(fn, device):
    """The host's and the GPU's seconds per call of fn, over HOST_STEPS calls each, on CUDA.

    The host's: its wall time from an idle GPU, so that no launch waits for room in the launch queue (once the GPU
    falls behind, a launch spins until a slot frees, and the host's time would read as the GPU's). The GPU's, by
    CUDA events: the calls queued behind a sleeping kernel that outlasts their launches, so that the GPU runs them
    back to back whatever the host's speed. Host time above GPU time: the host holds the GPU back.
    """
    synchronize(device)
    start = time.perf_counter()
    for _ in range(HOST_STEPS):
        fn()
    host = (time.perf_counter() - start) / HOST_STEPS

    # Twice the host's time at least, in cycles of 1/3 ns: faster than any GPU's clock (an H100's peaks near 2 GHz).
    synchronize(device)
    first, last = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    torch.cuda._sleep(int(2 * HOST_STEPS * host * 3e9))
    first.record()
    for _ in range(HOST_STEPS):
        fn()
    last.record()
    last.synchronize()
    return host, first.elapsed_time(last) / 1000 / HOST_STEPS


def interleaved(fns, opts, device, split):
    """Per fn, per round: its seconds per call over opts.steps calls, and with `split` its host's and GPU's seconds
    per call (host_and_gpu_seconds). The fns take turns in every round, so that drift in the machine's speed hits all
    of them alike."""
    for fn in fns.values():
        for _ in range(opts.warmup):
            fn()
    times = {name: {"wall": [], "host": [], "gpu": []} for name in fns}
    for _ in range(opts.rounds):
        for name, fn in fns.items():
            times[name]["wall"].append(timed(fn, opts.steps, device))
            for key, seconds in zip(("host", "gpu"), host_and_gpu_seconds(fn, device) if split else ()):
                times[name][key].append(seconds)
    return times


def speed_rows(times, batch_size, column, reference):
    """A row per fn, named in `column`: img/s, ms/step, host and GPU ms/step (medians over the rounds), and how many
    times faster than `reference` it ran (the median of per-round ratios)."""
    rows = []
    for name, seconds in times.items():
        ms = {key: 1000 * statistics.median(values) for key, values in seconds.items() if values}
        ratio = statistics.median(r / s for r, s in zip(times[reference]["wall"], seconds["wall"]))
        rows.append({column: name, "img/s": 1000 * batch_size / ms["wall"], "ms/step": ms["wall"],
                     "host ms/step": ms.get("host"), "GPU ms/step": ms.get("gpu"), f"vs {reference}": ratio})
    return rows


def random_batch(n, device, normalised=False):
    """n random images (uint8, or normalised) and their labels (or, normalised, one-hot targets) on `device`."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    if normalised:
        return data.Normalize(*data.CIFAR10_STATS)(images), F.one_hot(labels, 10).float()
    return images, labels


def make_step(opts, device, overrides=None, precision=None, compile_options=None, kernel=None):
    """train.py's step of a fresh paper model (opts.model: its changes for --smoke) with `overrides`, in `precision`
    (unset: bf16 on CUDA, else fp32), compiled with `compile_options` (None: eager), its attention on the SDPA
    `kernel` (None: torch's choice)."""
    model = ViT(ViTConfig(**{**opts.model, **(overrides or {})})).to(device)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    args = train.get_args_parser().parse_args([] if precision == "fp32" else ["--amp", "--amp-dtype", precision])
    optimizers = train.build_optimizers(args, model, device)
    schedulers = [train.build_scheduler(optimizer, args, steps_per_epoch=10_000) for optimizer in optimizers]
    network = model
    if kernel is not None:
        # The kernel is chosen inside the function, where Dynamo traces the choice into the graph. Chosen around the
        # call it would be lost: Dynamo would reuse another model's graph, without a guard on the choice.
        def network(images):
            with sdpa_kernel(kernel):
                return model(images)
    if compile_options is not None:
        network = torch.compile(network, **compile_options)
    amp = train.build_precision(args, device)
    return model, lambda images, targets: train.train_step(network, optimizers, schedulers, images, targets, amp, 0.1)


def time_steps(steps, opts, device, batch_size, column):
    """The speed of each step function on one fixed batch, in interleaved rounds, against the first; on CUDA with
    the host's and the GPU's time per step."""
    images, targets = random_batch(batch_size, device, normalised=True)
    fns = {name: (lambda step=step: step(images, targets)) for name, step in steps.items()}
    times = interleaved(fns, opts, device, split=device.type == "cuda")
    return speed_rows(times, batch_size, column, next(iter(steps)))


def attention_kernels(step, images, targets, device):
    """What runs the attention of one call of step, by the profiler: the CUDA kernels on a GPU, the aten ops on a
    CPU (names without their template arguments)."""
    gpu = device.type == "cuda"
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as profile:
        step(images, targets)
        synchronize(device)
    names = {re.split("[<(]", event.name.removeprefix("void "))[0] for event in profile.events()}
    return sorted(name for name in names if ATTENTION.search(name) and (gpu or name.startswith("aten::")))


def recipe_loader(n, opts, device, chunk_images):
    """train.py's device loader over n random images with the full recipe's augmentation (3 repeats per epoch)."""
    sampler = data.RepeatedAugmentationSampler(n, opts.batch_size, reps=3)
    return augment.DeviceLoader(*random_batch(n, device), sampler, augment.BatchAugment(*data.CIFAR10_STATS, **RECIPE),
                                device, chunk_images=chunk_images)


def loop_step(loader, step, device):
    """One step of train.py's loop at a time: the loader's next batch (epoch after epoch), seeding, mixing, step."""
    def epochs():
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    mix = data.BatchMix(10)
    batches = enumerate(epochs())

    def one():
        i, batch = next(batches)
        step(*mix(*batch, train.seed_step(0, 0, i, device)))
    return one


# ---- compiling: every batch its own static graph, as on a DDP rank
def compare_compiled(batch, kernels, opts, device):
    """The baseline step at `batch`, eager; compiled (train.py's default mode), on CUDA with CUDA graphs too
    (reduce-overhead), and compiled with each of `kernels` ({name: SDPA kernel}) forced; timed in interleaved rounds
    against eager. Returns the rows, the errors and the step functions.

    Dynamo starts afresh and compiles with dynamic=False: a graph built for another batch would otherwise turn the
    batch into a symbolic size. A variant that fails to compile is an error and the others go on; its compile seconds
    are those of its first step (forward and backward graphs).
    """
    variants = {"compiled": ("default", None)}
    if device.type == "cuda":
        variants["reduce-overhead"] = ("reduce-overhead", None)
    variants |= {name: ("default", kernel) for name, kernel in kernels.items()}
    torch._dynamo.reset()
    images, targets = random_batch(batch, device, normalised=True)
    steps = {"eager": make_step(opts, device)[1]}
    compile_seconds = {}
    errors = []
    for name, (mode, kernel) in variants.items():
        start = time.perf_counter()
        options = {"mode": mode, "backend": opts.compile_backend, "dynamic": False}
        try:
            step = make_step(opts, device, compile_options=options, kernel=kernel)[1]
            step(images, targets)
            synchronize(device)
        except Exception:  # the other figures still count; the error is the finding
            errors.append(f"batch {batch}, {name}: {tail(traceback.format_exc())}")
            continue
        steps[name] = step
        compile_seconds[name] = time.perf_counter() - start

    # Timed; then a recompile would show in Dynamo's graph count.
    graphs = counters["stats"]["unique_graphs"]
    rows = time_steps(steps, opts, device, batch, "step")
    if counters["stats"]["unique_graphs"] > graphs:
        errors.append(f"batch {batch}: the timed steps added Dynamo graphs (a recompile)")

    # What each step's attention ran (CUDA graphs' replays left unprofiled: their kernels are the compiled step's).
    for row in rows:
        row["compile s"] = compile_seconds.get(row["step"])
        if row["step"] != "reduce-overhead":
            row["attention"] = ", ".join(attention_kernels(steps[row["step"]], images, targets, device)) or "none"
    return rows, errors, steps


# ---- the sections: each returns its figures, {"rows": [...], ...}
def bench_compile(opts, device, check):
    """The baseline step at the paper's batch: eager, compiled, and on CUDA with CUDA graphs (reduce-overhead) and
    compiled with flash and with cuDNN attention. Its compiled step is the sync and pipeline sections' step."""
    # On a CPU its one other kernel: it shows that a forced kernel gets a graph of its own.
    kernels = {"compiled, math": SDPBackend.MATH}
    if device.type == "cuda":
        kernels = {"compiled, flash": SDPBackend.FLASH_ATTENTION, "compiled, cuDNN": SDPBackend.CUDNN_ATTENTION}
    rows, errors, steps = compare_compiled(opts.batch_size, kernels, opts, device)
    check.baseline = steps.get("compiled")
    # The mode that won, for train.py's default on CUDA.
    modes = [row for row in rows if row["step"] in ("compiled", "reduce-overhead")]
    won = max(modes, key=lambda row: row["img/s"], default=None)
    return {"batch_size": opts.batch_size, "backend": opts.compile_backend, "rows": rows, "errors": errors,
            "fastest compile mode": won and f"{won['step']}, {won['vs eager']:.2f}x eager"}


def bench_ddp(opts, device, check):
    """The baseline step at a DDP target's per-rank batch (--ddp-batch; ddp-bs1024's, 256, is the compile section's),
    eager, compiled, and on CUDA with CUDA graphs: compiled for this batch alone, as a rank compiles it."""
    rows, errors, _ = compare_compiled(opts.ddp_batch, {}, opts, device)
    return {"batch_size": opts.ddp_batch, "backend": opts.compile_backend, "rows": rows, "errors": errors}


def bench_step(opts, device, check):
    models = {name: make_step(opts, device, overrides) for name, overrides in VARIANTS.items()}
    rows = time_steps({name: step for name, (_, step) in models.items()}, opts, device, opts.batch_size, "variant")
    for row, (model, _) in zip(rows, models.values()):
        row.update(params=count_parameters(model), fwd_gmac=forward_macs(model.cfg) / 1e9)
    return {"batch_size": opts.batch_size, "precision": "bf16" if device.type == "cuda" else "fp32", "rows": rows}


def bench_precision(opts, device, check):
    steps = {name: make_step(opts, device, precision=name)[1] for name in ("fp32", "bf16", "fp16")}
    return {"batch_size": opts.batch_size, "rows": time_steps(steps, opts, device, opts.batch_size, "precision")}


def bench_sdpa(opts, device, check):
    """The attention kernels an eager step runs (the paper's head dim: 16), and the step with each SDPA backend
    forced."""
    images, targets = random_batch(opts.batch_size, device, normalised=True)
    ran = attention_kernels(make_step(opts, device)[1], images, targets, device)
    steps = {}
    unavailable = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        _, step = make_step(opts, device, kernel=backend)
        try:
            step(images, targets)
            steps[backend.name] = step
        except RuntimeError as e:  # "No available kernel": not on this device, dtype or head dim
            unavailable[backend.name] = run.first_line(e)[:200]
    rows = time_steps(steps, opts, device, opts.batch_size, "backend")
    return {"kernels_that_ran": ran, "rows": rows, "unavailable": unavailable}


def first_sync(fn):
    """"clean" if fn runs under torch.cuda.set_sync_debug_mode("error"); else the error and where the op that
    synchronised was called: the innermost frame in this repository, then the innermost of all."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "clean"
    except RuntimeError as e:
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if Path(f.filename).resolve().parent == ROOT and Path(f.filename).name != "bench.py"]
        places = dict.fromkeys(f"{Path(f.filename).name}:{f.lineno} `{f.line}`" for f in ours[-1:] + frames[-1:])
        return f"{str(e).strip().splitlines()[0]}, at " + " -> ".join(places)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def bench_sync(opts, device, check):
    if device.type != "cuda":
        return {"skipped": "set_sync_debug_mode needs CUDA", "rows": []}
    loader = recipe_loader(4 * opts.batch_size, opts, device, chunk_images=2 * opts.batch_size)
    state = run.TrainingState(device, 50)
    step = check.baseline or make_step(opts, device)[1]
    checks = {"training step: seeding, mixing, step, loss bookkeeping":
              loop_step(loader, lambda *batch: state.add(step(*batch)), device),
              "device loader, one augmentation chunk": lambda: next(iter(loader))}
    rows = []
    for name, fn in checks.items():
        timed(fn, 1, device, warmup=2)  # warm-up: allocator, cuBLAS handles, compilation
        rows.append({"check": name, "under set_sync_debug_mode('error')": first_sync(fn)})
        synchronize(device)
    return {"rows": rows}


def bench_pipeline(opts, device, check):
    """The training loop against the bare step, whole augmentation chunks per round; on a GPU with the compile
    section's compiled baseline when it ran."""
    step = check.baseline or make_step(opts, device)[1]
    chunk = 4096 if device.type == "cuda" else 4 * opts.batch_size  # 4 batches a chunk keeps a CPU run short
    loader = recipe_loader(10_000, opts, device, chunk)
    images, targets = random_batch(opts.batch_size, device, normalised=True)
    per_chunk = loader.batches_per_chunk
    rounds = argparse.Namespace(warmup=per_chunk, steps=per_chunk, rounds=max(2, opts.rounds * opts.steps // per_chunk))
    bare = "bare step (fixed batch, no mixing)"
    loop = "training loop (loader, augmentation, mixing, step)"
    times = interleaved({bare: lambda: step(images, targets), loop: loop_step(loader, step, device)}, rounds, device,
                        split=False)
    rows = speed_rows(times, opts.batch_size, "step", bare)
    return {"rows": rows, "loop_over_bare": rows[1]["img/s"] / rows[0]["img/s"],
            "projected_baseline_s": BASELINE_SAMPLES / rows[1]["img/s"]}


def bench_augment(opts, device, check):
    images, labels = random_batch(16 * opts.batch_size, device)
    mix = data.BatchMix(10)
    rng = train.seed_step(0, 0, 0, device)
    batch = opts.batch_size
    batch_augment = augment.BatchAugment(*data.CIFAR10_STATS, **RECIPE)
    transform = data.train_transform(*data.CIFAR10_STATS, **RECIPE, pil=True)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images[:1024]]

    def batched():
        out = batch_augment(images, torch.Generator().manual_seed(0))
        for x, y in zip(out.split(batch), labels.split(batch)):
            mix(x, y, rng)

    def per_image():  # on one thread, as a DataLoader worker
        for start in range(0, len(pil_images), batch):
            mix(torch.stack([transform(image) for image in pil_images[start:start + batch]]),
                labels[start:start + batch].cpu(), rng)

    rows = [{"augmentation": f"batched, on {device.type}", "img/s": len(images) / timed(batched, 3, device, warmup=1)}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows.append({"augmentation": "torchvision per-image PIL, 1 process",
                 "img/s": len(pil_images) / timed(per_image, 2, device)})
    torch.set_num_threads(threads)
    return {"threads": threads, "rows": [{**row, "vs per-image": row["img/s"] / rows[-1]["img/s"]} for row in rows]}


def tail(text, lines=15):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def bench_train(opts, device, check):
    """A 1-epoch train.py run on synthetic data (CIFAR-10's shapes) in what is left of --time-limit: its summary and
    notes; its summary.json and metrics.jsonl copied into --output-dir, its checkpoint (32 MB) left out."""
    with tempfile.TemporaryDirectory(prefix="poorvits-bench-") as folder:
        out = Path(folder) / "train-run"
        cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthetic", "--epochs", "1", "--warmup-epochs",
               "1", "--batch-size", str(opts.batch_size), "--amp", "--device", str(device), "--output-dir", str(out),
               "--compile-mode", opts.compile_mode, *shlex.split(opts.train_args)]
        figures = {"command": shlex.join(cmd), "rows": []}
        try:
            # Ten seconds before the time limit, to read what it wrote.
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=check.end - time.time() - 10)
            figures["returncode"] = result.returncode
            figures["notes"] = [line for line in result.stderr.splitlines() if "note:" in line]
            if result.returncode:
                figures["error"] = tail(result.stderr)
        except subprocess.TimeoutExpired as e:  # its output is bytes, whatever text= asked for
            last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
            figures["error"] = f"timed out after {e.timeout:.0f} s (--time-limit); its last line: {''.join(last)}"

        # Its files, and the speed of its timed steps.
        for name in ("summary.json", "metrics.jsonl"):
            if check.out and (out / name).exists():
                shutil.copy(out / name, check.out / f"train-{name}")
        if (out / "summary.json").exists():
            summary = json.loads((out / "summary.json").read_text())
            figures["rows"] = [{key: summary[key] for key in ("complete", "img_per_s", "ms_per_step", "train_seconds",
                                                              "total_seconds", "precision", "compiled")}]
            # At this speed, the 100-epoch baseline's steps (evaluation and saving excluded).
            figures["projected_baseline_s"] = summary["img_per_s"] and BASELINE_SAMPLES / summary["img_per_s"]
    return figures


SECTIONS = {"compile": bench_compile, "sync": bench_sync, "pipeline": bench_pipeline, "train": bench_train,
            "step": bench_step, "precision": bench_precision, "sdpa": bench_sdpa, "augment": bench_augment,
            "ddp": bench_ddp}


# ---- running them in time, and the files
class OutOfTime(BaseException):
    """--time-limit ran out inside a section (a BaseException: a section's own `except Exception` lets it pass)."""


def out_of_time(signum, frame):
    raise OutOfTime()


def run_section(name, opts, device, check):
    """The section's figures; or, in one line, why it has none: too little time left to start it, stopped at the
    time limit, or its error (a failing section is a finding, and the others go on)."""
    start = time.time()
    left = check.end - start
    if left < SECONDS_NEEDED[name]:
        return {"skipped": f"{max(left, 0):.0f} s of --time-limit left, it needs about {SECONDS_NEEDED[name]}"}
    if math.isfinite(left):
        signal.setitimer(signal.ITIMER_REAL, left)
    try:
        result = SECTIONS[name](opts, device, check)
    except OutOfTime:
        result = {"error": f"stopped at --time-limit {opts.time_limit:.0f} s"}
    except Exception:
        result = {"error": tail(traceback.format_exc(), 25)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["seconds"] = time.time() - start
    return result


def cell(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "—" if value is None else str(value).replace("|", "\\|")


def markdown(name, result):
    """The section as Markdown: a table of its rows (without columns that hold nothing), then its other figures."""
    if "skipped" in result:
        return ["", f"## {name}: skipped, {result['skipped']}"]
    lines = ["", f"## {name} ({result['seconds']:.0f} s)", ""]
    rows = result.get("rows", [])
    keys = dict.fromkeys(key for row in rows for key in row)
    header = [key for key in keys if any(row.get(key) is not None for row in rows)]
    if header:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(row.get(key)) for key in header) + " |" for row in rows]
    lines += [f"- {key}: {cell(value)}" for key, value in result.items() if key not in ("rows", "seconds", "error")]
    if result.get("error"):
        lines += ["", "**failed**:", "", "```", result["error"], "```"]
    return lines


def save(results, out):
    """bench.md and bench.json, rewritten as each section ends, so that a check cut short keeps its figures."""
    info = results["machine"]
    versions = ", ".join(f"{lib} {info[lib]}" for lib in ("torch", "cuda", "cudnn", "triton", "driver", "git_commit"))
    lines = ["# PoorViTs bench", "", f"{info['device_name']}, {versions}, {time.strftime('%Y-%m-%d %H:%M')}"]
    lines += [line for name in results if name in SECTIONS for line in markdown(name, results[name])]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(opts):
    """Every section asked for, in order, each within what is left of --time-limit; with --output-dir, the files."""
    if opts.gpu_check:
        opts.sections = GPU_CHECK
        opts.output_dir = opts.output_dir or "runs/gpu-check"
        opts.time_limit = GPU_CHECK_SECONDS if opts.time_limit is None else opts.time_limit
    vars(opts).update(SMOKE if opts.smoke else {})
    unknown = [s for s in opts.sections.split(",") if s not in SECTIONS]
    with predict.user_errors("bench.py"):
        if unknown:
            raise ValueError(f"--sections {','.join(unknown)}: choose from {', '.join(SECTIONS)}")
        device = run.device_of(opts.device)

    # Sizes: a GPU step takes milliseconds, a CPU step seconds.
    gpu = device.type == "cuda"
    opts.steps = opts.steps or (50 if gpu else 1)
    opts.rounds = opts.rounds or (5 if gpu else 24)
    if opts.warmup is None:
        opts.warmup = 20 if gpu else 2

    # What the sections share: the compile section's step (for sync and pipeline), the output folder, the clock.
    out = Path(opts.output_dir) if opts.output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    check = argparse.Namespace(baseline=None, out=out, end=time.time() + (opts.time_limit or math.inf))
    results = {"machine": {**run.run_info(device), "threads": torch.get_num_threads()}, "options": vars(opts)}
    print(f"machine: {results['machine']['device_name']}, {torch.get_num_threads()} threads", flush=True)

    # Each section in turn, its figures printed and saved as it ends.
    signal.signal(signal.SIGALRM, out_of_time)
    for name in opts.sections.split(","):
        results[name] = run_section(name, opts, device, check)
        print("\n".join(markdown(name, results[name])), flush=True)
        if out:
            save(results, out)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
