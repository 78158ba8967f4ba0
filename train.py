"""Train a PoorViT (arXiv 2501.06220) on CIFAR-10 and friends, on one process or many via torchrun.

    python train.py --download --output-dir runs/baseline                  # the paper's baseline, 1 process
    torchrun --standalone --nproc_per_node=4 train.py --batch-size 1024 ...  # DDP; --batch-size is global
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 train.py ...  # 2 nodes

Top to bottom: the flags; building the run; a training step, an epoch, the evaluation; the run's files and failures;
`main`, the recipe. In --output-dir: metrics.jsonl (a JSON record per log point and evaluation), checkpoint.pt (each
epoch, written atomically in the background), summary.json (at every end); .lock keeps a second process out.
"""
import argparse
import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import einops
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from tqdm import tqdm

import data
from lion import Lion
from model import CLS_POOLS, PATCH_INITS, POS_EMBEDS, ViT, ViTConfig, count_parameters, forward_macs, transfer_weights

EVAL_CHUNK = 1024
OPTIMIZERS = ("adamw", "lion", "muon")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Flags that may differ between a run and its --resume: where and how it runs, not what it computes.
RESUME_FREE_FLAGS = {"resume", "output_dir", "data_dir", "download", "device", "compile", "compile_mode", "log_every",
                     "stop_after_epochs", "save_every"}


# ---- what can go wrong: each cause a job scheduler can act on has its exit code (README, "Reliability")
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops without saving, the last good checkpoint stays."""


class DiskFull(OSError):
    """No space left on the device for one of the run's files."""


class OutputDirInUse(RuntimeError):
    """Another process is running in the output dir."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory during training."""


class FailedOnRank0(Exception):
    """This rank's view of a failure that rank 0 reports: the process ends quietly with the same exit code."""

    def __init__(self, exit_code):
        super().__init__(f"rank 0 failed (exit code {exit_code})")
        self.exit_code = exit_code


# 2 and 3 need a person; after 4-7 the environment is fixed and the run continued with --resume auto. Also 1: an
# unexpected error (with its traceback), 128 + N: stopped by signal N.
EXIT_CODES = {ValueError: 2, FileNotFoundError: 2, NonFiniteLoss: 3, data.DownloadError: 4, DiskFull: 5,
              OutputDirInUse: 6, OutOfMemory: 7}


def exit_code(error) -> int:
    return next((code for kind, code in EXIT_CODES.items() if isinstance(error, kind)), 1)


# ---- flags
def is_rank0() -> bool:
    """Rank 0, or a single process: the one that says what every rank would say."""
    return os.environ.get("RANK", "0") == "0"


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line (like every other error of train.py), once under torchrun."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if is_rank0() else None)


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


POSITIVE_INT, COUNT = number(int, "(0, inf)"), number(int, "[0, inf)")
POSITIVE, NON_NEGATIVE = number(float, "(0, inf)"), number(float, "[0, inf)")
PROBABILITY, FRACTION = number(float, "[0, 1]"), number(float, "[0, 1)")


def add_data_flags(parser):
    add = parser.add_argument_group("data").add_argument
    add("--dataset", default="cifar10", choices=data.DATASETS, help="the dataset (digits: bundled, offline)")
    add("--data-dir", default="data", help="dataset root (CIFAR: its folder's parent; imagefolder: train/, val/)")
    add("--download", action="store_true", help="fetch CIFAR-10/100 into --data-dir if missing")


def add_augment_flags(parser):
    add = parser.add_argument_group("augmentation (defaults: the paper's baseline, as the seed ran it)").add_argument
    add("--hflip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip")
    add("--crop-padding", default=4, type=COUNT, help="random 32x32 crop after zero padding (pixels)")
    add("--auto-augment", default="cifar10", choices=data.AUTO_AUGMENT_POLICIES, help="AutoAugment policy, per image")
    add("--aa-fill", default=data.AA_FILL, type=number(int, "[0, 255]"),
        help="grey level where AutoAugment's translate/shear/rotate uncover the image")
    add("--random-erase", default=0.25, type=PROBABILITY, help="random erasing probability per image")
    add("--mixup-alpha", default=1.0, type=NON_NEGATIVE, help="Mixup Beta(alpha, alpha); 0: no Mixup")
    add("--cutmix-alpha", default=1.0, type=NON_NEGATIVE, help="CutMix Beta(alpha, alpha); 0: no CutMix")
    add("--mix-prob", default=0.5, type=PROBABILITY, help="probability that a batch is mixed (CutMix or Mixup, 50/50)")
    add("--label-smoothing", default=0.1, type=FRACTION, help="label smoothing of the cross-entropy")
    add("--ra-reps", default=3, type=POSITIVE_INT, help="repeated augmentation: times each image is seen per epoch")
    add("--ra-mode", default="shuffles", choices=data.RA_MODES,
        help="shuffles: --ra-reps independent shuffles per epoch (the seed, 1 process); in-batch: an image's copies "
             "side by side in a batch (the seed under torchrun)")


def add_model_flags(parser):
    add = parser.add_argument_group("model (model.ViTConfig)").add_argument
    add("--patch-size", default=4, type=POSITIVE_INT, help="patch side (pixels)")
    add("--dim", default=192, type=POSITIVE_INT, help="token width")
    add("--depth", default=9, type=POSITIVE_INT, help="transformer blocks")
    add("--heads", default=12, type=POSITIVE_INT, help="attention heads (must divide --dim)")
    add("--mlp-ratio", default=2.0, type=POSITIVE, help="MLP hidden width / --dim")
    add("--num-cls", default=1, type=POSITIVE_INT, help="CLS tokens")
    add("--cls-pool", default="concat", choices=CLS_POOLS, help="how the CLS outputs reach the head")
    add("--pos-embed", default="learned", choices=POS_EMBEDS, help="position embedding")
    add("--patch-init", default="pytorch", choices=PATCH_INITS,
        help="pytorch: the seed's (Conv2d's default, U(+-1/sqrt(3 p^2))); trunc_normal: std 0.02, as other linears")
    add("--latent", default="", help="low-rank attention projections, any of q, k, v, o (o: the output; e.g. kv)")
    add("--latent-dim", default=64, type=POSITIVE_INT, help="rank of the low-rank attention projections")
    add("--shared-kv-latent", action="store_true", help="K and V share one latent (DeepSeek-V2)")
    add("--mlp-latent-dim", default=0, type=COUNT, help="rank of both MLP layers (down, no bias -> up); 0: full")
    add("--drop-path", default=0.1, type=FRACTION, help="stochastic depth rate of the last block")
    add("--whiten", action="store_true", help="whitening init of the patch embedding")
    add("--whiten-images", default=5000, type=POSITIVE_INT,
        help="--whiten uses the first whole training batches holding at least this many images (as the seed)")
    add("--init-from", help="checkpoint.pt whose weights start this run: each projection factorised by truncated "
                            "SVD to the ranks asked for (the same at full rank), the rest copied")


def add_optim_flags(parser):
    add = parser.add_argument_group("optimisation").add_argument
    add("--opt", default="adamw", choices=OPTIMIZERS, help="muon: Muon for the blocks' matrices, AdamW the rest")
    add("--lr", default=1e-3, type=POSITIVE, help="peak learning rate (Lion: use 3-10x smaller)")
    add("--muon-lr", default=0.02, type=POSITIVE, help="--opt muon: peak learning rate of Muon")
    add("--muon-momentum", default=0.9, type=FRACTION, help="--opt muon: Muon's Nesterov momentum")
    add("--weight-decay", default=0.05, type=NON_NEGATIVE, help="decoupled weight decay (Lion: 3-10x larger)")
    add("--batch-size", default=256, type=POSITIVE_INT, help="global batch (all processes together)")
    add("--epochs", default=100, type=POSITIVE_INT, help="epochs (one epoch: --ra-reps passes over the data)")
    add("--warmup-epochs", type=NON_NEGATIVE, help="linear warm-up (epochs; default: a tenth of --epochs)")
    add("--warmup-lr", default=1e-6, type=POSITIVE, help="learning rate at step 0")
    add("--min-lr", default=1e-6, type=NON_NEGATIVE, help="learning rate at the end of the cosine")
    add("--amp", action="store_true", help="bf16 autocast on CUDA (no effect on CPU)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA, not on the CPU)")
    add("--compile-mode", default="default", choices=COMPILE_MODES,
        help="reduce-overhead adds CUDA graphs; max-autotune also tunes kernels (minutes of compiling)")


def add_run_flags(parser):
    add = parser.add_argument_group("run").add_argument
    add("--eval-every", default=5, type=POSITIVE_INT, help="evaluate every N epochs (and after the last)")
    add("--log-every", default=50, type=POSITIVE_INT, help="log training loss every N steps")
    add("--seed", default=0, type=int, help="base seed; every random draw derives from it")
    add("--tag", help="the table column this run belongs to (report.py groups runs by it)")
    add("--output-dir", help="where metrics, checkpoint and summary go (default: runs/<dataset>-<time>)")
    add("--resume", help="checkpoint.pt to continue from; auto: the output dir's checkpoint if there is one")
    add("--save-every", default=0, type=COUNT, help="also checkpoint every N steps (a kill loses at most N steps)")
    add("--stop-after-epochs", type=POSITIVE_INT, help="end after N epochs, schedule unchanged; then --resume")
    add("--device", help="cuda or cpu (default: cuda when available)")


def get_args_parser():
    parser = Parser(prog="train.py", description="Train a small ViT (PoorViTs).")
    for add_flags in (add_data_flags, add_augment_flags, add_model_flags, add_optim_flags, add_run_flags):
        add_flags(parser)
    return parser


def model_config(args, num_classes) -> ViTConfig:
    return ViTConfig(
        img_size=data.IMAGE_SIZE, patch_size=args.patch_size, num_classes=num_classes, dim=args.dim,
        depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, num_cls=args.num_cls, cls_pool=args.cls_pool,
        pos_embed=args.pos_embed, patch_init=args.patch_init, latent=args.latent, latent_dim=args.latent_dim,
        shared_kv_latent=args.shared_kv_latent, mlp_latent_dim=args.mlp_latent_dim, drop_path=args.drop_path,
    )


def check_args(args):
    """What no flag can check alone, before any work (one line naming the flags); fills in --output-dir's default.
    The model's own checks (ViTConfig) speak in its field names."""
    if args.warmup_epochs is not None and args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} must not exceed --epochs {args.epochs}")
    if args.warmup_epochs != 0 and args.warmup_lr > args.lr:
        raise ValueError(f"--warmup-lr {args.warmup_lr} must not exceed --lr {args.lr}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be divisible by the {world_size} processes")
    if args.download and args.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"--download fetches cifar10 or cifar100, not --dataset {args.dataset}")
    if args.whiten and args.init_from:
        raise ValueError("--whiten and --init-from both set the patch embedding: choose one")
    if args.whiten and 3 * args.patch_size**2 > args.dim:
        raise ValueError(f"--whiten writes 3 * --patch-size**2 = {3 * args.patch_size**2} filters: it needs "
                         f"--dim >= that, got --dim {args.dim}")
    if args.output_dir is None:
        if args.resume == "auto":
            raise ValueError("--resume auto needs --output-dir (the run to continue)")
        fresh = f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
        args.output_dir = str(Path(args.resume).parent) if args.resume else fresh
    model_config(args, num_classes=1)


# ---- building the run
def resolve_compile(args, device):
    """--compile defaults to on for CUDA, where an eager step is mostly kernel launches, and to off on the CPU, where
    compiling takes longer than a short run saves."""
    if args.compile is None:
        args.compile = device.type == "cuda"
    if not args.compile and args.compile_mode != "default":
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compile (the default on CUDA only)")


def device_of(name):
    """--device `name`, or cuda when available."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu)")
    return device


def setup_distributed(args):
    """(rank, world_size, device); a no-op without torchrun. NCCL on CUDA, gloo on CPU."""
    device = device_of(args.device)
    resolve_compile(args, device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def load_dataset(args):
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: pass --download to fetch it, or --data-dir the folder that holds it") from None
    if args.batch_size > len(dataset.train_images) * args.ra_reps:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(dataset.train_images) * args.ra_reps} "
                         f"samples of an epoch")
    return dataset


def load_data(args, rank0):
    """--download, then the dataset. Rank 0 goes first, so that an error every rank would meet is said once; with
    --download the first process of every other node fetches next (on a shared filesystem it finds the files in
    place and checks their md5), so two processes never fetch into one folder at once."""
    if args.download:
        rank0(data.download, args.dataset, args.data_dir)
        if rank0.world_size > 1:
            if rank0.rank != 0 and int(os.environ["LOCAL_RANK"]) == 0:
                data.download(args.dataset, args.data_dir)
            dist.barrier()
    return rank0.first(load_dataset, args)


def build_loader(args, dataset, device, rank, world_size):
    """This rank's training batches: the training set on `device` as uint8, augmented there a chunk at a time, per
    image, as the seed's per-image torchvision pipeline would (`loader.sampler` fixes the epoch's order)."""
    sampler = data.RepeatedAugmentationSampler(len(dataset.train_images), args.batch_size, args.ra_reps, rank,
                                               world_size, args.seed, args.ra_mode)
    augment = data.BatchAugment(dataset.mean, dataset.std, args.hflip, args.crop_padding, args.auto_augment,
                                args.random_erase, args.aa_fill)
    return data.DeviceLoader(dataset.train_images, dataset.train_labels, sampler, augment, device)


def whitening_images(args, dataset, device):
    """What --whiten sees, as the seed did: the first whole batches of epoch 0's training stream holding at least
    --whiten-images images, exactly as the model gets them (flipped, cropped, AutoAugmented, normalised, erased;
    mixing comes later). The 1-process stream, so every rank whitens alike."""
    loader = build_loader(args, dataset, device, rank=0, world_size=1)
    loader.sampler.set_epoch(0)
    batches = []
    for images, _ in loader:
        batches.append(images.to(device))
        if len(batches) * loader.sampler.batch >= args.whiten_images:
            break
    return torch.cat(batches)


def build_model(args, num_classes, source, whitening):
    """The flags' ViT: its patch embedding whitened on `whitening()`'s images, or every weight from `source`."""
    model = ViT(model_config(args, num_classes))
    if args.whiten:
        model.whiten_patch_embedding(whitening())
    if source is not None:
        try:
            transfer_weights(source, model)
        except ValueError as e:
            raise ValueError(f"--init-from {args.init_from}: {e}") from None
    return model


def muon_matrices(model):
    """The parameters --opt muon gives to Muon: every 2-D weight matrix inside the transformer blocks."""
    return [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2]


def build_optimizers(args, model, device):
    """The optimizers of --opt, each stepped every iteration: one, or for Muon [AdamW for the rest, Muon]."""
    if args.opt == "lion":
        return [Lion(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)]
    fused = device.type == "cuda"
    if args.opt == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  fused=fused)]
    matrices = muon_matrices(model)
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    # The seed's Muon: Nesterov momentum, 6 Newton-Schulz steps, no weight decay; its AdamW part: betas (0.95, 0.95).
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


# ---- training
NO_BAD_STEP = 2**62  # TrainingState.first_bad_step when every loss so far was finite


class TrainingState:
    """Progress that a checkpoint carries: step, accuracies, training time, and the open log interval (so a resume
    at any step logs the same numbers as an uninterrupted run)."""

    def __init__(self, device):
        self.step, self.acc, self.best_acc, self.best_epoch, self.train_seconds = 0, None, None, None, 0.0
        self.loss_sum, self.interval_steps = torch.zeros((), device=device), 0
        # Kept on the device, so that noting a non-finite loss costs no sync.
        self.first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.long, device=device)
        self.interval_start = time.perf_counter()
        self.timed_steps, self.timed_seconds, self.first_interval = 0, 0.0, True

    def add(self, loss):
        bad_now = self.first_bad_step.clamp(max=self.step)
        self.first_bad_step = torch.where(loss.isfinite(), self.first_bad_step, bad_now)
        self.loss_sum += loss
        self.step += 1
        self.interval_steps += 1

    def raise_if_not_finite(self, epoch):
        bad = int(self.first_bad_step)
        if bad != NO_BAD_STEP:
            raise NonFiniteLoss(f"the loss became NaN or infinite at step {bad} (epoch {epoch + 1}); stopped "
                                f"without saving")

    def log_interval(self, lr, batch_size):
        """Mean loss and speed of the steps since the last log point; starts the next interval."""
        seconds = time.perf_counter() - self.interval_start
        metrics = {"lr": lr, "loss": self.loss_sum.item() / self.interval_steps,
                   "img_s": self.interval_steps * batch_size / seconds,
                   "ms_per_step": 1000 * seconds / self.interval_steps}
        self.train_seconds += seconds
        if not self.first_interval:  # the first interval holds warm-up (and compilation): not timed
            self.timed_steps += self.interval_steps
            self.timed_seconds += seconds
        self.first_interval = False
        self.loss_sum.zero_()
        self.interval_steps, self.interval_start = 0, time.perf_counter()
        return metrics

    def record_eval(self, acc, epoch):
        self.acc = acc
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch

    def speed(self, batch_size):
        if not self.timed_seconds:
            return {"img_per_s": None, "ms_per_step": None}
        return {"img_per_s": self.timed_steps * batch_size / self.timed_seconds,
                "ms_per_step": 1000 * self.timed_seconds / self.timed_steps}

    def checkpoint(self):
        return {"step": self.step, "last_acc": self.acc, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds,
                "interval": {"loss_sum": self.loss_sum.item(), "steps": self.interval_steps}}

    def load(self, ckpt):
        self.step, self.acc, self.best_acc = ckpt["step"], ckpt["last_acc"], ckpt["best_acc"]
        self.best_epoch, self.train_seconds = ckpt["best_epoch"], ckpt["train_seconds"]
        self.loss_sum.fill_(ckpt["interval"]["loss_sum"])
        self.interval_steps = ckpt["interval"]["steps"]


def train_step(model, optimizers, schedulers, images, labels, mix, autocast, label_smoothing):
    """Mix the batch, one forward/backward/update, one scheduler step; returns the loss on the device (no sync)."""
    images, targets = mix(images, labels)
    with autocast:
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer, scheduler in zip(optimizers, schedulers):
        optimizer.step()
        scheduler.step()
    return loss.detach()


def seed_step(seed, rank, step):
    """Stochastic depth and batch mixing draw from torch's generators, seeded by (seed, rank, step) before every
    step: a resume replays them exactly."""
    torch.manual_seed(data.derive_seed(seed, "step", rank, step))


def train_one_epoch(model, optimizers, schedulers, loader, mix, epoch, run):
    """One epoch (on resume, from its saved step, set on loader.sampler); True if a stop signal ended it early,
    after saving a checkpoint."""
    args, state = run.args, run.state
    model.train()
    state.interval_start = time.perf_counter()
    for images, labels in loader:
        seed_step(args.seed, run.rank0.rank, state.step)
        state.add(train_step(model, optimizers, schedulers, images, labels, mix, run.autocast, args.label_smoothing))
        end_of_epoch = state.step % loader.sampler.steps_per_epoch == 0
        log_now = end_of_epoch or state.step % args.log_every == 0
        save_now = args.save_every and state.step % args.save_every == 0
        # The only host-device syncs: at log points, at saves, and once a stop is asked for.
        if log_now or save_now or run.stop.asked_locally():
            run.stop.agree(state)
            state.raise_if_not_finite(epoch)
        if log_now:
            run.log_train(epoch, optimizers[0].param_groups[0]["lr"])
        if not end_of_epoch and (save_now or run.stop.agreed):  # the epoch's end saves after its evaluation
            run.save()
            if run.stop.agreed:
                return True
    return False


@torch.no_grad()
def evaluate(model, images, labels, mean, std, device, rank, world_size, autocast):
    """Top-1 accuracy (%) and mean cross-entropy on the test set, held on the device as uint8; each rank takes every
    world_size-th image. Nothing is copied to the device per chunk, and the counts are read once, at the end."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    constants = data.to_device(data.normalization(mean, std), device)
    shard = slice(rank, None, world_size)
    for x, y in zip(images[shard].split(EVAL_CHUNK), labels[shard].split(EVAL_CHUNK)):
        x = data.scale_shift(x, constants)
        with autocast:
            logits = model(x)
        totals[0] += (logits.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[2] += len(y)
    if world_size > 1:
        dist.all_reduce(totals)
    correct, loss_sum, count = totals.tolist()
    return 100 * correct / count, loss_sum / count


# ---- the run's files, its processes and its failures
def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def run_info(device):
    try:
        root = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        commit = (commit + ("-dirty" if dirty.strip() else "")) or "unknown"
    except OSError:
        commit = "unknown"
    return {"git_commit": commit, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "einops": einops.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": device_name(device), "hostname": platform.node()}


class Rank0:
    """Work that rank 0 alone does: claim the output dir, download, read the checkpoint, write the run's files.
    Under DDP every rank then learns the outcome (one broadcast), so that a failure there stops all ranks at the
    same point: rank 0 raises the error (and says it), the others a FailedOnRank0 with its exit code."""

    def __init__(self, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def __call__(self, work, *args, **kwargs):
        """work(*args, **kwargs)'s result on rank 0, None on the others."""
        error = result = None
        if self.rank == 0:
            try:
                result = work(*args, **kwargs)
            except Exception as e:
                error = e
        if self.world_size > 1:
            code = torch.tensor(0 if error is None else exit_code(error), device=self.device)
            dist.broadcast(code, src=0)
            if self.rank != 0 and code.item():
                raise FailedOnRank0(int(code))
        if error is not None:
            raise error
        return result

    def shared(self, work, *args):
        """work(*args)'s result on rank 0, sent to every rank: under multi-node torchrun the other nodes need not
        see rank 0's files."""
        result = [self(work, *args)]
        if self.world_size > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def first(self, work, *args):
        """work(*args) on rank 0, then on every other rank: an error all would meet is said once, by rank 0."""
        result = self(work, *args)
        return result if self.rank == 0 else work(*args)


@contextlib.contextmanager
def writing(path: Path, size: int):
    """Turns "no space left" while writing `size` bytes to `path` into a DiskFull that says so."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"disk full: writing {path} needs {size:,} bytes free") from None
        raise


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, payload):
    """Writes `payload` (bytes) to a temporary file, fsyncs it and renames it over `path`: a reader never sees a
    half-written file. On any failure the temporary file is removed, so that it holds no space."""
    tmp = temp_path(path)
    try:
        with writing(path, len(payload)):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: Path, line: bytes):
    """Adds one whole line to a log with one write to an O_APPEND file: a kill leaves the line whole or absent, and
    the part of it that a nearly full disk took is cut off again."""
    with writing(path, len(line)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            if os.write(fd, line) < len(line):
                os.ftruncate(fd, end)
                raise OSError(errno.ENOSPC, "the disk took only part of the line")
        finally:
            os.close(fd)


def copy_to_host(obj):
    """`obj` (state dicts: nested dicts, lists and tuples) with every tensor copied into new CPU memory, so that
    training can go on changing the originals while the copy is written. From a GPU the copies go into pinned memory
    without blocking: they have landed once an event recorded after them has."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            return torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True).copy_(obj.detach(), non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: copy_to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_to_host(value) for value in obj)
    return obj  # numbers, strings, None: immutable


class CheckpointWriter:
    """Writes the checkpoint in a background thread, so that training does not wait for its serialisation and fsync:
    `save` copies the state to host memory and returns. At most one write is in flight: a save first waits for the
    previous one. Rank 0 writes; under DDP `save` and `join` are collective calls (through Rank0), so that the error
    of a write (disk full) stops every rank at the next save or at the join."""

    def __init__(self, path: Path, rank0: Rank0, device, saved_step=None):
        self.path, self.rank0, self.device = path, rank0, device
        self.saved_step = saved_step  # the step of the newest checkpoint whose write completed; None: none yet
        self.pending_step = None  # the step of the write in flight
        self.thread, self.error = None, None

    def save(self, step, content):
        """Starts writing `content()` (the checkpoint's dict; called on rank 0 only) as the checkpoint of `step`."""
        self.rank0(self._start, content)
        self._confirm()
        self.pending_step = step

    def join(self):
        """Waits for the write in flight; raises its error."""
        self.rank0(self._wait)
        self._confirm()

    def finish(self):
        """Waits for the write in flight without a collective call, for a run that ends by another error (or exits):
        that error is the one reported, and `last_good` then names the checkpoint on disk."""
        with contextlib.suppress(Exception):
            self._wait()
            self._confirm()

    def last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.path} (step {self.saved_step})"

    def _start(self, content):
        snapshot, copied = copy_to_host(content()), None
        if self.device.type == "cuda":
            # A blocking-sync event: the writer thread sleeps on it instead of spinning a core.
            copied = torch.cuda.Event(blocking=True)
            copied.record(torch.cuda.current_stream(self.device))
        self._wait()
        self.thread = threading.Thread(target=self._write, args=(snapshot, copied), name="checkpoint-writer")
        self.thread.start()

    def _wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            self.pending_step = None  # that write failed: the last good checkpoint stays the one before
            raise error

    def _write(self, snapshot, copied):
        try:
            if copied is not None:
                copied.synchronize()
            buffer = io.BytesIO()  # in memory first: atomic_write then knows the size to report if the disk is full
            torch.save(snapshot, buffer)
            atomic_write(self.path, buffer.getbuffer())
        except Exception as e:  # raised on the training thread by the next save or join
            self.error = e

    def _confirm(self):
        """The write in flight completed (rank 0 waited for it, and under DDP told every rank so)."""
        if self.pending_step is not None:
            self.saved_step, self.pending_step = self.pending_step, None


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")


def lock_output_dir(out: Path, on_exit: contextlib.ExitStack):
    """An OS-held lock on out/.lock for the life of the run (on_exit closes it): the kernel drops it when the process
    ends, kill -9 included, so a lock is never left behind. POSIX locks (lockf) rather than flock: a forked child
    does not inherit them, so none keeps the lock after a kill. The file names the holder."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    on_exit.callback(os.close, fd)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        raise OutputDirInUse(f"--output-dir {out} is in use by {holder}: wait for that run to end (or stop it), or "
                             f"choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)


def claim_output_dir(args, on_exit: contextlib.ExitStack):
    """Creates --output-dir and locks it for this run; removes the temporary files of a run killed while writing
    (they may hold the space the run needs); refuses a folder holding another run unless resuming it."""
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_output_dir(out, on_exit)
    except OSError as e:
        raise ValueError(f"--output-dir {out} is not a writable folder ({e.strerror or e})") from None
    for name in RUN_FILES:
        temp_path(out / name).unlink(missing_ok=True)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not args.resume:
        raise ValueError(f"--output-dir {out} already holds a run ({', '.join(existing)}): "
                         f"pass --resume {out / 'checkpoint.pt'} to continue it, or choose another --output-dir")


def resume_checkpoint(args):
    """The checkpoint to resume from: --resume PATH, or with --resume auto the output dir's, if it has one."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.output_dir) / "checkpoint.pt"
        return path if path.is_file() else None
    path = Path(args.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    return path


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]


def read_checkpoint(path, flag):
    """A checkpoint written by train.py, loaded without running any code from it (weights_only=True); a damaged or
    foreign file is a one-line ValueError naming `flag`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # torch's weights-only unpickler met a class or function it would have to call
            raise ValueError(f"{flag} {path}: refused: it holds objects that would run code when loaded; only "
                             f"tensors and plain values are loaded (weights_only=True)") from None
        raise ValueError(f"{flag} {path}: not a readable checkpoint (damaged or not a torch file)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for damaged or foreign files
        raise ValueError(f"{flag} {path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "args", "step"} <= ckpt.keys():
        raise ValueError(f"{flag} {path}: not a checkpoint written by train.py")
    return ckpt


def load_model(path, flag):
    """(the trained ViT of a checkpoint, on the CPU; the checkpoint), or a one-line ValueError naming `flag`."""
    ckpt = read_checkpoint(path, flag)
    try:
        model = ViT(ViTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{flag} {path}: not a model this code can build ({first_line(e)})") from None
    return model, ckpt


def load_resume(path, args, cfg):
    """The checkpoint of this run to continue from (None: start it), refused if it is for another model or was
    trained with other flags."""
    if path is None:
        return None
    ckpt = read_checkpoint(path, "--resume")
    if ckpt["config"] != asdict(cfg):
        differing = sorted(k for k in asdict(cfg) if ckpt["config"].get(k) != asdict(cfg)[k])
        raise ValueError(f"--resume {path}: checkpoint is for a different model: "
                         + ", ".join(f"{k} {ckpt['config'].get(k)!r} -> {asdict(cfg)[k]!r}" for k in differing))
    changed = sorted(k for k, v in vars(args).items() if k not in RESUME_FREE_FLAGS and ckpt["args"].get(k) != v)
    if changed:
        raise ValueError(f"--resume {path}: flags differ from the checkpoint's run: "
                         + ", ".join(f"--{k.replace('_', '-')} {ckpt['args'].get(k)!r} -> {vars(args)[k]!r}"
                                     for k in changed))
    return ckpt


def restore(ckpt, model, optimizers, schedulers, state):
    model.load_state_dict(ckpt["model"])
    for optimizer, saved in zip(optimizers, ckpt["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, ckpt["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    state.load(ckpt)


class MetricsLog:
    """metrics.jsonl (rank 0 writes it): one JSON record per line, each added whole by a single write."""

    def __init__(self, path: Path):
        self.path = path

    def keep_until(self, step):
        """On resume: drops the records after the checkpoint's `step` (they are redone), and a partial last line
        (a write cut short by a kill or a crash), which is said once."""
        if not self.path.exists():
            return
        whole, _, partial = self.path.read_bytes().rpartition(b"\n")
        if partial:
            tqdm.write(f"train.py: note: dropped the partial last line of {self.path} ({len(partial)} bytes, a "
                       f"write cut short): its record is redone", file=sys.stderr)
        kept = []
        for number, line in enumerate(whole.splitlines(), 1):
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path} line {number} is not a metrics record ({e})") from None
            if record_step <= step:
                kept.append(line + b"\n")
        atomic_write(self.path, b"".join(kept))

    def write(self, **record):
        append_line(self.path, (json.dumps(record) + "\n").encode())


class StopSignal:
    """SIGTERM or SIGINT (preemption, Ctrl-C) asks the run to stop at the next step boundary, after saving a
    checkpoint. Under DDP the ranks agree at the next log point or save, so that all stop at the same step.
    A second signal stops at once, without saving."""

    def __init__(self, world_size, device):
        self.world_size, self.device = world_size, device
        self.signum, self.agreed, self.previous = None, False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def asked_locally(self):
        return self.world_size == 1 and self.signum is not None

    def agree(self, state):
        """Sets `agreed` when the run should stop now; under DDP (collective calls) the ranks also agree on the
        first non-finite step, the earliest of theirs."""
        if self.world_size > 1:
            asked = torch.tensor(self.signum or 0, device=self.device)
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            dist.all_reduce(state.first_bad_step, op=dist.ReduceOp.MIN)
            self.signum = int(asked) or None
        self.agreed = self.signum is not None


def final_line(summary, args):
    out = Path(args.output_dir)
    if summary["complete"]:
        return (f"test accuracy: final {summary['final_acc']:.2f}% (epoch {args.epochs}), best "
                f"{summary['best_acc']:.2f}% (epoch {summary['best_epoch']}); {summary['train_seconds']:.0f} s of "
                f"training; {out}")
    return (f"stopped at step {summary['steps']} of {summary['total_steps']} (epoch "
            f"{summary['steps'] / summary['steps_per_epoch']:.2f}); continue with --resume {out / 'checkpoint.pt'} "
            f"(or --resume auto)")


@dataclass
class Run:
    """One invocation's bookkeeping on one rank: its progress, the metrics log, the checkpoint writer, the stop
    signal and the progress bar; `content()` is the checkpoint's dict, `facts` what every summary repeats."""
    args: argparse.Namespace
    device: torch.device
    rank0: Rank0
    state: TrainingState
    log: MetricsLog
    writer: CheckpointWriter
    stop: StopSignal
    autocast: torch.autocast
    content: Callable[[], dict]
    facts: dict
    progress: tqdm = None

    def begin(self, resumed: bool):
        """The run record; on resume the records after the checkpoint are dropped (they are redone), and a run that
        --resume auto restarts (no checkpoint) loses all of its."""
        self.rank0(self.log.keep_until, self.state.step if resumed else -1)
        epoch = self.state.step // self.facts["steps_per_epoch"]
        self.rank0(self.log.write, kind="run", epoch=epoch, step=self.state.step, **self.facts)
        self.progress = tqdm(total=self.facts["total_steps"], initial=self.state.step, disable=self.rank0.rank != 0,
                             dynamic_ncols=True, desc="train")

    def log_train(self, epoch, lr):
        metrics = self.state.log_interval(lr, self.args.batch_size)
        self.rank0(self.log.write, kind="train", epoch=epoch + 1, step=self.state.step, **metrics)
        self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                  img_s=f"{metrics['img_s']:.0f}")
        self.progress.update(self.state.step - self.progress.n)

    def log_eval(self, epoch, acc, loss):
        self.state.record_eval(acc, epoch + 1)
        self.rank0(self.log.write, kind="eval", epoch=epoch + 1, step=self.state.step, acc=acc, loss=loss)
        if self.rank0.rank == 0:
            self.progress.write(f"epoch {epoch + 1}: test acc {acc:.2f}% (best {self.state.best_acc:.2f}% at epoch "
                                f"{self.state.best_epoch})")

    def save(self):
        self.writer.save(self.state.step, self.content)

    def explain(self, error):
        """A failure met while training, as the user should read it: what happened, the last good checkpoint (once
        the write in flight has ended), what to do."""
        self.writer.finish()
        last_good = self.writer.last_good()
        if isinstance(error, NonFiniteLoss):
            return NonFiniteLoss(f"{error}: {last_good}")
        if isinstance(error, DiskFull):
            return DiskFull(f"{error}; {last_good}: free space, then --resume auto continues the run")
        if isinstance(error, torch.OutOfMemoryError):
            world_size = self.rank0.world_size
            return OutOfMemory(
                f"out of memory after {self.state.step} steps, with {self.args.batch_size // world_size} images per "
                f"process (--batch-size {self.args.batch_size} over {world_size} process"
                f"{'es' if world_size > 1 else ''}); {last_good}: free the device's memory, then --resume auto "
                f"continues the run; or start a new run that needs less: a smaller --batch-size, more processes "
                f"(torchrun --nproc_per_node), --amp")
        return error

    def finish(self, failure, seconds):
        """Writes summary.json (rank 0) and says how the run ended; raises the failure that ended it."""
        self.progress.close()
        state, complete = self.state, self.state.step == self.facts["total_steps"]
        summary = {
            "complete": complete, "final_acc": state.acc if complete else None, "best_acc": state.best_acc,
            "best_epoch": state.best_epoch, "epochs_done": state.step // self.facts["steps_per_epoch"],
            "train_seconds": state.train_seconds, "total_seconds": seconds, **state.speed(self.args.batch_size),
            "stopped_by_signal": self.stop.signum if self.stop.agreed else None, **self.facts, "steps": state.step,
            "failed": str(failure) if failure else None,
        }
        # Not a collective call: a rank that failed alone (out of memory) must not wait here for the others.
        if self.rank0.rank == 0:
            try:
                text = json.dumps(summary, indent=2) + "\n"
                atomic_write(Path(self.args.output_dir) / "summary.json", text.encode())
            except DiskFull as e:
                failure = failure or self.explain(e)
        if failure:
            raise failure
        if self.rank0.rank == 0:
            print(final_line(summary, self.args))
        return summary


def train_epochs(model, optimizers, schedulers, loader, mix, test_set, run):
    """The epochs from the run's step to --epochs (or --stop-after-epochs more), each evaluated every --eval-every
    epochs and after the last, then saved. Returns the failure that ended them early, as the user should read it."""
    args, state = run.args, run.state
    start_epoch, start_step = divmod(state.step, loader.sampler.steps_per_epoch)
    end_epoch = min(args.epochs, start_epoch + (args.stop_after_epochs or args.epochs))
    try:
        for epoch in range(start_epoch, end_epoch):
            loader.sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
            if train_one_epoch(model, optimizers, schedulers, loader, mix, epoch, run):
                break
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                run.log_eval(epoch, *evaluate(model, *test_set, run.device, run.rank0.rank, run.rank0.world_size,
                                              run.autocast))
            run.save()
            if run.stop.agreed:
                break
        run.writer.join()
    except (NonFiniteLoss, DiskFull, torch.OutOfMemoryError, FailedOnRank0) as e:
        return run.explain(e)
    return None


def main(args):
    """The recipe: flags → processes → output dir → data → model → optimizers → compile → DDP → resume → epochs →
    summary. Whatever the run holds (its folder's lock, a checkpoint write in flight, the process group) is released
    however it ends."""
    start = time.perf_counter()
    try:
        check_args(args)
        rank, world_size, device = setup_distributed(args)
    except ValueError as e:  # every rank meets these alike: rank 0 says them
        raise e if is_rank0() else FailedOnRank0(exit_code(e)) from None
    rank0 = Rank0(rank, world_size, device)
    with contextlib.ExitStack() as on_exit:
        if world_size > 1:
            on_exit.callback(dist.destroy_process_group)
        # Only rank 0 reads the checkpoint and writes the run's files.
        resume_path = rank0.shared(resume_checkpoint, args)
        # A fresh run may start from another run's weights, read before any work; a resumed one has its own.
        source = None
        if args.init_from and resume_path is None:
            source, _ = rank0.first(load_model, args.init_from, "--init-from")
        rank0(claim_output_dir, args, on_exit)
        torch.manual_seed(data.derive_seed(args.seed, "init"))

        dataset = load_data(args, rank0)
        loader = build_loader(args, dataset, device, rank, world_size)
        mix = data.BatchMix(len(dataset.classes), args.mixup_alpha, args.cutmix_alpha, args.mix_prob)
        # Like the training set, the test set lives on the device as uint8: evaluation copies nothing per chunk.
        test_set = (dataset.test_images.to(device), dataset.test_labels.to(device), dataset.mean, dataset.std)

        model = build_model(args, len(dataset.classes), source, lambda: whitening_images(args, dataset, device))
        model_without_ddp = model.to(device)
        optimizers = build_optimizers(args, model, device)
        schedulers = [build_scheduler(optimizer, args, loader.sampler.steps_per_epoch) for optimizer in optimizers]
        if args.compile:
            model = torch.compile(model, mode=args.compile_mode)
        if world_size > 1:
            # DDP also broadcasts rank 0's initial weights, so every rank starts (and whitens) identically.
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        state = TrainingState(device)
        ckpt = rank0.shared(load_resume, resume_path, args, model_without_ddp.cfg)
        if ckpt is not None:
            restore(ckpt, model_without_ddp, optimizers, schedulers, state)
        del ckpt  # its tensors now live in the model and the optimizers
        cfg, info, steps_per_epoch = asdict(model_without_ddp.cfg), run_info(device), loader.sampler.steps_per_epoch
        facts = dict(params=count_parameters(model_without_ddp), forward_macs=forward_macs(model_without_ddp.cfg),
                     world_size=world_size, dataset=args.dataset, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                     total_steps=args.epochs * steps_per_epoch, config=cfg, args=vars(args), **info)
        out = Path(args.output_dir)
        writer = CheckpointWriter(out / "checkpoint.pt", rank0, device, state.step if resume_path else None)
        on_exit.callback(writer.finish)  # runs before the output dir's lock is released
        run = Run(args, device, rank0, state, MetricsLog(out / "metrics.jsonl"), writer,
                  on_exit.enter_context(StopSignal(world_size, device)),
                  torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"),
                  content=lambda: {
                      "model": model_without_ddp.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                      "schedulers": [s.state_dict() for s in schedulers], **state.checkpoint(), "args": vars(args),
                      "config": cfg, "run": info,
                      "data": {"classes": dataset.classes, "mean": dataset.mean, "std": dataset.std}},
                  facts=facts)
        run.begin(resumed=resume_path is not None)
        failure = train_epochs(model, optimizers, schedulers, loader, mix, test_set, run)
        return run.finish(failure, time.perf_counter() - start)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        summary = main(args)
    except FailedOnRank0 as e:
        sys.exit(e.exit_code)  # rank 0 says why
    except tuple(EXIT_CODES) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(exit_code(e))
    if summary["stopped_by_signal"]:
        sys.exit(128 + summary["stopped_by_signal"])  # the shell's convention for a process ended by a signal


if __name__ == "__main__":
    cli()
