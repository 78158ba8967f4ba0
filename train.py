"""Train a PoorViT (arXiv 2501.06220) on CIFAR-10 and friends, on one process or many via torchrun.

    python train.py --download --output-dir runs/baseline                  # the paper's baseline, 1 process
    torchrun --standalone --nproc_per_node=4 train.py --batch-size 1024 ...  # DDP; --batch-size is global

Outputs in --output-dir: metrics.jsonl (one JSON record per log point and evaluation), checkpoint.pt (after every
epoch, written atomically) and summary.json (at the end of every invocation).
"""
import argparse
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path

import einops
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from lion import Lion
from model import CLS_POOLS, POS_EMBEDS, ViT, ViTConfig, count_parameters, forward_macs, transfer_weights

EVAL_CHUNK = 1024
# Flags that may differ between a run and its --resume: where and how it runs, not what it computes.
RESUME_FREE_FLAGS = {"resume", "output_dir", "data_dir", "download", "workers", "device", "compile", "log_every",
                     "stop_after_epochs", "save_every"}


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train a small ViT (PoorViTs).", add_help=True)
    # Data
    parser.add_argument("--dataset", default="cifar10", type=str, help=f"one of {', '.join(data.DATASETS)}")
    parser.add_argument("--data-dir", default="data", type=str,
                        help="dataset root (CIFAR: holds cifar-10-batches-py; imagefolder: holds train/ and val/)")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR-10/100 into --data-dir if missing")
    parser.add_argument("--data-loader", default="device", type=str,
                        help="device: dataset and batched per-image augmentation on the training device (fast); "
                             "workers: torchvision's per-image pipeline in DataLoader worker processes")
    parser.add_argument("-j", "--workers", default=None, type=int,
                        help="--data-loader workers: processes per rank (default: CPU cores per rank, at most 8)")
    # Augmentation (defaults: the paper's baseline)
    parser.add_argument("--hflip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip")
    parser.add_argument("--crop-padding", default=4, type=int,
                        help="random 32x32 crop after zero padding (pixels; 0: off)")
    parser.add_argument("--auto-augment", default="cifar10", type=str,
                        help=f"AutoAugment policy, one of {', '.join(data.AUTO_AUGMENT_POLICIES)}")
    parser.add_argument("--random-erase", default=0.25, type=float, help="random erasing probability per image")
    parser.add_argument("--mixup-alpha", default=1.0, type=float, help="Mixup Beta(alpha, alpha); 0: no Mixup")
    parser.add_argument("--cutmix-alpha", default=1.0, type=float, help="CutMix Beta(alpha, alpha); 0: no CutMix")
    parser.add_argument("--mix-prob", default=0.5, type=float,
                        help="probability that a batch is mixed (then CutMix or Mixup, 50/50)")
    parser.add_argument("--label-smoothing", default=0.1, type=float, help="label smoothing of the cross-entropy")
    parser.add_argument("--ra-reps", default=3, type=int,
                        help="repeated augmentation: times each image is seen per epoch")
    # Model (mirrors model.ViTConfig)
    parser.add_argument("--patch-size", default=4, type=int, help="patch side (pixels)")
    parser.add_argument("--dim", default=192, type=int, help="token width")
    parser.add_argument("--depth", default=9, type=int, help="transformer blocks")
    parser.add_argument("--heads", default=12, type=int, help="attention heads (must divide --dim)")
    parser.add_argument("--mlp-ratio", default=2.0, type=float, help="MLP hidden width / --dim")
    parser.add_argument("--num-cls", default=1, type=int, help="CLS tokens")
    parser.add_argument("--cls-pool", default="concat", type=str, help=f"CLS outputs to head: {', '.join(CLS_POOLS)}")
    parser.add_argument("--pos-embed", default="learned", type=str, help=f"one of {', '.join(POS_EMBEDS)}")
    parser.add_argument("--patch-init", default="pytorch", type=str,
                        help="patch-embedding init: pytorch (the seed's Conv2d default, U(+-1/sqrt(3*p*p))) or "
                             "trunc_normal (std 0.02, as the other linears)")
    parser.add_argument("--latent", default="", type=str,
                        help="low-rank attention projections, any of q, k, v, o (o: the output projection; e.g. kv)")
    parser.add_argument("--latent-dim", default=64, type=int, help="rank of the low-rank attention projections")
    parser.add_argument("--shared-kv-latent", action="store_true", help="K and V share one latent (DeepSeek-V2)")
    parser.add_argument("--mlp-latent-dim", default=0, type=int,
                        help="rank of both MLP layers, each as down (no bias) -> up; 0: full rank")
    parser.add_argument("--drop-path", default=0.1, type=float, help="stochastic depth rate of the last block")
    parser.add_argument("--whiten", action="store_true", help="whitening init of the patch embedding")
    parser.add_argument("--whiten-images", default=5000, type=int, help="training images used by --whiten")
    parser.add_argument("--init-from", default=None, type=str,
                        help="checkpoint.pt whose weights start this run: each projection factorised by truncated "
                             "SVD to the ranks asked for (the same at full rank), the rest copied")
    # Optimisation
    parser.add_argument("--opt", default="adamw", type=str, help="adamw or lion")
    parser.add_argument("--lr", default=1e-3, type=float, help="peak learning rate (Lion: use 3-10x smaller)")
    parser.add_argument("--weight-decay", default=0.05, type=float, help="decoupled weight decay (Lion: 3-10x larger)")
    parser.add_argument("--batch-size", default=256, type=int, help="global batch (all processes together)")
    parser.add_argument("--epochs", default=100, type=int, help="epochs (one epoch: --ra-reps passes over the data)")
    parser.add_argument("--warmup-epochs", default=10, type=float, help="linear warm-up (epochs)")
    parser.add_argument("--warmup-lr", default=1e-6, type=float, help="learning rate at step 0")
    parser.add_argument("--min-lr", default=1e-6, type=float, help="learning rate at the end of the cosine")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (no effect on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    # Run
    parser.add_argument("--eval-every", default=5, type=int, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--log-every", default=50, type=int, help="log training loss every N steps")
    parser.add_argument("--seed", default=0, type=int, help="base seed; every random draw derives from it")
    parser.add_argument("--tag", default=None, type=str,
                        help="the table column this run belongs to (report.py groups runs by it; default: none)")
    parser.add_argument("--output-dir", default=None, type=str,
                        help="where metrics, checkpoint and summary go (default: runs/<dataset>-<time>)")
    parser.add_argument("--resume", default=None, type=str,
                        help="checkpoint.pt to continue from; auto: the output dir's checkpoint if there is one")
    parser.add_argument("--save-every", default=0, type=int,
                        help="also checkpoint every N steps (0: only after each epoch); a kill loses at most N steps")
    parser.add_argument("--stop-after-epochs", default=None, type=int,
                        help="end this invocation after N epochs, schedule unchanged; continue with --resume")
    parser.add_argument("--device", default=None, type=str, help="cuda or cpu (default: cuda when available)")
    return parser


def check_args(args):
    """Errors a user can cause, caught before any work: one line naming the flag."""
    positive = {"epochs": args.epochs, "batch-size": args.batch_size, "lr": args.lr, "eval-every": args.eval_every,
                "log-every": args.log_every, "warmup-lr": args.warmup_lr, "whiten-images": args.whiten_images}
    for flag, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{flag} {value} must be positive")
    if args.dataset not in data.DATASETS:
        raise ValueError(f"--dataset {args.dataset!r} is not one of {', '.join(data.DATASETS)}")
    if args.data_loader not in ("device", "workers"):
        raise ValueError(f"--data-loader {args.data_loader!r} is not one of device, workers")
    if args.opt not in ("adamw", "lion"):
        raise ValueError(f"--opt {args.opt!r} is not one of adamw, lion")
    if args.weight_decay < 0 or args.min_lr < 0:
        raise ValueError("--weight-decay and --min-lr must be >= 0")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} must be in [0, --epochs {args.epochs}]")
    if args.warmup_epochs and args.warmup_lr > args.lr:
        raise ValueError(f"--warmup-lr {args.warmup_lr} must not exceed --lr {args.lr}")
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label-smoothing {args.label_smoothing} must be in [0, 1)")
    if args.stop_after_epochs is not None and args.stop_after_epochs <= 0:
        raise ValueError(f"--stop-after-epochs {args.stop_after_epochs} must be positive")
    if args.save_every < 0:
        raise ValueError(f"--save-every {args.save_every} must be >= 0")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers} must be >= 0")
    if args.whiten and args.init_from:
        raise ValueError("--whiten and --init-from both set the patch embedding: choose one")
    if args.whiten and 3 * args.patch_size**2 > args.dim:
        raise ValueError(f"--whiten writes 3 * --patch-size**2 = {3 * args.patch_size**2} filters: it needs "
                         f"--dim >= that, got --dim {args.dim}")
    data.check_augmentation(args.crop_padding, args.auto_augment, args.random_erase)
    data.check_mixing(args.mixup_alpha, args.cutmix_alpha, args.mix_prob)
    model_config(args, num_classes=1)  # the model flags, checked before any data is fetched


def setup_distributed(device_name):
    """(rank, world_size, device); a no-op without torchrun. NCCL on CUDA, gloo on CPU."""
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu)")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def model_config(args, num_classes) -> ViTConfig:
    try:
        return ViTConfig(
            img_size=data.IMAGE_SIZE, patch_size=args.patch_size, num_classes=num_classes, dim=args.dim,
            depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, num_cls=args.num_cls,
            cls_pool=args.cls_pool, pos_embed=args.pos_embed, patch_init=args.patch_init, latent=args.latent,
            latent_dim=args.latent_dim, shared_kv_latent=args.shared_kv_latent, mlp_latent_dim=args.mlp_latent_dim,
            drop_path=args.drop_path,
        )
    except ValueError as e:
        # ViTConfig names its fields ("latent_dim=0"); a command-line user needs the flag ("--latent-dim 0").
        message = str(e)
        for name in sorted((f.name for f in fields(ViTConfig)), key=len, reverse=True):
            message = message.replace(f"{name}=", f"--{name.replace('_', '-')} ")
        raise ValueError(message) from None


def build_optimizer(args, params, device):
    if args.opt == "lion":
        return Lion(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                             fused=device.type == "cuda")


def build_scheduler(optimizer, args, steps_per_epoch):
    """Linear warm-up from --warmup-lr, then cosine to --min-lr at the last step; stepped every iteration."""
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=args.min_lr)
    if warmup == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=args.warmup_lr / args.lr, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def train_step(model, optimizer, scheduler, images, labels, mix, autocast, label_smoothing):
    """Mix the batch, one forward/backward/update, one scheduler step; returns the loss on the device (no sync)."""
    images, targets = mix(images, labels)
    with autocast:
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, images, labels, mean, std, device, rank, world_size, autocast):
    """Top-1 accuracy (%) and mean cross-entropy on the test set; each rank takes every world_size-th image."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    shard = slice(rank, None, world_size)
    for x, y in zip(images[shard].split(EVAL_CHUNK), labels[shard].split(EVAL_CHUNK)):
        x, y = data.normalize(x.to(device), mean, std), y.to(device)
        with autocast:
            logits = model(x)
        totals[0] += (logits.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[2] += len(y)
    if world_size > 1:
        dist.all_reduce(totals)
    correct, loss_sum, count = totals.tolist()
    return 100 * correct / count, loss_sum / count


def atomic_write(path: Path, write):
    """write(tmp_path), then rename over `path`: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


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


def prepare_output_dir(args) -> Path:
    out = Path(args.output_dir)
    existing = [f for f in ("checkpoint.pt", "metrics.jsonl", "summary.json") if (out / f).exists()]
    if existing and not args.resume:
        raise ValueError(f"--output-dir {out} already holds a run ({', '.join(existing)}): "
                         f"pass --resume {out / 'checkpoint.pt'} to continue it, or choose another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--output-dir {out} is not a writable folder ({e.strerror or e})") from None
    return out


def resume_checkpoint(args):
    """The checkpoint to resume from: --resume PATH, or with --resume auto the output dir's, if it has one."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        if args.output_dir is None:
            raise ValueError("--resume auto needs --output-dir (the run to continue)")
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


def load_checkpoint(path, args, cfg):
    """A checkpoint of this run, loaded without running any code from it (weights_only=True)."""
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


class MetricsLog:
    """metrics.jsonl on rank 0. On resume, records after the checkpoint's step are dropped: they are redone."""

    def __init__(self, path: Path, enabled: bool, keep_until_step=None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until_step]
            atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops them after saving a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops without saving, the last good checkpoint stays."""


class TrainingState:
    """Progress that a checkpoint carries: step, accuracies, training time, and the open log interval (so a resume
    at any step logs the same numbers as an uninterrupted run)."""

    def __init__(self, device):
        self.step, self.acc, self.best_acc, self.best_epoch, self.train_seconds = 0, None, None, None, 0.0
        self.loss_sum, self.interval_steps = torch.zeros((), device=device), 0
        # The first step whose loss was not finite (-1: none), kept on the device so that checking costs no sync.
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.interval_start = time.perf_counter()
        self.timed_steps, self.timed_seconds, self.first_interval = 0, 0.0, True
        self.saved_step = None  # the step of the newest checkpoint, None before the first

    def add(self, loss):
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~loss.isfinite(), self.step,
                                          self.first_bad_step)
        self.loss_sum += loss
        self.step += 1
        self.interval_steps += 1

    def raise_if_not_finite(self, epoch, checkpoint: Path):
        bad = int(self.first_bad_step)
        if bad >= 0:
            kept = "no checkpoint was saved before it"
            if self.saved_step is not None:
                kept = f"the last good checkpoint is {checkpoint} (step {self.saved_step})"
            raise NonFiniteLoss(f"the loss became NaN or infinite at step {bad} (epoch {epoch + 1}); stopped "
                                f"without saving: {kept}")

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
        self.saved_step = self.step
        return {"step": self.step, "last_acc": self.acc, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds,
                "interval": {"loss_sum": self.loss_sum.item(), "steps": self.interval_steps}}

    def load(self, ckpt):
        self.step, self.acc, self.best_acc = ckpt["step"], ckpt["last_acc"], ckpt["best_acc"]
        self.saved_step = self.step
        self.best_epoch, self.train_seconds = ckpt["best_epoch"], ckpt["train_seconds"]
        self.loss_sum.fill_(ckpt["interval"]["loss_sum"])
        self.interval_steps = ckpt["interval"]["steps"]


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
        """Sets `agreed` when the run should stop now; under DDP (a collective call) the ranks also share their
        first non-finite step."""
        if self.world_size > 1:
            # One MAX all-reduce: of the signal, and of minus the first bad step (none: -2**52), i.e. its minimum.
            bad = state.first_bad_step.double()
            flags = torch.stack([torch.tensor(float(self.signum or 0), dtype=torch.float64, device=self.device),
                                 torch.where(bad < 0, -(2.0**52), -bad)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.signum = self.signum or (int(flags[0]) or None)
            state.first_bad_step.fill_(-1 if flags[1] == -(2.0**52) else -int(flags[1]))
        self.agreed = self.signum is not None


def main(args):
    check_args(args)
    rank, world_size, device = setup_distributed(args.device)
    data.check_sampling(args.batch_size, args.ra_reps, world_size)
    is_main = rank == 0
    resume_path = resume_checkpoint(args)
    # A fresh run may start from another run's weights (checked before any work); a resumed one has its own.
    source = load_model(args.init_from, "--init-from")[0] if args.init_from and resume_path is None else None
    if args.output_dir is None:
        fresh = f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
        args.output_dir = str(resume_path.parent) if resume_path else fresh
    out = prepare_output_dir(args) if is_main else Path(args.output_dir)
    torch.manual_seed(data.derive_seed(args.seed, "init"))

    if args.download:
        if is_main:
            data.download(args.dataset, args.data_dir)
        if world_size > 1:
            dist.barrier()  # the other ranks read the files rank 0 fetched
    dataset = data.load_dataset(args.dataset, args.data_dir)
    sampler = data.RepeatedAugmentationSampler(len(dataset.train_images), args.batch_size, args.ra_reps, rank,
                                               world_size, args.seed)
    augmentation = (dataset.mean, dataset.std, args.hflip, args.crop_padding, args.auto_augment, args.random_erase)
    workers = 0
    if args.data_loader == "device":
        loader = data.DeviceLoader(dataset.train_images, dataset.train_labels, sampler,
                                   data.BatchAugment(*augmentation), device)
    else:
        workers = args.workers if args.workers is not None else min(8, (os.cpu_count() or 1) // world_size)
        loader = DataLoader(
            data.AugmentedImages(dataset.train_images, dataset.train_labels, data.train_transform(*augmentation)),
            batch_size=args.batch_size // world_size, sampler=sampler, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
        )
    mix = data.BatchMix(len(dataset.classes), args.mixup_alpha, args.cutmix_alpha, args.mix_prob)

    cfg = model_config(args, len(dataset.classes))
    model = ViT(cfg)
    if args.whiten:
        model.whiten_patch_embedding(data.normalize(dataset.train_images[: args.whiten_images], dataset.mean,
                                                    dataset.std))
    if source is not None:
        try:
            transfer_weights(source, model)
        except ValueError as e:
            raise ValueError(f"--init-from {args.init_from}: {e}") from None
    model.to(device)
    model_without_ddp = model
    optimizer = build_optimizer(args, model.parameters(), device)
    scheduler = build_scheduler(optimizer, args, sampler.steps_per_epoch)
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        # DDP also broadcasts rank 0's initial weights, so every rank starts (and whitens) identically.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    state = TrainingState(device)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, args, cfg)
        model_without_ddp.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.load(ckpt)
        del ckpt  # its tensors now live in the model and optimizer
    info = run_info(device)
    params = count_parameters(model_without_ddp)
    # On resume, records after the checkpoint are redone; a run restarted by --resume auto (no checkpoint) from zero.
    keep_until_step = state.step if resume_path else (-1 if args.resume else None)
    log = MetricsLog(out / "metrics.jsonl", is_main, keep_until_step=keep_until_step)
    log.write(kind="run", epoch=state.step // sampler.steps_per_epoch, step=state.step, params=params,
              world_size=world_size, workers=workers, config=asdict(cfg), args=vars(args), **info)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")

    def save():
        if is_main:
            ckpt = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), **state.checkpoint(), "args": vars(args),
                    "config": asdict(cfg), "run": info,
                    "data": {"classes": dataset.classes, "mean": dataset.mean, "std": dataset.std}}
            atomic_write(out / "checkpoint.pt", lambda tmp: torch.save(ckpt, tmp))

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    start_epoch, start_step = divmod(state.step, steps_per_epoch)
    end_epoch = args.epochs
    if args.stop_after_epochs is not None:
        end_epoch = min(args.epochs, start_epoch + args.stop_after_epochs)
    progress = tqdm(total=total_steps, initial=state.step, disable=not is_main, dynamic_ncols=True, desc="train")
    run_start = time.perf_counter()
    def train_epoch(epoch, stop):
        """One epoch (on resume, from its saved step); True if it stopped early, its checkpoint saved."""
        model.train()
        sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        state.interval_start = time.perf_counter()
        for images, labels in loader:
            # Dropout paths and batch mixing draw from a seed fixed by (seed, rank, step): resumes replay exactly.
            torch.manual_seed(data.derive_seed(args.seed, "step", rank, state.step))
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            state.add(train_step(model, optimizer, scheduler, images, labels, mix, autocast, args.label_smoothing))
            end_of_epoch = state.step % steps_per_epoch == 0
            log_now = state.step % args.log_every == 0 or end_of_epoch
            save_now = bool(args.save_every) and state.step % args.save_every == 0
            # Host-device syncs happen only here: at log points, saves, and once a stop is asked for.
            if log_now or save_now or stop.asked_locally():
                stop.agree(state)
                state.raise_if_not_finite(epoch, out / "checkpoint.pt")
            if log_now:
                metrics = state.log_interval(optimizer.param_groups[0]["lr"], args.batch_size)
                log.write(kind="train", epoch=epoch + 1, step=state.step, **metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                     img_s=f"{metrics['img_s']:.0f}")
                progress.update(state.step - progress.n)
            if not end_of_epoch and (save_now or stop.agreed):  # the epoch's end saves after its evaluation
                save()
                if stop.agreed:
                    return True
        return False

    failure = None
    with StopSignal(world_size, device) as stop:
        try:
            for epoch in range(start_epoch, end_epoch):
                if train_epoch(epoch, stop):
                    break
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                    acc, test_loss = evaluate(model, dataset.test_images, dataset.test_labels, dataset.mean,
                                              dataset.std, device, rank, world_size, autocast)
                    state.record_eval(acc, epoch + 1)
                    log.write(kind="eval", epoch=epoch + 1, step=state.step, acc=acc, loss=test_loss)
                    if is_main:
                        progress.write(f"epoch {epoch + 1}: test acc {acc:.2f}% "
                                       f"(best {state.best_acc:.2f}% at epoch {state.best_epoch})")
                save()
                if stop.agreed:
                    break
        except NonFiniteLoss as e:
            failure = e
    progress.close()

    complete = state.step == total_steps
    summary = {
        "complete": complete, "final_acc": state.acc if complete else None, "best_acc": state.best_acc,
        "best_epoch": state.best_epoch, "epochs": args.epochs, "epochs_done": state.step // steps_per_epoch,
        "steps": state.step, "train_seconds": state.train_seconds, "total_seconds": time.perf_counter() - run_start,
        **state.speed(args.batch_size), "params": params, "forward_macs": forward_macs(cfg),
        "world_size": world_size, "dataset": args.dataset, "stopped_by_signal": stop.signum if stop.agreed else None,
        "failed": str(failure) if failure else None,
        "config": asdict(cfg), "args": vars(args), **info,
    }
    if is_main:
        write_json(out / "summary.json", summary)
    if failure:
        raise failure
    if is_main:
        if complete:
            print(f"test accuracy: final {state.acc:.2f}% (epoch {args.epochs}), best {state.best_acc:.2f}% "
                  f"(epoch {state.best_epoch}); {state.train_seconds:.0f} s of training; {out}")
        else:
            print(f"stopped at step {state.step} of {total_steps} (epoch {state.step / steps_per_epoch:.2f}); "
                  f"continue with --resume {out / 'checkpoint.pt'} (or --resume auto)")
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        summary = main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(3)
    if summary["stopped_by_signal"]:
        sys.exit(128 + summary["stopped_by_signal"])  # the shell's convention for a process ended by a signal


if __name__ == "__main__":
    cli()
