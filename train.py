"""Train a PoorViT (arXiv 2501.06220) on CIFAR-10 and friends, on one process or many via torchrun.

    python train.py --download --output-dir runs/baseline                  # the paper's baseline, 1 process
    torchrun --standalone --nproc_per_node=4 train.py --batch-size 1024 ...  # DDP; --batch-size is global

Outputs in --output-dir: metrics.jsonl (one JSON record per log point and evaluation), checkpoint.pt (after every
epoch, written atomically) and summary.json (at the end of every invocation).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from lion import Lion
from model import CLS_POOLS, POS_EMBEDS, ViT, ViTConfig, count_parameters, forward_macs

EVAL_CHUNK = 1024
# Flags that may differ between a run and its --resume: where and how it runs, not what it computes.
RESUME_FREE_FLAGS = {"resume", "output_dir", "data_dir", "download", "workers", "device", "compile", "log_every",
                     "stop_after_epochs"}


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
    parser.add_argument("--crop-padding", default=4, type=int, help="random 32x32 crop after zero padding (pixels; 0: off)")
    parser.add_argument("--auto-augment", default="cifar10", type=str,
                        help=f"AutoAugment policy, one of {', '.join(data.AUTO_AUGMENT_POLICIES)}")
    parser.add_argument("--random-erase", default=0.25, type=float, help="random erasing probability per image")
    parser.add_argument("--mixup-alpha", default=1.0, type=float, help="Mixup Beta(alpha, alpha); 0: no Mixup")
    parser.add_argument("--cutmix-alpha", default=1.0, type=float, help="CutMix Beta(alpha, alpha); 0: no CutMix")
    parser.add_argument("--mix-prob", default=0.5, type=float,
                        help="probability that a batch is mixed (then CutMix or Mixup, 50/50)")
    parser.add_argument("--label-smoothing", default=0.1, type=float, help="label smoothing of the cross-entropy")
    parser.add_argument("--ra-reps", default=3, type=int, help="repeated augmentation: times each image is seen per epoch")
    # Model (mirrors model.ViTConfig)
    parser.add_argument("--patch-size", default=4, type=int, help="patch side (pixels)")
    parser.add_argument("--dim", default=192, type=int, help="token width")
    parser.add_argument("--depth", default=9, type=int, help="transformer blocks")
    parser.add_argument("--heads", default=12, type=int, help="attention heads (must divide --dim)")
    parser.add_argument("--mlp-ratio", default=2.0, type=float, help="MLP hidden width / --dim")
    parser.add_argument("--num-cls", default=1, type=int, help="CLS tokens")
    parser.add_argument("--cls-pool", default="concat", type=str, help=f"CLS outputs to head: {', '.join(CLS_POOLS)}")
    parser.add_argument("--pos-embed", default="learned", type=str, help=f"one of {', '.join(POS_EMBEDS)}")
    parser.add_argument("--latent", default="", type=str, help="low-rank projections, any of q, k, v (e.g. kv)")
    parser.add_argument("--latent-dim", default=64, type=int, help="rank of the low-rank projections")
    parser.add_argument("--shared-kv-latent", action="store_true", help="K and V share one latent (DeepSeek-V2)")
    parser.add_argument("--drop-path", default=0.1, type=float, help="stochastic depth rate of the last block")
    parser.add_argument("--whiten", action="store_true", help="whitening init of the patch embedding")
    parser.add_argument("--whiten-images", default=5000, type=int, help="training images used by --whiten")
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
    parser.add_argument("--resume", default=None, type=str, help="checkpoint.pt to continue from")
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
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers} must be >= 0")


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
            cls_pool=args.cls_pool, pos_embed=args.pos_embed, latent=args.latent, latent_dim=args.latent_dim,
            shared_kv_latent=args.shared_kv_latent, drop_path=args.drop_path,
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


def run_info(device):
    try:
        root = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        commit = (commit + ("-dirty" if dirty.strip() else "")) or "unknown"
    except OSError:
        commit = "unknown"
    import einops
    import torchvision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"git_commit": commit, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "einops": einops.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": name, "hostname": platform.node()}


def prepare_output_dir(args) -> Path:
    out = Path(args.output_dir)
    existing = [f for f in ("checkpoint.pt", "metrics.jsonl", "summary.json") if (out / f).exists()]
    if existing and not args.resume:
        raise ValueError(f"--output-dir {out} already holds a run ({', '.join(existing)}): "
                         f"pass --resume {out / 'checkpoint.pt'} to continue it, or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"--output-dir {out} is not writable")
    return out


def load_checkpoint(args, cfg):
    path = Path(args.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError for foreign or damaged files
        raise ValueError(f"--resume {path}: not a loadable checkpoint ({type(e).__name__})") from None
    if ckpt.get("config") != asdict(cfg):
        fields = sorted(k for k in asdict(cfg) if ckpt.get("config", {}).get(k) != asdict(cfg)[k])
        raise ValueError(f"--resume {path}: checkpoint is for a different model ({', '.join(fields)} differ)")
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


def main(args):
    check_args(args)
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    if args.output_dir is None:
        args.output_dir = str(Path(args.resume).parent) if args.resume else \
            f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
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
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        )
    mix = data.BatchMix(len(dataset.classes), args.mixup_alpha, args.cutmix_alpha, args.mix_prob)

    cfg = model_config(args, len(dataset.classes))
    model = ViT(cfg)
    if args.whiten:
        model.whiten_patch_embedding(data.normalize(dataset.train_images[: args.whiten_images], dataset.mean,
                                                    dataset.std))
    model.to(device)
    model_without_ddp = model
    optimizer = build_optimizer(args, model.parameters(), device)
    scheduler = build_scheduler(optimizer, args, sampler.steps_per_epoch)
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        # DDP also broadcasts rank 0's initial weights, so every rank starts (and whitens) identically.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, step, acc, best_acc, best_epoch, train_seconds = 0, 0, None, None, None, 0.0
    if args.resume:
        ckpt = load_checkpoint(args, cfg)
        model_without_ddp.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, acc = ckpt["epoch"], ckpt["step"], ckpt["last_acc"]
        best_acc, best_epoch, train_seconds = ckpt["best_acc"], ckpt["best_epoch"], ckpt["train_seconds"]
    info = run_info(device)
    params = count_parameters(model_without_ddp)
    log = MetricsLog(out / "metrics.jsonl", is_main, keep_until_step=step if args.resume else None)
    log.write(kind="run", epoch=start_epoch, step=step, params=params, world_size=world_size, workers=workers,
              config=asdict(cfg), args=vars(args), **info)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")

    total_steps = args.epochs * sampler.steps_per_epoch
    end_epoch = args.epochs if args.stop_after_epochs is None else min(args.epochs, start_epoch + args.stop_after_epochs)
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="train")
    run_start = time.perf_counter()
    timed_steps, timed_seconds, first_interval = 0, 0.0, True
    for epoch in range(start_epoch, end_epoch):
        model.train()
        sampler.set_epoch(epoch)
        loss_sum, interval_steps = torch.zeros((), device=device), 0
        interval_start = time.perf_counter()
        for batch_index, (images, labels) in enumerate(loader):
            # Dropout paths and batch mixing draw from a seed fixed by (seed, rank, step): resumes replay exactly.
            torch.manual_seed(data.derive_seed(args.seed, "step", rank, step))
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss_sum += train_step(model, optimizer, scheduler, images, labels, mix, autocast, args.label_smoothing)
            step += 1
            interval_steps += 1
            if step % args.log_every == 0 or batch_index + 1 == len(loader):
                mean_loss = loss_sum.item() / interval_steps  # the only host-device sync of the step loop
                seconds = time.perf_counter() - interval_start
                img_s = interval_steps * args.batch_size / seconds
                train_seconds += seconds
                if not first_interval:  # the first interval holds warm-up (and compilation): not timed
                    timed_steps, timed_seconds = timed_steps + interval_steps, timed_seconds + seconds
                first_interval = False
                lr = optimizer.param_groups[0]["lr"]
                log.write(kind="train", epoch=epoch + 1, step=step, lr=lr, loss=mean_loss, img_s=img_s,
                          ms_per_step=1000 * seconds / interval_steps)
                progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                progress.update(interval_steps)
                loss_sum.zero_()
                interval_steps, interval_start = 0, time.perf_counter()
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            acc, test_loss = evaluate(model, dataset.test_images, dataset.test_labels, dataset.mean, dataset.std,
                                      device, rank, world_size, autocast)
            if best_acc is None or acc > best_acc:
                best_acc, best_epoch = acc, epoch + 1
            log.write(kind="eval", epoch=epoch + 1, step=step, acc=acc, loss=test_loss)
            if is_main:
                progress.write(f"epoch {epoch + 1}: test acc {acc:.2f}% (best {best_acc:.2f}% at epoch {best_epoch})")
        if is_main:
            state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step, "last_acc": acc, "best_acc": best_acc,
                     "best_epoch": best_epoch, "train_seconds": train_seconds, "args": vars(args),
                     "config": asdict(cfg), "run": info}
            atomic_write(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
    progress.close()

    complete = step == total_steps
    summary = {
        "complete": complete, "final_acc": acc if complete else None, "best_acc": best_acc, "best_epoch": best_epoch,
        "epochs": args.epochs, "epochs_done": step // sampler.steps_per_epoch, "steps": step,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - run_start,
        "img_per_s": timed_steps * args.batch_size / timed_seconds if timed_seconds else None,
        "ms_per_step": 1000 * timed_seconds / timed_steps if timed_steps else None, "params": params,
        "forward_macs": forward_macs(cfg), "world_size": world_size, "dataset": args.dataset,
        "config": asdict(cfg), "args": vars(args), **info,
    }
    if is_main:
        write_json(out / "summary.json", summary)
        if complete:
            print(f"test accuracy: final {acc:.2f}% (epoch {args.epochs}), best {best_acc:.2f}% (epoch {best_epoch})"
                  f"; {train_seconds:.0f} s of training; {out}")
        else:
            print(f"stopped after epoch {step // sampler.steps_per_epoch} of {args.epochs}; continue with "
                  f"--resume {out / 'checkpoint.pt'}")
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
