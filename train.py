r"""Train a PoorViT (arXiv 2501.06220) on CIFAR-10 and friends, on one process or many via torchrun.
Top to bottom: flags; building the run; a step, an epoch, evaluation; `main`, the recipe. Its files: run.py.
What follows is also `train.py -h`'s epilog:

examples:
  CPU quick start: a small ViT on the bundled offline digits, about a minute (what make demo runs):
    python train.py --device cpu --dataset digits --patch-size 8 --dim 96 --depth 4 --heads 4 --batch-size 64 \
      --lr 2e-3 --epochs 60 --warmup-epochs 3 --no-hflip --auto-augment none --random-erase 0 --mixup-alpha 0 \
      --cutmix-alpha 0 --ra-reps 1 --eval-every 10
  your own images on a CPU, my_data/train/<class>/* and my_data/val/<class>/* (make own-images DATA=my_data):
    python train.py --device cpu --dataset imagefolder --data-dir my_data --img-size 32 --patch-size 8 --dim 96 \
      --depth 4 --heads 4 --batch-size 32 --lr 2e-3 --epochs 50 --warmup-epochs 3 --auto-augment none \
      --random-erase 0 --mixup-alpha 0 --cutmix-alpha 0 --ra-reps 3 --eval-every 10
  the paper's baseline on a GPU (CIFAR-10 fetched into data/; make baseline):
    python train.py --download --amp --output-dir runs/baseline
  resume a stopped or crashed run: its command again, with --resume auto:
    python train.py --download --amp --output-dir runs/baseline --resume auto
  train a finished run longer: a new run that starts from its weights:
    python train.py --download --amp --epochs 200 --init-from runs/baseline/checkpoint.pt --output-dir runs/b200
  DDP on 4 GPUs (--batch-size is the global batch; make ddp-bs1024):
    torchrun --standalone --nproc_per_node=4 train.py --download --amp --batch-size 1024 --ra-mode in-batch
"""
import argparse
import contextlib
import itertools
import math
import os
import random
import sys
import time
from collections import namedtuple
from dataclasses import asdict, fields
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import data
import files
import run
from augment import BatchAugment, DeviceLoader
from lion import Lion
from model import CLS_POOLS, POS_EMBEDS, ViT, ViTConfig, count_parameters, forward_macs, transfer_weights

OPTIMIZERS = ("adamw", "lion", "muon")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
AMP_DTYPES = ("auto", "bf16", "fp16")
# Flags that may differ between a run and its --resume: where and how it runs, not what it computes.
RESUME_FREE_FLAGS = {"resume", "output_dir", "data_dir", "download", "device", "compile", "compile_mode", "log_every",
                     "stop_after_epochs", "save_every", "dist_timeout"}


# ---- flags
def number(kind, interval: str):
    """An argparse type: an int or float inside `interval`, written as in maths: "(0, inf)", "[0, 1)"."""
    low, high = (float(end) for end in interval[1:-1].split(","))

    def parse(text):
        value = kind(text)  # a ValueError is argparse's "invalid int value: 'x'"
        above = low < value if interval[0] == "(" else low <= value
        below = value < high if interval[-1] == ")" else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number(int, "(0, inf)")
COUNT = number(int, "[0, inf)")
POSITIVE = number(float, "(0, inf)")
NON_NEGATIVE = number(float, "[0, inf)")
PROBABILITY = number(float, "[0, 1]")
FRACTION = number(float, "[0, 1)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """-h with every flag's default, and the description and examples as written (not re-wrapped)."""


def get_args_parser():
    parser = run.Parser(prog="train.py", formatter_class=HelpFormatter, epilog=__doc__[__doc__.index("examples:"):],
                        description="Train a small ViT (PoorViTs). Defaults: the paper's baseline.\nWhere the seed's "
                        "code admits other readings (depth, RA mode, precision, Lion's lr): docs/faithfulness.md.")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (unset: cuda on a CUDA build, which must then start)")
    add = parser.add_argument_group("data").add_argument
    add("--dataset", default="cifar10", choices=data.DATASETS, help="digits: offline; synthetic: for speed checks")
    add("--data-dir", default="data", help="dataset root (CIFAR: its folder's parent; imagefolder: train/, val/)")
    add("--download", action="store_true", help="fetch the dataset into --data-dir if missing (md5-checked)")
    add("--img-size", type=POSITIVE_INT, help="image side, pixels (unset: the dataset's own: docs/datasets.md)")

    add = parser.add_argument_group("augmentation (as the seed ran it)").add_argument
    add("--hflip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip")
    add("--crop-padding", default=4, type=COUNT, help="random crop of --img-size after zero padding (pixels)")
    add("--auto-augment", choices=data.AUTO_AUGMENT_POLICIES, help="AutoAugment policy per image (unset: dataset's)")
    add("--aa-fill", default=data.AA_FILL, type=number(int, "[0, 255]"), help="AutoAugment's grey where it shifts")
    add("--random-erase", default=0.25, type=PROBABILITY, help="random erasing probability per image")
    add("--mixup-alpha", default=1.0, type=NON_NEGATIVE, help="Mixup Beta(alpha, alpha); 0: no Mixup")
    add("--cutmix-alpha", default=1.0, type=NON_NEGATIVE, help="CutMix Beta(alpha, alpha); 0: no CutMix")
    add("--mix-prob", default=0.5, type=PROBABILITY, help="probability that a batch is mixed (CutMix or Mixup, 50/50)")
    add("--label-smoothing", default=0.1, type=FRACTION, help="label smoothing of the cross-entropy")
    add("--ra-reps", default=3, type=POSITIVE_INT, help="repeated augmentation: times each image is seen per epoch")
    add("--ra-mode", default="shuffles", choices=data.RA_MODES, help="in-batch: copies in a row (the seed's torchrun)")

    add = parser.add_argument_group("model (model.ViTConfig)").add_argument
    add("--patch-size", type=POSITIVE_INT, help="patch side, pixels (unset: the dataset's, 4; Tiny-ImageNet 8)")
    add("--dim", default=192, type=POSITIVE_INT, help="token width")
    add("--depth", default=9, type=POSITIVE_INT, help="blocks (the seed's code builds 12: docs/faithfulness.md)")
    add("--heads", default=12, type=POSITIVE_INT, help="attention heads (must divide --dim)")
    add("--mlp-ratio", default=2.0, type=POSITIVE, help="MLP hidden width / --dim")
    add("--num-cls", default=1, type=POSITIVE_INT, help="CLS tokens")
    add("--cls-pool", default="concat", choices=CLS_POOLS, help="how the CLS outputs reach the head")
    add("--pos-embed", default="learned", choices=POS_EMBEDS, help="position embedding")
    add("--latent", default="", help="low-rank attention projections, any of q, k, v, o (o: the output; e.g. kv)")
    add("--latent-dim", default=64, type=POSITIVE_INT, help="rank of the low-rank attention projections")
    add("--mlp-latent-dim", default=0, type=COUNT, help="rank of both MLP layers (down, no bias -> up); 0: full")
    add("--drop-path", default=0.1, type=FRACTION, help="stochastic depth rate of the last block")
    add("--whiten", action="store_true", help="whitening init of the patch embedding")
    add("--whiten-images", default=5000, type=POSITIVE_INT, help="--whiten's images: whole first batches, at least")
    add("--init-from", help="checkpoint.pt whose weights start this run, by truncated SVD where it is low-rank")

    add = parser.add_argument_group("optimisation").add_argument
    add("--opt", default="adamw", choices=OPTIMIZERS, help="muon: Muon for the blocks' matrices, AdamW the rest")
    add("--lr", default=1e-3, type=POSITIVE, help="peak learning rate (Lion: 3-10x smaller)")
    add("--muon-lr", default=0.02, type=POSITIVE, help="--opt muon: peak learning rate of Muon")
    add("--muon-momentum", default=0.9, type=FRACTION, help="--opt muon: Muon's Nesterov momentum")
    add("--weight-decay", default=0.05, type=NON_NEGATIVE, help="decoupled weight decay (Lion: 3-10x larger)")
    add("--batch-size", default=256, type=POSITIVE_INT, help="global batch (all processes together), images")
    add("--epochs", default=100, type=POSITIVE_INT, help="epochs (one epoch: --ra-reps passes over the data)")
    add("--warmup-epochs", type=NON_NEGATIVE, help="linear warm-up, epochs (unset: a tenth of --epochs)")
    add("--warmup-lr", default=1e-6, type=POSITIVE, help="learning rate at step 0")
    add("--min-lr", default=1e-6, type=NON_NEGATIVE, help="learning rate at the end of the cosine")
    add("--amp", action="store_true", help="autocast: bf16, else fp16 + scaler (the seed's main branch: fp32)")
    add("--amp-dtype", default="auto", choices=AMP_DTYPES, help="--amp's precision; auto: bf16 where supported")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (unset: on CUDA, eager if it fails)")
    add("--compile-mode", default="default", choices=COMPILE_MODES, help="reduce-overhead: CUDA graphs too")

    add = parser.add_argument_group("run").add_argument
    add("--eval-every", default=5, type=POSITIVE_INT, help="evaluate every N epochs, and after the last")
    add("--log-every", default=50, type=POSITIVE_INT, help="log training loss every N steps")
    add("--seed", default=0, type=int, help="base seed; every random draw derives from it")
    add("--same-seed-on-ranks", action="store_true", help="the same mixing and drop-path draws on every rank (seed's)")
    add("--tag", help="the table column this run belongs to (report.py groups runs by it)")
    add("--output-dir", help="where metrics, checkpoint and summary go (unset: runs/<dataset>-<time>)")
    add("--resume", help="checkpoint.pt to continue from; auto: the output dir's checkpoint if there is one")
    add("--save-every", default=0, type=COUNT, help="also checkpoint every N steps (a kill loses at most N steps)")
    add("--stop-after-epochs", type=POSITIVE_INT, help="end after N epochs, schedule unchanged; then --resume")
    add("--dist-timeout", default=30.0, type=POSITIVE, help="minutes a rank waits for the others (first compiles)")
    return parser


def model_config(args, num_classes, img_size) -> ViTConfig:
    """The model flags are ViTConfig's fields, named alike; the image size is the data's."""
    flags = {f.name for f in fields(ViTConfig)} & vars(args).keys() - {"img_size"}
    return ViTConfig(img_size=img_size, num_classes=num_classes, **{f: getattr(args, f) for f in flags})


def fill_dataset_defaults(args) -> dict:
    """Sets the flags left unset (None) to --dataset's defaults; returns those that are the dataset's own (not
    data.DEFAULTS), to be said and recorded."""
    own = data.DATASET_DEFAULTS.get(args.dataset, {})
    filled = {flag: value for flag, value in {**data.DEFAULTS, **own}.items() if getattr(args, flag) is None}
    for flag, value in filled.items():
        setattr(args, flag, value)
    return {flag: value for flag, value in filled.items() if flag in own and value is not None}


def check_args(args) -> dict:
    """What no single flag can check, before any work; fills in the dataset's defaults (returns its own, as
    fill_dataset_defaults) and --output-dir's default."""
    defaults = fill_dataset_defaults(args)
    if args.warmup_epochs is not None and args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} must not exceed --epochs {args.epochs}")
    if args.warmup_epochs != 0 and args.warmup_lr > args.lr:
        raise ValueError(f"--warmup-lr {args.warmup_lr} must not exceed --lr {args.lr}")
    if args.download and args.dataset not in data.ARCHIVES:
        raise ValueError(f"--download fetches {', '.join(data.ARCHIVES)}, not --dataset {args.dataset}")
    if args.whiten and args.init_from:
        raise ValueError("--whiten and --init-from both set the patch embedding: choose one")
    if args.output_dir is None:
        if args.resume == "auto":
            raise ValueError("--resume auto needs --output-dir (the run to continue)")
        fresh = f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
        args.output_dir = str(Path(args.resume).parent) if args.resume else fresh
    # An image folder's own size is known once its files are read: until then one patch stands in for it.
    model_config(args, num_classes=1, img_size=args.img_size or args.patch_size)
    return defaults


# ---- building the run
def compiles(args, device) -> bool:
    """Unset --compile: on CUDA, where an eager step is mostly launches; not on a CPU, where compiling costs more."""
    return device.type == "cuda" if args.compile is None else args.compile


def setup_distributed(args) -> run.Ranks:
    """This process's rank, the world size and the device; a single process without torchrun. NCCL connects the
    processes on CUDA, gloo on the CPU."""
    device = run.device_of(args.device)
    if not compiles(args, device) and args.compile_mode != "default":
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compile (unset: on CUDA only)")
    if "WORLD_SIZE" not in os.environ:
        return run.Ranks(0, 1, device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=args.dist_timeout),
                            device_id=device if device.type == "cuda" else None)
    return run.Ranks(rank, world_size, device)


def memory_bytes(device) -> int:
    """The device's memory: a GPU's, or the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_data(args, ranks, defaults):
    """Fetches the dataset where --download asks for it, then loads it at --img-size, rank 0 first: an error that
    every rank would meet is said once. The first process of each other node fetches next (on a shared filesystem it
    finds the files, md5-checked), so that each folder is fetched once. The uint8 images may fill half the device.
    Then says which flags took the dataset's defaults."""
    if args.download:
        ranks.rank0_only(data.download, args.dataset, args.data_dir)
        if ranks.world_size > 1:
            if ranks.rank != 0 and int(os.environ["LOCAL_RANK"]) == 0:
                data.download(args.dataset, args.data_dir)
            dist.barrier()
    try:
        dataset = ranks.rank0_first(data.load_dataset, args.dataset, args.data_dir, args.img_size,
                                    memory_bytes(ranks.device) // 2)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: pass --download to fetch it, or --data-dir the folder that holds it") from None
    if defaults:
        run.note(f"--dataset {args.dataset}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in defaults.items()))
    return dataset


def build_loader(args, dataset, ranks):
    """This rank's training batches, augmented per image on its device (`loader.sampler` fixes the epoch's order)."""
    sampler = data.RepeatedAugmentationSampler(len(dataset.train_images), args.batch_size, args.ra_reps, ranks.rank,
                                               ranks.world_size, args.seed, args.ra_mode)
    augment = BatchAugment(dataset.mean, dataset.std, args.hflip, args.crop_padding, args.auto_augment,
                           args.random_erase, args.aa_fill, dataset.train_images.shape[-1])
    return DeviceLoader(dataset.train_images, dataset.train_labels, sampler, augment, ranks.device)


def build_model(args, dataset, device, source):
    """The flags' ViT. It takes every weight from `source` (--init-from), or has its patch embedding whitened on
    what the seed's was whitened on: the first --whiten-images images of epoch 0 of a single process's stream,
    augmented as they are trained on, before batch mixing."""
    model = ViT(model_config(args, len(dataset.classes), dataset.train_images.shape[-1]))
    if args.whiten:
        loader = build_loader(args, dataset, run.Ranks(0, 1, device))
        batches = itertools.islice(loader, math.ceil(args.whiten_images / loader.batch))
        model.whiten_patch_embedding(torch.cat([images for images, _ in batches]))
    if source is not None:
        try:
            transfer_weights(source, model)
        except ValueError as e:
            raise ValueError(f"--init-from {args.init_from}: {e}") from None
    return model


def build_optimizers(args, model, device):
    """The optimizers of --opt, each stepped every iteration: one, or [AdamW, Muon]."""
    if args.opt == "lion":
        return [Lion(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)]
    fused = device.type == "cuda"
    if args.opt == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  fused=fused)]
    # Muon takes the blocks' 2-D weights, as the seed's: Nesterov, 6 Newton-Schulz steps, no weight decay; AdamW
    # (betas 0.95, 0.95) the embeddings, head and vectors.
    matrices = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2]
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return [torch.optim.AdamW(rest, lr=args.lr, betas=(0.95, 0.95), weight_decay=args.weight_decay, fused=fused),
            torch.optim.Muon(matrices, lr=args.muon_lr, momentum=args.muon_momentum, nesterov=True, ns_steps=6,
                             weight_decay=0.0)]


def build_scheduler(optimizer, args, steps_per_epoch):
    """Linear warm-up from --warmup-lr, then cosine to --min-lr at the last step; stepped every iteration. An
    optimizer whose peak is not --lr (Muon's) follows the same curve scaled to its own peak."""
    total = args.epochs * steps_per_epoch
    warmup_epochs = args.epochs / 10 if args.warmup_epochs is None else args.warmup_epochs
    warmup = round(warmup_epochs * steps_per_epoch)
    peak = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=args.min_lr * peak / args.lr)
    if warmup == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=args.warmup_lr / args.lr, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


# What a step computes in: `name` fp32, bf16 or fp16, the autocast, and its loss scaler (fp16 only).
Precision = namedtuple("Precision", "name autocast scaler")


def build_precision(args, device) -> Precision:
    """fp32 without --amp. With it, bf16 autocast where the device has bf16 natively (not a V100, T4 or RTX 20xx),
    else fp16 autocast with a gradient scaler; --amp-dtype forces one of them."""
    name = "fp32"
    if args.amp and args.amp_dtype != "auto":
        name = args.amp_dtype
    elif args.amp:
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
        name = "bf16" if bf16 else "fp16"
    if args.amp:
        scaler = " with a gradient scaler" if name == "fp16" else ""
        run.note(f"--amp: {name} autocast{scaler}")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, torch.autocast(device.type, dtype=dtype, enabled=args.amp),
                     torch.amp.GradScaler(device.type, enabled=name == "fp16"))


def compile_model(model, args, device, precision, batch):
    """torch.compile'd `model` (see `compiles`), its graphs built now by forward and backward passes on zeros, which
    change no weight. Where that fails, one line says so and training goes on eager, unless a flag asked for it
    (--compile, or a --compile-mode other than the default): then it is an error."""
    if not compiles(args, device):
        return model
    size = model.cfg.img_size
    zeros = torch.zeros(batch, 3, size, size, device=device)
    try:
        compiled = torch.compile(model, mode=args.compile_mode)
        # Three passes, as train_step makes them: CUDA graphs (reduce-overhead) warm up, record at the second and
        # replay at the third, so that a capture that fails fails here.
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            with precision.autocast:
                compiled(zeros).float().sum().backward()
    except Exception as e:  # no Triton, a GPU too old for it, a compiler bug, a capture: their own exception types
        asked = "--compile" if args.compile else f"--compile-mode {args.compile_mode}"
        if args.compile or args.compile_mode != "default":
            raise ValueError(f"{asked}: torch.compile failed ({run.first_line(e)}); --no-compile trains eager")
        run.note(f"torch.compile failed ({run.first_line(e)}): training eager (--no-compile skips the attempt)")
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
    return compiled


# ---- training
def seed_step(seed, rank, step, device) -> random.Random:
    """Seeds the random draws of step `step` on `rank` from (seed, rank, step), so that a resumed run draws what an
    uninterrupted one does. Stochastic depth draws from the device's generator, which is seeded here alone
    (torch.manual_seed would seed every CUDA device, 0.27 ms a step); batch mixing draws from the returned host
    generator."""
    step_seed = data.derive_seed(seed, "step", rank, step)
    generator = torch.cuda.default_generators[device.index] if device.type == "cuda" else torch.default_generator
    generator.manual_seed(step_seed)
    return random.Random(step_seed)


def train_step(model, optimizers, schedulers, images, targets, precision, label_smoothing):
    """One forward, backward, update and scheduler step; returns the loss on the device (no sync)."""
    # The last step's gradients go first: under CUDA graphs they live in the graphs' memory, which the forward reuses.
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    with precision.autocast:
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
    precision.scaler.scale(loss).backward()
    for optimizer, scheduler in zip(optimizers, schedulers):
        precision.scaler.step(optimizer)
        scheduler.step()
    precision.scaler.update()
    return loss.detach()


def train_one_epoch(model, optimizers, schedulers, loader, mix, epoch, precision, session):
    """One epoch, from loader.sampler's start step. Returns True if a stop signal ended it early (after a
    checkpoint)."""
    args = session.args
    state = session.state
    # The seed's code drew the same mixing and drop-path decisions on every rank (--same-seed-on-ranks).
    rank = 0 if args.same_seed_on_ranks else session.ranks.rank
    model.train()
    state.start_interval()
    for images, labels in loader:
        rng = seed_step(args.seed, rank, state.step, session.ranks.device)
        images, targets = mix(images, labels, rng)
        state.add(train_step(model, optimizers, schedulers, images, targets, precision, args.label_smoothing))

        end_of_epoch = state.step % loader.sampler.steps_per_epoch == 0
        log_now = end_of_epoch or state.step % args.log_every == 0
        save_now = args.save_every and state.step % args.save_every == 0
        # The only host-device syncs: at log points, at saves, and once a stop is asked for.
        if log_now or save_now or session.stop_asked():
            session.agree_on_stop_and_losses(epoch)
        if log_now:
            session.log_train(epoch, optimizers[0].param_groups[0]["lr"])
        # The end of an epoch saves after its evaluation (train_epochs).
        if not end_of_epoch and (save_now or session.stopped):
            session.save()
            if session.stopped:
                return True
    return False


# The test set on the training device as uint8 (evaluation copies nothing per chunk), and its normalisation.
TestSet = namedtuple("TestSet", "images labels normalize")


@torch.no_grad()
def evaluate(model, test_set: TestSet, ranks: run.Ranks, autocast):
    """Top-1 accuracy (%) and mean cross-entropy on the test set, computed on the device, where rank r takes every
    world_size-th image; the counts are read once. `model` is the uncompiled module, so that evaluation adds no graph
    to a compiled one."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ranks.device)  # correct, loss sum, count
    shard = slice(ranks.rank, None, ranks.world_size)
    images = test_set.images[shard].split(data.EVAL_CHUNK)
    labels = test_set.labels[shard].split(data.EVAL_CHUNK)
    for x, y in zip(images, labels):
        with autocast:
            logits = model(test_set.normalize(x))
        totals[0] += (logits.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[2] += len(y)
    if ranks.world_size > 1:
        dist.all_reduce(totals)
    correct, loss_sum, count = totals.tolist()
    return 100 * correct / count, loss_sum / count


def train_epochs(model, model_without_ddp, optimizers, schedulers, loader, mix, test_set, precision, session):
    """Trains from the run's step to --epochs (or --stop-after-epochs more), evaluating every --eval-every epochs and
    after the last, and saving after each epoch. Returns the failure that ended it early, as the user should read
    it, or None."""
    args = session.args
    start_epoch, start_step = divmod(session.state.step, loader.sampler.steps_per_epoch)
    end_epoch = min(args.epochs, start_epoch + (args.stop_after_epochs or args.epochs))
    try:
        for epoch in range(start_epoch, end_epoch):
            loader.sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
            if train_one_epoch(model, optimizers, schedulers, loader, mix, epoch, precision, session):
                break
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                acc, loss = evaluate(model_without_ddp, test_set, session.ranks, precision.autocast)
                session.log_eval(epoch, acc, loss)
            session.save()
            if session.stopped:
                break
        session.writer.join()
    except (run.NonFiniteLoss, files.DiskFull, torch.OutOfMemoryError, run.FailedOnRank0) as e:
        return session.explain(e)
    return None


def restore(ckpt, model, optimizers, schedulers, scaler, state):
    model.load_state_dict(ckpt["model"])
    # Each optimizer and its scheduler, in the order the checkpoint lists them.
    for part, saved in zip([*optimizers, *schedulers], [*ckpt["optimizers"], *ckpt["schedulers"]], strict=True):
        part.load_state_dict(saved)
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state.load(ckpt)


def main(args):
    """The recipe: processes -> output folder -> data -> model -> optimizers -> compile -> DDP -> resume -> epochs ->
    summary. What the run holds (its folder's lock, a checkpoint write, the process group) is released however it
    ends."""
    start = time.perf_counter()
    try:
        defaults = check_args(args)
        ranks = setup_distributed(args)
    except ValueError as e:  # every rank meets these alike: rank 0 says them
        raise e if run.launched_as_rank0() else run.FailedOnRank0(run.exit_code(e)) from None
    device = ranks.device
    with contextlib.ExitStack() as on_exit:
        if ranks.world_size > 1:
            on_exit.callback(ranks.close)

        # Only rank 0 reads the checkpoint to continue (every rank gets it) and writes the run's files.
        ckpt = ranks.rank0_result(run.read_resume, args, RESUME_FREE_FLAGS)
        # A fresh run may start from another run's weights, read before any work; a resumed one has its own.
        source = None
        if args.init_from and ckpt is None:
            source, _ = ranks.rank0_first(run.load_model, args.init_from, "--init-from")
        ranks.rank0_only(run.claim_output_dir, args, on_exit)
        torch.manual_seed(data.derive_seed(args.seed, "init"))

        # The data: like the training set, the test set lives on the device as uint8.
        dataset = load_data(args, ranks, defaults)
        loader = ranks.rank0_first(build_loader, args, dataset, ranks)
        mix = data.BatchMix(len(dataset.classes), args.mixup_alpha, args.cutmix_alpha, args.mix_prob)
        test_set = TestSet(dataset.test_images.to(device), dataset.test_labels.to(device),
                           data.Normalize(dataset.mean, dataset.std))

        # The model and how it trains.
        model = ranks.rank0_first(build_model, args, dataset, device, source)
        model_without_ddp = model.to(device)
        optimizers = build_optimizers(args, model, device)
        steps_per_epoch = loader.sampler.steps_per_epoch
        schedulers = [build_scheduler(optimizer, args, steps_per_epoch) for optimizer in optimizers]
        precision = build_precision(args, device)
        model = compile_model(model, args, device, precision, loader.batch)
        compiled = model is not model_without_ddp
        if ranks.world_size > 1:
            # DDP also broadcasts rank 0's initial weights, so every rank starts (and whitens) identically.
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        # Where a checkpoint is continued, everything it holds.
        state = run.TrainingState(device, args.log_every)
        resumed = ckpt is not None
        if resumed:
            restore(ckpt, model_without_ddp, optimizers, schedulers, precision.scaler, state)
        del ckpt  # its tensors now live in the model and the optimizers

        # What the run is (its first record and its summary), and what its checkpoint holds.
        cfg = asdict(model_without_ddp.cfg)
        info = run.run_info(device)
        facts = dict(params=count_parameters(model_without_ddp), forward_macs=forward_macs(model_without_ddp.cfg),
                     world_size=ranks.world_size, dataset=args.dataset, defaults=defaults, epochs=args.epochs,
                     classes=dataset.classes,
                     images={"train": len(dataset.train_labels), dataset.test_split: len(dataset.test_labels)},
                     steps_per_epoch=steps_per_epoch, total_steps=args.epochs * steps_per_epoch,
                     precision=precision.name, compiled=compiled, config=cfg, args=vars(args), **info)

        def content():  # all a resume needs, and what predict.py needs to use the model
            return {"model": model_without_ddp.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                    "schedulers": [s.state_dict() for s in schedulers], "scaler": precision.scaler.state_dict(),
                    **state.checkpoint(), "args": vars(args), "config": cfg, "run": info,
                    "data": {"classes": dataset.classes, "mean": dataset.mean, "std": dataset.std}}

        session = run.Session(args, ranks, state, content, facts, on_exit, resumed)
        failure = train_epochs(model, model_without_ddp, optimizers, schedulers, loader, mix, test_set, precision,
                               session)
        return session.finish(failure, time.perf_counter() - start)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        summary = main(args)
    except run.FailedOnRank0 as e:
        sys.exit(e.exit_code)  # rank 0 says why
    except tuple(run.EXIT_CODES) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(run.exit_code(e))
    if summary["stopped_by_signal"]:
        sys.exit(128 + summary["stopped_by_signal"])  # the shell's convention for a process ended by a signal


if __name__ == "__main__":
    cli()
