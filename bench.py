"""Throughput of PoorViTs on this machine: it prints figures and asserts nothing.

    python bench.py                      # or: make bench
    python bench.py --sections step --rounds 5
    python bench.py --sections concat    # keep or drop attention's weight-concatenation trick

Sections:
  step      train-step img/s (forward + backward + AdamW) per variant at the paper's config: fp32 on CPU, bf16 on GPU
  concat    the same train step with Attention.concat_input_linears on vs off (one matmul over the concatenated
            weights of every linear that reads x, or one per projection), per variant
  augment   img/s of the full training augmentation: the batched device pipeline vs torchvision's per-image PIL one
  pipeline  the training loop (device loader + augmentation + mixing + step) vs the bare step on a fixed batch; on a GPU
            also the projected time of the 100-epoch baseline (15 M samples) and the peak memory
Timings cover only the timed steps: warm-up (and compilation) is excluded, the device is synchronised around them.
"""
import argparse
import statistics
import time

import torch
from PIL import Image

import data
import train
from model import ViT, ViTConfig, count_parameters, forward_macs

VARIANTS = {"baseline": {}, "mla-q": {"latent": "q"}, "mla-qkv": {"latent": "qkv"}, "cls-4": {"num_cls": 4}}
CONCAT_VARIANTS = {"baseline": {}, "mla-q": {"latent": "q"}, "mla-qkv": {"latent": "qkv"},
                   "mla-kv shared": {"latent": "kv", "shared_kv_latent": True}}
RECIPE = dict(hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25)
BASELINE_SAMPLES = 100 * 3 * 50_000  # 100 epochs x 3 repeats x the CIFAR-10 training set


def get_args_parser():
    parser = argparse.ArgumentParser(description="PoorViTs throughput benchmarks.")
    parser.add_argument("--sections", default="step,augment,pipeline", type=str,
                        help="comma-separated sections: step, augment, pipeline, concat")
    parser.add_argument("--device", default=None, type=str, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", default=256, type=int, help="images per step (the recipe's global batch)")
    parser.add_argument("--steps", default=None, type=int, help="timed steps per round (default: 1 CPU, 50 GPU)")
    parser.add_argument("--warmup", default=None, type=int, help="untimed steps first (default: 2 CPU, 20 GPU)")
    parser.add_argument("--rounds", default=None, type=int,
                        help="rounds, variants interleaved; the median round counts (default: 24 CPU, 5 GPU)")
    parser.add_argument("--aug-images", default=4096, type=int, help="images per augmentation measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser


def machine(device):
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{train.device_name(device)}{threads}, torch {torch.__version__}"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, device, warmup=0):
    """Seconds per call of fn, over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def interleaved(fns, steps, warmup, rounds, device):
    """Seconds per call of each fn in each round: all warmed up first, then `rounds` rounds that time `steps` calls
    of each in turn, so that drift in the machine's speed hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, steps, device))
    return seconds


def make_trainer(overrides, device, compile_options=None, concat_input_linears=True):
    """A model with the paper's AdamW and schedule, and a step function train.py's loop would run; compile_options:
    torch.compile's keyword arguments (None: eager)."""
    cfg = ViTConfig(**overrides)
    model = ViT(cfg).to(device)
    for block in model.blocks:
        block.attn.concat_input_linears = concat_input_linears
    defaults = train.get_args_parser().parse_args([])
    optimizers = train.build_optimizers(defaults, model, device)
    schedulers = [train.build_scheduler(optimizer, defaults, steps_per_epoch=10_000) for optimizer in optimizers]
    compiled = model if compile_options is None else torch.compile(model, **compile_options)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(images, labels, mix):
        return train.train_step(compiled, optimizers, schedulers, images, labels, mix, autocast, 0.1)

    return cfg, model, step


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def random_batch(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def fixed_batch(batch_size, device):
    """The bare step's input: a normalised batch, its labels, and a mixer that leaves it unmixed."""
    images, labels = random_batch(batch_size, device)
    return data.normalize(images, *data.CIFAR10_STATS), labels, data.BatchMix(10, mixup_alpha=0.0, cutmix_alpha=0.0)


def time_steps(steps, opts, device):
    """Seconds per step of each step function on one fixed batch, per round of interleaved rounds."""
    images, labels, no_mix = fixed_batch(opts.batch_size, device)
    fns = {name: (lambda step=step: step(images, labels, no_mix)) for name, step in steps.items()}
    return interleaved(fns, opts.steps, opts.warmup, opts.rounds, device)


def speedup(rounds, reference, name):
    """How many times faster `name` ran than `reference`: the median of per-round ratios, each comparing steps timed
    moments apart."""
    return statistics.median(r / n for r, n in zip(rounds[reference], rounds[name]))


def bench_step(device, opts):
    print(f"\n(a) train step, batch {opts.batch_size}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
          f"median of {opts.rounds} interleaved rounds of {opts.steps} timed steps, after {opts.warmup} warm-up steps")
    compile_options = {} if opts.compile else None
    trainers = {name: make_trainer(overrides, device, compile_options) for name, overrides in VARIANTS.items()}
    rounds = time_steps({name: step for name, (_, _, step) in trainers.items()}, opts, device)
    print("| variant | params | forward GMAC/img | img/s | ms/step | vs baseline |\n|---|---|---|---|---|---|")
    for name, (cfg, model, _) in trainers.items():
        s = statistics.median(rounds[name])
        print(f"| {name} | {count_parameters(model):,} | {forward_macs(cfg) / 1e9:.3f} | {opts.batch_size / s:,.0f} "
              f"| {1000 * s:.1f} | {speedup(rounds, 'baseline', name):.3f}x |")


def bench_concat(device, opts):
    print(f"\n(d) Attention.concat_input_linears on vs off, train step, batch {opts.batch_size}, median of "
          f"{opts.rounds} interleaved rounds of {opts.steps} timed steps, after {opts.warmup} warm-up steps")
    steps = {(name, concat): make_trainer(overrides, device, concat_input_linears=concat)[2]
             for name, overrides in CONCAT_VARIANTS.items() for concat in (True, False)}
    rounds = time_steps(steps, opts, device)
    print("| variant | img/s concat on | img/s concat off | on / off |\n|---|---|---|---|")
    for name in CONCAT_VARIANTS:
        on, off = rounds[name, True], rounds[name, False]
        ratio = speedup(rounds, (name, False), (name, True))
        print(f"| {name} | {opts.batch_size / statistics.median(on):,.0f} "
              f"| {opts.batch_size / statistics.median(off):,.0f} | {ratio:.3f}x |")


def bench_augment(device, opts):
    print(f"\n(b) full training augmentation (flip, crop, AutoAugment, normalise, erasing, Mixup/CutMix), one process, "
          f"batches of {opts.batch_size}")
    n, batch = opts.aug_images, opts.batch_size
    images, labels = random_batch(n, device)
    mix = data.BatchMix(10)
    augment = data.BatchAugment(*data.CIFAR10_STATS, **RECIPE)
    generator = torch.Generator().manual_seed(0)

    def batched():
        out = augment(images, generator)
        for x, y in zip(out.split(batch), labels.split(batch)):
            mix(x, y)

    rows = []
    threads = torch.get_num_threads()
    rows.append((f"batched, on {device.type}" + (f", {threads} threads" if device.type == "cpu" else ""),
                 n / timed(batched, 3, device, warmup=1)))
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        rows.append(("batched, on cpu, 1 thread", n / timed(batched, 3, device, warmup=1)))
        torch.set_num_threads(threads)

    pil_images = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images[:1024]]
    cpu_labels = labels[:1024].cpu()
    transform = data.train_transform(*data.CIFAR10_STATS, **RECIPE, pil=True)

    def per_image():
        for start in range(0, len(pil_images), batch):
            x = torch.stack([transform(img) for img in pil_images[start:start + batch]])
            mix(x, cpu_labels[start:start + batch])

    torch.set_num_threads(1)  # PIL works on one core; a DataLoader worker runs one thread
    rows.append(("torchvision per-image PIL, 1 process", len(pil_images) / timed(per_image, 2, torch.device("cpu"))))
    torch.set_num_threads(threads)
    pil = rows[-1][1]
    print("| pipeline | img/s | vs per-image PIL |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / pil:.1f}x |")


def recipe_loader(images, labels, batch_size, device, chunk_images):
    """train.py's device loader over `images` with the full recipe's augmentation (3 repeats per epoch)."""
    sampler = data.RepeatedAugmentationSampler(len(images), batch_size, reps=3)
    return data.DeviceLoader(images, labels, sampler, data.BatchAugment(*data.CIFAR10_STATS, **RECIPE), device,
                             chunk_images=chunk_images)


def measure_pipeline(step, device, opts):
    """img/s of the training loop (device loader, augmentation, mixing, `step` of the baseline model from
    make_trainer) and of the bare step on a fixed batch, full recipe: the mean over rounds of whole augmentation
    chunks. On a GPU also the peak memory."""
    reset_peak_memory(device)
    # On the CPU a chunk of 4 batches keeps the run short; every round times whole chunks, augmentation included.
    chunk = 4096 if device.type == "cuda" else 4 * opts.batch_size
    loader = recipe_loader(*random_batch(10_000, device), opts.batch_size, device, chunk)
    sampler = loader.sampler
    mix = data.BatchMix(10)
    fixed_images, fixed_labels, no_mix = fixed_batch(opts.batch_size, device)
    batches = iter(())
    step_count = 0

    def loop_step():
        nonlocal batches, step_count
        batch = next(batches, None)
        if batch is None:
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            batch = next(batches)
        train.seed_step(0, 0, step_count)
        step_count += 1
        step(*batch, mix)

    per_round = loader.batches_per_chunk
    rounds = max(2, opts.rounds * opts.steps // per_round)
    rounds = interleaved({"bare": lambda: step(fixed_images, fixed_labels, no_mix), "loop": loop_step},
                         per_round, per_round, rounds, device)
    seconds = {name: statistics.mean(values) for name, values in rounds.items()}
    bare, loop = opts.batch_size / seconds["bare"], opts.batch_size / seconds["loop"]
    return {"bare_img_s": bare, "bare_ms": 1000 * seconds["bare"], "loop_img_s": loop,
            "loop_ms": 1000 * seconds["loop"], "loop_over_bare": loop / bare,
            "projected_baseline_s": BASELINE_SAMPLES / loop, "peak_memory_gib": peak_memory_gib(device)}


def bench_pipeline(device, opts):
    print(f"\n(c) training loop vs bare step, baseline model, batch {opts.batch_size}, full recipe; "
          f"mean over rounds of whole augmentation chunks")
    _, _, step = make_trainer({}, device, {} if opts.compile else None)
    figures = measure_pipeline(step, device, opts)
    print("| measurement | img/s | ms/step |\n|---|---|---|")
    print(f"| bare step (fixed batch, no mixing) | {figures['bare_img_s']:,.0f} | {figures['bare_ms']:.1f} |")
    print(f"| training loop (device loader, augmentation, mixing, step) | {figures['loop_img_s']:,.0f} "
          f"| {figures['loop_ms']:.1f} |")
    print(f"loop / bare = {figures['loop_over_bare']:.3f}")
    print(f"projected baseline (100 epochs x 150k samples, no evaluation): {figures['projected_baseline_s']:,.0f} s")
    if figures["peak_memory_gib"] is not None:
        print(f"peak GPU memory: {figures['peak_memory_gib']:.2f} GiB")


def main(opts):
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    opts.steps = opts.steps or (50 if gpu else 1)
    opts.warmup = opts.warmup if opts.warmup is not None else (20 if gpu else 2)
    opts.rounds = opts.rounds or (5 if gpu else 24)
    sections = {"step": bench_step, "augment": bench_augment, "pipeline": bench_pipeline, "concat": bench_concat}
    chosen = opts.sections.split(",")
    unknown = [s for s in chosen if s not in sections]
    if unknown:
        raise SystemExit(f"bench.py: error: --sections {','.join(unknown)}: choose from {', '.join(sections)}")
    print(f"machine: {machine(device)}")
    for name in chosen:
        sections[name](device, opts)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
