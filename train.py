"""Train a PoorViT (arXiv 2501.06220) on CIFAR-10 and friends, on one process or many via torchrun.

    python train.py --download --output-dir runs/baseline                  # the paper's baseline, 1 process
    torchrun --standalone --nproc_per_node=4 train.py --batch-size 1024 ...  # DDP; --batch-size is global

Top to bottom: flags; building the run; a step, an epoch, evaluation; `main`, the recipe. Its files: run.py.
"""
import argparse
import contextlib
import itertools
import math
import os
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
import run
from augment import BatchAugment, DeviceLoader
from lion import Lion
from model import CLS_POOLS, PATCH_INITS, POS_EMBEDS, ViT, ViTConfig, count_parameters, forward_macs, transfer_weights

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


POSITIVE_INT, COUNT = number(int, "(0, inf)"), number(int, "[0, inf)")
POSITIVE, NON_NEGATIVE = number(float, "(0, inf)"), number(float, "[0, inf)")
PROBABILITY, FRACTION = number(float, "[0, 1]"), number(float, "[0, 1)")


def get_args_parser():
    parser = run.Parser(prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Train a small ViT (PoorViTs). Defaults: the paper's baseline. Where the seed's "
                        "code admits other readings (depth, RA mode, precision, Lion's lr): docs/faithfulness.md.")
    add = parser.add_argument_group("data").add_argument
    add("--dataset", default="cifar10", choices=data.DATASETS, help="digits: offline; synthetic: for speed checks")
    add("--data-dir", default="data", help="dataset root (CIFAR: its folder's parent; imagefolder: train/, val/)")
    add("--download", action="store_true", help="fetch CIFAR-10/100 into --data-dir if missing")

    add = parser.add_argument_group("augmentation (as the seed ran it)").add_argument
    add("--hflip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip")
    add("--crop-padding", default=4, type=COUNT, help="random 32x32 crop after zero padding (pixels)")
    add("--auto-augment", default="cifar10", choices=data.AUTO_AUGMENT_POLICIES, help="AutoAugment policy, per image")
    add("--aa-fill", default=data.AA_FILL, type=number(int, "[0, 255]"), help="AutoAugment's grey where it shifts")
    add("--random-erase", default=0.25, type=PROBABILITY, help="random erasing probability per image")
    add("--mixup-alpha", default=1.0, type=NON_NEGATIVE, help="Mixup Beta(alpha, alpha); 0: no Mixup")
    add("--cutmix-alpha", default=1.0, type=NON_NEGATIVE, help="CutMix Beta(alpha, alpha); 0: no CutMix")
    add("--mix-prob", default=0.5, type=PROBABILITY, help="probability that a batch is mixed (CutMix or Mixup, 50/50)")
    add("--label-smoothing", default=0.1, type=FRACTION, help="label smoothing of the cross-entropy")
    add("--ra-reps", default=3, type=POSITIVE_INT, help="repeated augmentation: times each image is seen per epoch")
    add("--ra-mode", default="shuffles", choices=data.RA_MODES, help="in-batch: copies in a row (the seed's torchrun)")

    add = parser.add_argument_group("model (model.ViTConfig)").add_argument
    add("--patch-size", default=4, type=POSITIVE_INT, help="patch side (pixels)")
    add("--dim", default=192, type=POSITIVE_INT, help="token width")
    add("--depth", default=9, type=POSITIVE_INT, help="blocks (the seed's code builds 12: docs/faithfulness.md)")
    add("--heads", default=12, type=POSITIVE_INT, help="attention heads (must divide --dim)")
    add("--mlp-ratio", default=2.0, type=POSITIVE, help="MLP hidden width / --dim")
    add("--num-cls", default=1, type=POSITIVE_INT, help="CLS tokens")
    add("--cls-pool", default="concat", choices=CLS_POOLS, help="how the CLS outputs reach the head")
    add("--pos-embed", default="learned", choices=POS_EMBEDS, help="position embedding")
    add("--patch-init", default="pytorch", choices=PATCH_INITS, help="pytorch: the seed's (Conv2d's default init)")
    add("--latent", default="", help="low-rank attention projections, any of q, k, v, o (o: the output; e.g. kv)")
    add("--latent-dim", default=64, type=POSITIVE_INT, help="rank of the low-rank attention projections")
    add("--shared-kv-latent", action="store_true", help="K and V share one latent (DeepSeek-V2)")
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
    add("--device", help="cuda, cuda:N or cpu (unset: cuda on a CUDA build of torch, which must then start)")
    add("--dist-timeout", default=30.0, type=POSITIVE, help="minutes a rank waits for the others (first compiles)")
    return parser


def model_config(args, num_classes) -> ViTConfig:
    """The model flags are ViTConfig's fields, named alike."""
    flags = {f.name for f in fields(ViTConfig)} & vars(args).keys()
    return ViTConfig(img_size=data.IMAGE_SIZE, num_classes=num_classes, **{f: getattr(args, f) for f in flags})


def check_args(args):
    """What no single flag can check, before any work; fills in --output-dir's default."""
    if args.warmup_epochs is not None and args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} must not exceed --epochs {args.epochs}")
    if args.warmup_epochs != 0 and args.warmup_lr > args.lr:
        raise ValueError(f"--warmup-lr {args.warmup_lr} must not exceed --lr {args.lr}")
    if args.download and args.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"--download fetches cifar10 or cifar100, not --dataset {args.dataset}")
    if args.whiten and args.init_from:
        raise ValueError("--whiten and --init-from both set the patch embedding: choose one")
    if args.output_dir is None:
        if args.resume == "auto":
            raise ValueError("--resume auto needs --output-dir (the run to continue)")
        fresh = f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
        args.output_dir = str(Path(args.resume).parent) if args.resume else fresh
    model_config(args, num_classes=1)


# ---- building the run
def compiles(args, device) -> bool:
    """Unset --compile: on CUDA, where an eager step is mostly launches; not on a CPU, where compiling costs more."""
    return device.type == "cuda" if args.compile is None else args.compile


def setup_distributed(args):
    """(rank, world_size, device); a no-op without torchrun. NCCL on CUDA, gloo on CPU."""
    device = run.device_of(args.device)
    if not compiles(args, device) and args.compile_mode != "default":
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compile (unset: on CUDA only)")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=args.dist_timeout),
                            device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def load_data(args, rank0):
    """--download, then the dataset, rank 0 first: an error every rank would meet is said once. The first process
    of each other node fetches next (on a shared filesystem it finds the files, md5-checked): one fetch per folder."""
    if args.download:
        rank0(data.download, args.dataset, args.data_dir)
        if rank0.world_size > 1:
            if rank0.rank != 0 and int(os.environ["LOCAL_RANK"]) == 0:
                data.download(args.dataset, args.data_dir)
            dist.barrier()
    try:
        return rank0.first(data.load_dataset, args.dataset, args.data_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: pass --download to fetch it, or --data-dir the folder that holds it") from None


def build_loader(args, dataset, device, rank, world_size):
    """This rank's training batches, augmented per image on `device` (`loader.sampler` fixes the epoch's order)."""
    sampler = data.RepeatedAugmentationSampler(len(dataset.train_images), args.batch_size, args.ra_reps, rank,
                                               world_size, args.seed, args.ra_mode)
    augment = BatchAugment(dataset.mean, dataset.std, args.hflip, args.crop_padding, args.auto_augment,
                           args.random_erase, args.aa_fill)
    return DeviceLoader(dataset.train_images, dataset.train_labels, sampler, augment, device)


def build_model(args, dataset, device, source):
    """The flags' ViT, every weight from `source` (--init-from), or its patch embedding whitened on what the seed's
    was: the first --whiten-images images of epoch 0 (1-process stream), augmented as trained on, before mixing."""
    model = ViT(model_config(args, len(dataset.classes)))
    if args.whiten:
        loader = build_loader(args, dataset, device, rank=0, world_size=1)
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
    """--amp: bf16 autocast where the device has it (not V100, T4, RTX 20xx), else fp16; --amp-dtype forces one."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    name = (args.amp_dtype if args.amp_dtype != "auto" else "bf16" if bf16 else "fp16") if args.amp else "fp32"
    if args.amp:
        run.note(f"--amp: {name} autocast" + (" with a gradient scaler" if name == "fp16" else ""))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, torch.autocast(device.type, dtype=dtype, enabled=args.amp),
                     torch.amp.GradScaler(device.type, enabled=name == "fp16"))


def compile_model(model, args, device, precision, batch):
    """torch.compile'd `model` (see `compiles`), its graphs built now by forward and backward passes on zeros, which
    change no weight. Where that fails, one line says so and training goes on eager, unless a flag asked for it
    (--compile, or a --compile-mode other than the default): then it is an error."""
    if not compiles(args, device):
        return model
    zeros = torch.zeros(batch, 3, data.IMAGE_SIZE, data.IMAGE_SIZE, device=device)
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
class TrainingState:
    """The run's progress, which its checkpoint carries: step, accuracies, training time, and the open log
    interval's losses (so that a resume at any step logs what an uninterrupted run logs)."""

    def __init__(self, device, log_every):
        self.step, self.acc, self.best_acc, self.best_epoch, self.train_seconds = 0, None, None, None, 0.0
        # The interval's losses stay on the device until a log point: a step adds its loss by one copy, no sync.
        self.losses, self.interval_steps = torch.zeros(log_every, device=device), 0
        self.interval_start, self.timed = time.perf_counter(), None  # (steps, seconds) after the first interval

    def add(self, loss):
        self.losses[self.interval_steps] = loss
        self.step, self.interval_steps = self.step + 1, self.interval_steps + 1

    def first_bad_step(self):
        """The interval's first step with a NaN or infinite loss (run.NO_BAD_STEP if none), on the device."""
        losses = self.losses[: self.interval_steps]
        steps = torch.arange(self.step - len(losses), self.step, device=losses.device)
        none = torch.full((1,), run.NO_BAD_STEP, device=losses.device)
        return torch.cat([torch.where(losses.isfinite(), run.NO_BAD_STEP, steps), none]).amin()

    def log_interval(self, lr, batch_size):
        """Mean loss and speed of the steps since the last log point; starts the next interval. The first interval
        holds the warm-up: the run's speed leaves it out."""
        n, seconds = self.interval_steps, time.perf_counter() - self.interval_start
        self.train_seconds += seconds
        self.timed = (0, 0.0) if self.timed is None else (self.timed[0] + n, self.timed[1] + seconds)
        self.interval_steps, self.interval_start = 0, time.perf_counter()
        return {"lr": lr, "loss": self.losses[:n].sum().item() / n, "img_s": n * batch_size / seconds,
                "ms_per_step": 1000 * seconds / n}

    def checkpoint(self):
        return {"step": self.step, "last_acc": self.acc, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds, "interval_losses": self.losses[: self.interval_steps].tolist()}

    def load(self, ckpt):
        self.step, self.acc, self.best_acc = ckpt["step"], ckpt["last_acc"], ckpt["best_acc"]
        self.best_epoch, self.train_seconds, saved = ckpt["best_epoch"], ckpt["train_seconds"], ckpt["interval_losses"]
        # The interval goes on to the next log point, at most --log-every steps on, which may have changed.
        self.losses = torch.zeros(len(saved) + len(self.losses), device=self.losses.device)
        self.losses[: len(saved)], self.interval_steps = torch.tensor(saved), len(saved)


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


def train_one_epoch(model, optimizers, schedulers, loader, mix, epoch, precision, job):
    """One epoch, from loader.sampler's start step; True if a stop signal ended it early (after a checkpoint)."""
    args, state = job.args, job.state
    rank = 0 if args.same_seed_on_ranks else job.rank0.rank
    model.train()
    state.interval_start = time.perf_counter()
    for images, labels in loader:
        images, targets = mix(images, labels, data.seed_step(args.seed, rank, state.step, job.rank0.device))
        state.add(train_step(model, optimizers, schedulers, images, targets, precision, args.label_smoothing))
        end_of_epoch = state.step % loader.sampler.steps_per_epoch == 0
        log_now = end_of_epoch or state.step % args.log_every == 0
        save_now = args.save_every and state.step % args.save_every == 0
        # The only host-device syncs: at log points, at saves, and once a stop is asked for.
        if log_now or save_now or job.stop_asked():
            job.agree(epoch)
        if log_now:
            job.log_train(epoch, optimizers[0].param_groups[0]["lr"])
        if not end_of_epoch and (save_now or job.stopped):  # the epoch's end saves after its evaluation
            job.save()
            if job.stopped:
                return True
    return False


@torch.no_grad()
def evaluate(model, images, labels, mean, std, device, rank, world_size, autocast):
    """Top-1 accuracy (%) and mean cross-entropy on the test set (on the device; rank r takes every world_size-th
    image; counts read once). `model` is the uncompiled module: evaluation adds no graph to a compiled one."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    constants = data.to_device(data.normalization(mean, std), device)
    shard = slice(rank, None, world_size)
    for x, y in zip(images[shard].split(data.EVAL_CHUNK), labels[shard].split(data.EVAL_CHUNK)):
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


def train_epochs(model, model_without_ddp, optimizers, schedulers, loader, mix, test_set, precision, job):
    """The epochs from the run's step to --epochs (or --stop-after-epochs more), each evaluated every --eval-every
    epochs and after the last, then saved. Returns the failure that ended them early, as the user should read it."""
    args, state = job.args, job.state
    start_epoch, start_step = divmod(state.step, loader.sampler.steps_per_epoch)
    end_epoch = min(args.epochs, start_epoch + (args.stop_after_epochs or args.epochs))
    try:
        for epoch in range(start_epoch, end_epoch):
            loader.sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
            if train_one_epoch(model, optimizers, schedulers, loader, mix, epoch, precision, job):
                break
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                job.log_eval(epoch, *evaluate(model_without_ddp, *test_set, job.rank0.device, job.rank0.rank,
                                              job.rank0.world_size, precision.autocast))
            job.save()
            if job.stopped:
                break
        job.writer.join()
    except (run.NonFiniteLoss, run.DiskFull, torch.OutOfMemoryError, run.FailedOnRank0) as e:
        return job.explain(e)
    return None


def restore(ckpt, model, optimizers, schedulers, scaler, state):
    model.load_state_dict(ckpt["model"])
    for optimizer, saved in zip(optimizers, ckpt["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, ckpt["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state.load(ckpt)


def main(args):
    """The recipe: processes → output dir → data → model → optimizers → compile → DDP → resume → epochs → summary.
    What the run holds (its folder's lock, a checkpoint write, the process group) is released however it ends."""
    start = time.perf_counter()
    try:
        check_args(args)
        rank, world_size, device = setup_distributed(args)
    except ValueError as e:  # every rank meets these alike: rank 0 says them
        raise e if run.is_rank0() else run.FailedOnRank0(run.exit_code(e)) from None
    rank0 = run.Rank0(rank, world_size, device)
    with contextlib.ExitStack() as on_exit:
        if world_size > 1:
            on_exit.callback(rank0.close)
        # Only rank 0 reads the checkpoint and writes the run's files.
        ckpt = rank0.shared(run.read_resume, args, RESUME_FREE_FLAGS)
        # A fresh run may start from another run's weights, read before any work; a resumed one has its own.
        source = None
        if args.init_from and ckpt is None:
            source, _ = rank0.first(run.load_model, args.init_from, "--init-from")
        rank0(run.claim_output_dir, args, on_exit)
        torch.manual_seed(data.derive_seed(args.seed, "init"))

        dataset = load_data(args, rank0)
        loader = rank0.first(build_loader, args, dataset, device, rank, world_size)
        mix = data.BatchMix(len(dataset.classes), args.mixup_alpha, args.cutmix_alpha, args.mix_prob)
        # Like the training set, the test set lives on the device as uint8: evaluation copies nothing per chunk.
        test_set = (dataset.test_images.to(device), dataset.test_labels.to(device), dataset.mean, dataset.std)

        model = rank0.first(build_model, args, dataset, device, source)
        model_without_ddp = model.to(device)
        optimizers = build_optimizers(args, model, device)
        schedulers = [build_scheduler(optimizer, args, loader.sampler.steps_per_epoch) for optimizer in optimizers]
        precision = build_precision(args, device)
        model = compile_model(model, args, device, precision, loader.batch)
        compiled = model is not model_without_ddp
        if world_size > 1:
            # DDP also broadcasts rank 0's initial weights, so every rank starts (and whitens) identically.
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        state, resumed = TrainingState(device, args.log_every), ckpt is not None
        if resumed:
            restore(ckpt, model_without_ddp, optimizers, schedulers, precision.scaler, state)
        del ckpt  # its tensors now live in the model and the optimizers
        cfg, info, steps_per_epoch = asdict(model_without_ddp.cfg), run.run_info(device), loader.sampler.steps_per_epoch
        facts = dict(params=count_parameters(model_without_ddp), forward_macs=forward_macs(model_without_ddp.cfg),
                     world_size=world_size, dataset=args.dataset, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                     total_steps=args.epochs * steps_per_epoch, precision=precision.name, compiled=compiled,
                     config=cfg, args=vars(args), **info)

        def content():  # the checkpoint: all a resume needs, and what predict.py needs to use the model
            return {"model": model_without_ddp.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                    "schedulers": [s.state_dict() for s in schedulers], "scaler": precision.scaler.state_dict(),
                    **state.checkpoint(), "args": vars(args), "config": cfg, "run": info,
                    "data": {"classes": dataset.classes, "mean": dataset.mean, "std": dataset.std}}
        job = run.Run(args, rank0, state, content, facts, on_exit, resumed=resumed)
        failure = train_epochs(model, model_without_ddp, optimizers, schedulers, loader, mix, test_set, precision, job)
        return job.finish(failure, time.perf_counter() - start)


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
