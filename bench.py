"""Speed of PoorViTs on this machine, in sections that print Markdown tables and assert nothing (docs/performance.md).

    python bench.py --device cpu                 # step, augment, pipeline: the CPU figures
    python bench.py --gpu-check                  # every section, time-boxed, for a GPU machine (make gpu-check)
    python bench.py --gpu-check --device cpu --smoke --output-dir /tmp/check   # every section, tiny (the tests)
"""
import argparse
import itertools
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import augment
import data
import run
import train
from model import ViT, ViTConfig, count_parameters, forward_macs

ROOT = Path(__file__).resolve().parent
VARIANTS = {"baseline": {}, "mla-q": {"latent": "q"}, "mla-qkv": {"latent": "qkv"}, "cls-4": {"num_cls": 4}}
RECIPE = dict(hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25)
BASELINE_SAMPLES = 100 * 3 * 50_000  # 100 epochs x 3 repeats x the CIFAR-10 training set
GPU_CHECK = "step,precision,sdpa,compile,sync,pipeline,augment,train"
# --smoke: sizes for a CPU test of every section; aot_eager builds the graphs without Inductor's C++ build.
SMOKE = dict(batch_size=8, compile_batches="8,4", steps=1, warmup=1, rounds=1, compile_backend="aot_eager",
             train_args="--dataset digits --dim 32 --depth 2 --heads 4 --patch-size 8 --ra-reps 1 --log-every 50")


def get_args_parser():
    parser = argparse.ArgumentParser(description="PoorViTs speed benchmarks.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--sections", default="step,augment,pipeline", help=f"comma-separated, from {GPU_CHECK}")
    add("--gpu-check", action="store_true", help="every section, into --output-dir (unset: runs/gpu-check)")
    add("--smoke", action="store_true", help="tiny sizes, aot_eager compiling: every section in seconds on a CPU")
    add("--device", help="cuda or cpu (unset: cuda on a CUDA build of torch, which must then start; else cpu)")
    add("--batch-size", default=256, type=int, help="images per step (the recipe's global batch)")
    add("--compile-batches", default="256,64", help="per-rank batches (ddp-bs1024, ddp-bs256 on 4 processes)")
    add("--steps", type=int, help="timed steps per round (unset: 50 on CUDA, 1 on CPU)")
    add("--warmup", type=int, help="untimed steps first (unset: 20 on CUDA, 2 on CPU)")
    add("--rounds", type=int, help="interleaved rounds; the median counts (unset: 5 on CUDA, 24 on CPU)")
    add("--compile-mode", default="default", choices=train.COMPILE_MODES, help="of the train section's run")
    add("--compile-backend", default="inductor", help="aot_eager: graphs without code generation (Dynamo alone)")
    add("--compile-budget", default=200.0, type=float, help="seconds of compiling in the compile section")
    add("--time-limit", default=450.0, type=float, help="seconds for all sections: train gets what is left")
    add("--train-args", default="", help="extra train.py flags for the train section")
    add("--output-dir", help="where bench.md, bench.json and the train section's run go")
    return parser


# ---- timing
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, device, warmup=0, host=None):
    """Seconds per call of fn over `steps` calls after `warmup`; appends to `host` this thread's CPU seconds per call
    up to the device's last step (on a GPU, running behind, the host's own work)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        fn()
    if host is not None:
        host.append((time.thread_time() - cpu) / steps)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def interleaved(fns, opts, device):
    """Seconds (and host seconds) per call of each fn per round, the fns timed in turn: drift hits all alike."""
    for fn in fns.values():
        for _ in range(opts.warmup):
            fn()
    seconds, host = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(opts.rounds):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, opts.steps, device, host=host[name]))
    return seconds, host


def speed_rows(rounds, batch_size, reference):
    """img/s, ms/step, host ms/step (medians); times faster than `reference` (median of per-round ratios)."""
    seconds, host = rounds
    rows = []
    for name, s in seconds.items():
        ratio = statistics.median(r / n for r, n in zip(seconds[reference], s))
        rows.append({"": name, "img/s": batch_size / statistics.median(s), "ms/step": 1000 * statistics.median(s),
                     "host ms/step": 1000 * statistics.median(host[name]), f"vs {reference}": ratio})
    return rows


def random_batch(n, device, normalised=False):
    """n random images (uint8, or normalised) and their labels (or, normalised, one-hot targets) on `device`."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    if normalised:
        return data.Normalize(*data.CIFAR10_STATS)(images), F.one_hot(labels, 10).float()
    return images, labels


def make_step(overrides, device, precision=None, compile_options=None):
    """train.py's step of a fresh paper model with `overrides`, in `precision` (unset: bf16 on CUDA, else fp32),
    compiled with `compile_options` (None: eager)."""
    model = ViT(ViTConfig(**overrides)).to(device)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    args = train.get_args_parser().parse_args([] if precision == "fp32" else ["--amp", "--amp-dtype", precision])
    optimizers = train.build_optimizers(args, model, device)
    schedulers = [train.build_scheduler(optimizer, args, steps_per_epoch=10_000) for optimizer in optimizers]
    compiled = model if compile_options is None else torch.compile(model, **compile_options)
    amp = train.build_precision(args, device)
    return model, lambda images, targets: train.train_step(compiled, optimizers, schedulers, images, targets, amp, 0.1)


def time_steps(steps, opts, device, batch_size=None):
    """The speed of each step function on one fixed batch, in interleaved rounds, against the first."""
    batch_size = batch_size or opts.batch_size
    images, targets = random_batch(batch_size, device, normalised=True)
    fns = {name: (lambda step=step: step(images, targets)) for name, step in steps.items()}
    return speed_rows(interleaved(fns, opts, device), batch_size, next(iter(steps))) if steps else []


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

    mix, batches = data.BatchMix(10), enumerate(epochs())

    def one():
        i, batch = next(batches)
        step(*mix(*batch, train.seed_step(0, 0, i, device)))
    return one


# ---- the sections: each returns its figures, {"rows": [...], ...}
def bench_step(opts, device, check):
    models = {name: make_step(overrides, device) for name, overrides in VARIANTS.items()}
    rows = time_steps({name: step for name, (_, step) in models.items()}, opts, device)
    for row, (model, _) in zip(rows, models.values()):
        row.update(params=count_parameters(model), fwd_gmac=forward_macs(model.cfg) / 1e9)
    return {"batch_size": opts.batch_size, "precision": "bf16" if device.type == "cuda" else "fp32", "rows": rows}


def bench_precision(opts, device, check):
    steps = {name: make_step({}, device, name)[1] for name in ("fp32", "bf16", "fp16")}
    return {"batch_size": opts.batch_size, "rows": time_steps(steps, opts, device)}


def bench_sdpa(opts, device, check):
    _, step = make_step({}, device)
    images, targets = random_batch(opts.batch_size, device, normalised=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(images, targets)
    ran = sorted({e.name for e in profile.events() if e.name.startswith("aten::_scaled_dot_product")})
    steps, unavailable = {}, {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        def under(images, targets, backend=backend):
            with sdpa_kernel(backend):
                step(images, targets)
        try:
            under(images, targets)
            steps[backend.name] = under
        except RuntimeError as e:  # "No available kernel": not on this device, dtype or head dim
            unavailable[backend.name] = run.first_line(e)[:200]
    rows = time_steps(steps, opts, device)
    return {"kernels_that_ran": ran, "head_dim": 16, "rows": rows, "unavailable": unavailable}


def bench_compile(opts, device, check):
    """The baseline step at each batch: eager, then compiled in each mode while --compile-budget lasts (a compile's
    time: its first step, forward and backward graphs). A recompile during the timed steps is an error."""
    modes = {"eager": None, "compiled": "default"}
    modes |= {"reduce-overhead": "reduce-overhead"} if device.type == "cuda" else {}  # CUDA graphs
    torch._dynamo.reset()
    counters.clear()
    rows, errors, budget = [], [], opts.compile_budget
    for batch in map(int, opts.compile_batches.split(",")):
        steps, seconds, images, targets = {}, {}, *random_batch(batch, device, normalised=True)
        for name, mode in modes.items():
            if mode and budget < max(seconds.values(), default=0):
                continue
            start, options = time.perf_counter(), mode and {"mode": mode, "backend": opts.compile_backend}
            try:
                _, step = make_step({}, device, compile_options=options)
                step(images, targets)
                synchronize(device)
            except Exception:  # the other figures still count; the error is the finding
                errors.append(f"batch {batch}, {name}: {tail(traceback.format_exc())}")
                continue
            steps[name], seconds[name] = step, time.perf_counter() - start
            budget -= seconds[name] if mode else 0
        graphs = counters["stats"]["unique_graphs"]
        rows += [{"batch": batch, **row, "compile s": seconds[row[""]] if row[""] != "eager" else None}
                 for row in time_steps(steps, opts, device, batch)]
        if counters["stats"]["unique_graphs"] > graphs:
            errors.append(f"batch {batch}: the timed steps added Dynamo graphs (a recompile)")
        if batch == opts.batch_size:  # for the sync and pipeline sections
            check.baseline = steps.get("compiled") or steps.get("eager")
    return {"backend": opts.compile_backend, "rows": rows, "errors": errors,
            "dynamo_graphs": counters["stats"]["unique_graphs"]}


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
    state, step = run.TrainingState(device, 50), check.baseline or make_step({}, device)[1]
    checks = {"training step: seeding, mixing, step, loss bookkeeping":
              loop_step(loader, lambda *batch: state.add(step(*batch)), device),
              "device loader, one augmentation chunk": lambda: next(iter(loader))}
    rows = []
    for name, fn in checks.items():
        timed(fn, 1, device, warmup=2)  # warm-up: allocator, cuBLAS handles, compilation
        rows.append({"": name, "under set_sync_debug_mode('error')": first_sync(fn)})
        synchronize(device)
    return {"rows": rows}


def bench_pipeline(opts, device, check):
    """The training loop against the bare step, whole augmentation chunks per round (means); on a GPU with the
    compile section's compiled baseline when it ran."""
    step = check.baseline or make_step({}, device)[1]
    chunk = 4096 if device.type == "cuda" else 4 * opts.batch_size  # 4 batches a chunk keeps a CPU run short
    loader = recipe_loader(10_000, opts, device, chunk)
    images, targets = random_batch(opts.batch_size, device, normalised=True)
    per_chunk = loader.batches_per_chunk
    rounds = argparse.Namespace(warmup=per_chunk, steps=per_chunk, rounds=max(2, opts.rounds * opts.steps // per_chunk))
    bare, loop = "bare step (fixed batch, no mixing)", "training loop (loader, augmentation, mixing, step)"
    rounds = interleaved({bare: lambda: step(images, targets), loop: loop_step(loader, step, device)}, rounds, device)
    rows = speed_rows([{name: [statistics.mean(s)] for name, s in r.items()} for r in rounds], opts.batch_size, bare)
    return {"rows": rows, "loop_over_bare": rows[1]["img/s"] / rows[0]["img/s"],
            "projected_baseline_s": BASELINE_SAMPLES / rows[1]["img/s"]}


def bench_augment(opts, device, check):
    images, labels = random_batch(16 * opts.batch_size, device)
    mix, rng, batch = data.BatchMix(10), train.seed_step(0, 0, 0, device), opts.batch_size
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

    rows = [{"": f"batched, on {device.type}", "img/s": len(images) / timed(batched, 3, device, warmup=1)}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows.append({"": "torchvision per-image PIL, 1 process", "img/s": len(pil_images) / timed(per_image, 2, device)})
    torch.set_num_threads(threads)
    return {"threads": threads, "rows": [{**row, "vs per-image": row["img/s"] / rows[-1]["img/s"]} for row in rows]}


def tail(text, lines=15):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def bench_train(opts, device, check):
    out = (check.out or Path("runs/bench")).resolve() / "train-run"
    shutil.rmtree(out, ignore_errors=True)  # train.py never overwrites a run: a check run again replaces its own
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthetic", "--epochs", "1", "--warmup-epochs", "1",
           "--batch-size", str(opts.batch_size), "--amp", "--device", str(device), "--output-dir", str(out),
           "--compile-mode", opts.compile_mode, *["--compile"] * (opts.compile_mode != "default"),
           *shlex.split(opts.train_args)]
    figures = {"command": shlex.join(cmd), "rows": []}
    try:
        timeout = max(60, check.end - time.time())
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        figures["returncode"] = result.returncode
        if result.returncode:
            figures["error"] = tail(result.stderr)
    except subprocess.TimeoutExpired as e:
        figures["error"] = f"timed out after {e.timeout:.0f} s: {tail(e.stderr)}"
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        figures["rows"] = [{key: summary[key] for key in ("complete", "steps", "img_per_s", "ms_per_step",
                                                          "train_seconds", "total_seconds", "precision", "compiled")}]
        # At this speed, the 100-epoch baseline's steps (evaluation and saving excluded).
        figures["projected_baseline_s"] = summary["img_per_s"] and BASELINE_SAMPLES / summary["img_per_s"]
    return figures


SECTIONS = {"step": bench_step, "precision": bench_precision, "sdpa": bench_sdpa,
            "compile": bench_compile, "sync": bench_sync, "pipeline": bench_pipeline, "augment": bench_augment,
            "train": bench_train}


# ---- Markdown and the files
def cell(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "—" if value is None else str(value).replace("|", "\\|")


def markdown(name, result):
    lines = ["", f"## {name} ({result['seconds']:.0f} s)", ""]
    header = list(dict.fromkeys(key for row in result.get("rows", []) for key in row))
    if header:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(row.get(key)) for key in header) + " |" for row in result["rows"]]
    lines += [f"- {key}: {cell(value)}" for key, value in result.items() if key not in ("rows", "seconds", "error")]
    return lines + (["", "**failed**:", "", "```", result["error"], "```"] if result.get("error") else [])


def main(opts):
    if opts.gpu_check:
        opts.sections, opts.output_dir = GPU_CHECK, opts.output_dir or "runs/gpu-check"
    for key, value in (SMOKE if opts.smoke else {}).items():
        setattr(opts, key, value)
    unknown = [s for s in opts.sections.split(",") if s not in SECTIONS]
    try:
        if unknown:
            raise ValueError(f"--sections {','.join(unknown)}: choose from {', '.join(SECTIONS)}")
        device = run.device_of(opts.device)
    except ValueError as e:  # one line, exit 2, as every script's bad input
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    gpu = device.type == "cuda"
    opts.steps, opts.rounds = opts.steps or (50 if gpu else 1), opts.rounds or (5 if gpu else 24)
    opts.warmup = (20 if gpu else 2) if opts.warmup is None else opts.warmup
    # What the sections share: the compile section's baseline step (for sync and pipeline), the output, the clock.
    out = Path(opts.output_dir) if opts.output_dir else None
    check = argparse.Namespace(baseline=None, out=out, end=time.time() + opts.time_limit)
    results = {"machine": {**run.run_info(device), "threads": torch.get_num_threads()}, "options": vars(opts)}
    print(f"machine: {results['machine']['device_name']}, {torch.get_num_threads()} threads", flush=True)
    for name in opts.sections.split(","):
        start = time.time()
        try:
            results[name] = SECTIONS[name](opts, device, check)
        except Exception:  # a failing section is a finding: record it and go on
            results[name] = {"error": tail(traceback.format_exc(), 25)}
        results[name]["seconds"] = time.time() - start
        print("\n".join(markdown(name, results[name])), flush=True)
        if out:
            lines = ["# PoorViTs bench", "", f"{results['machine']['device_name']}, torch {torch.__version__}, "
                     f"commit {results['machine']['git_commit']}, {time.strftime('%Y-%m-%d %H:%M')}"]
            lines += [line for section in SECTIONS if section in results
                      for line in markdown(section, results[section])]
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.md").write_text("\n".join(lines) + "\n")
            (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
