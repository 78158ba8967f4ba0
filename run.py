"""The machinery of a PoorViTs training run (train.py is the recipe): the device; the job's processes and the work
rank 0 does for them; the locked output folder and the checkpoint a run continues; the run's progress; and the
session that keeps its records (metrics.jsonl, checkpoint.pt, summary.json, written by files.py), answers
preemption signals and says once, by rank 0, how the run ended, with an exit code a job scheduler can act on.
predict.py and analyze.py read checkpoints through here.
"""
import argparse
import contextlib
import errno
import fcntl
import importlib.metadata
import json
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import einops
import torch
import torch.distributed as dist
import torchvision
from tqdm import tqdm

import data
import files
from model import RETIRED_FIELDS, ViT, ViTConfig


# ---- what can go wrong: each cause a job scheduler can act on has its exit code (docs/reliability.md)
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops without saving, and the last good checkpoint stays."""


class OutputDirInUse(RuntimeError):
    """Another process holds the run's output folder (its .lock)."""


class FailedOnRank0(Exception):
    """This rank's view of a failure that rank 0 reports: the process ends quietly with the same exit code."""

    def __init__(self, exit_code):
        super().__init__(f"rank 0 failed (exit code {exit_code})")
        self.exit_code = exit_code


# 2 and 3 need a person; after 4-7 the environment is fixed and the run continued with --resume auto. Also 1: an
# unexpected error (with its traceback), 128 + N: stopped by signal N.
EXIT_CODES = {ValueError: 2, FileNotFoundError: 2, NonFiniteLoss: 3, data.DownloadError: 4, files.DiskFull: 5,
              OutputDirInUse: 6, torch.OutOfMemoryError: 7}
NO_BAD_STEP = 2**62  # what TrainingState.first_bad_step gives when every loss of the interval was finite


def exit_code(error) -> int:
    return next((code for kind, code in EXIT_CODES.items() if isinstance(error, kind)), 1)


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"


def launched_as_rank0() -> bool:
    """Whether torchrun started this process as rank 0, or started no processes at all. Before the process group
    exists, this is the process that says what every process would say."""
    return os.environ.get("RANK", "0") == "0"


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line (like every other error of train.py), and once under torchrun."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if launched_as_rank0() else None)


def note(text, kind="note"):
    if launched_as_rank0():
        tqdm.write(f"train.py: {kind}: {text}", file=sys.stderr)  # leaves the progress bar whole


# ---- the device
def device_of(name):
    """The device of `--device name` (cuda, cuda:N, cpu). Unset, it is cuda on a build of torch with CUDA, which must
    then start: a GPU run that silently trained on the CPU would report hours of the wrong thing. Otherwise cpu."""
    gpu_build = torch.version.cuda or torch.version.hip
    if name is None and not gpu_build:
        return torch.device("cpu")
    if name is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name}: choose cpu, cuda or cuda:N")
    device = torch.device(name or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        try:
            torch.cuda.init()
            why = "no CUDA device is visible"
        except Exception as e:  # the driver's own reason: missing, too old for this build, ...
            why = first_line(e)
        asked = f"--device {name}" if name else "--device unset means cuda on a CUDA build of torch"
        raise ValueError(f"{asked}, but CUDA cannot start (torch {torch.__version__}, CUDA {torch.version.cuda}): "
                         f"{why}; --device cpu runs on the CPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def library_versions(device):
    """CUDA and cuDNN as torch was built with them, Triton, and on a GPU its driver (nvidia-smi): what a GPU's speed
    and a compiled graph depend on beyond torch."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    driver = None
    if device.type == "cuda":
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=60).stdout.strip().split("\n")[0]
        except (OSError, subprocess.SubprocessError):
            pass  # no nvidia-smi on this machine: the driver goes unrecorded
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "triton": triton,
            "driver": driver or None}


def git_commit():
    """This code's commit, with -dirty where the working tree has changes; "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    if dirty.strip():
        commit += "-dirty"
    return commit or "unknown"


def run_info(device):
    return {"git_commit": git_commit(), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "einops": einops.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": device_name(device), "hostname": platform.node(), **library_versions(device)}


# ---- the job's processes
class Ranks:
    """This process's place in the job (its rank, the world size, its device) and the three ways rank 0 does work
    for every process. Whatever rank 0 does, every rank learns whether it failed (one broadcast): a failure stops
    them all, rank 0 raising the error and the others FailedOnRank0, which ends them quietly."""

    def __init__(self, rank, world_size, device):
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def rank0_only(self, work, *args):
        """Runs work(*args) on rank 0 alone (claiming the output folder, writing a file). Returns its result on rank
        0 and None on the others."""
        error = None
        result = None
        if self.rank == 0:
            try:
                result = work(*args)
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

    def rank0_result(self, work, *args):
        """Runs work(*args) on rank 0 alone and sends its result to every rank (reading the checkpoint to continue:
        the other nodes need not see rank 0's files)."""
        result = [self.rank0_only(work, *args)]
        if self.world_size > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def rank0_first(self, work, *args):
        """Runs work(*args) on rank 0, then on every other rank (loading the dataset): an error that every rank would
        meet is said once, by rank 0."""
        result = self.rank0_only(work, *args)
        if self.rank == 0:
            return result
        return work(*args)

    def close(self):
        """Destroys the process group after a pause with the GIL released, for gloo's threads to free their last
        work, which needs the GIL: the thread that drops the group's last reference joins them while holding it (a
        deadlock seen under torch 2.11)."""
        time.sleep(0.2)
        dist.destroy_process_group()


# ---- the output folder and the checkpoint to continue
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")


def lock_output_dir(out: Path, on_exit: contextlib.ExitStack):
    """Takes an OS-held lock on out/.lock, which names its holder, for the life of the run: the kernel drops it when
    the process ends, kill -9 included. POSIX locks (lockf), not flock: no forked child inherits one, or keeps it."""
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
    """Creates --output-dir and locks it for this run. Removes the temporary files of a run killed while writing
    (they may hold the space it needs), and refuses a folder that holds another run unless this run resumes it. At
    exit (still holding the lock), a folder where the run wrote nothing is left as it was found."""
    out = Path(args.output_dir)
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_output_dir(out, on_exit)
    except OSError as e:
        raise ValueError(f"--output-dir {out} is not a writable folder ({e.strerror or e})") from None
    on_exit.callback(files.remove_unused, out, created)  # before the lock's release: callbacks run last first
    for name in RUN_FILES:
        files.temp_path(out / name).unlink(missing_ok=True)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not args.resume:
        raise ValueError(f"--output-dir {out} already holds a run ({', '.join(existing)}): "
                         f"pass --resume {out / 'checkpoint.pt'} to continue it, or choose another --output-dir")


def read_export(path, flag):
    """export.py's poorvit.safetensors as read_checkpoint gives a checkpoint: weights, config, data and provenance
    (no optimizer state). safetensors is imported only when such a file is read: training never needs it."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        fields = {key: json.loads(value) for key, value in metadata.items() if key != "format"}
        ckpt = {**fields["provenance"], "model": tensors, "config": fields["config"],
                "data": {key: fields[key] for key in ("classes", "mean", "std")}}
    except KeyError as e:
        raise ValueError(f"{flag} {path}: not a model written by export.py (no {e} in its metadata)") from None
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...; json its own
        raise ValueError(f"{flag} {path}: not a readable safetensors file ({first_line(e)})") from None
    if not {"args", "step"} <= ckpt.keys():
        raise ValueError(f"{flag} {path}: not a model written by export.py (its provenance lacks args or step)")
    return ckpt


def read_checkpoint(path, flag):
    """Loads a train.py checkpoint without running any code from it (weights_only), or export.py's .safetensors file.
    A damaged or foreign file is a ValueError naming `flag`."""
    if Path(path).suffix == ".safetensors":
        return read_export(path, flag)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for damaged or foreign files
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # a class or function it would call
            raise ValueError(f"{flag} {path}: refused: it holds objects that would run code when loaded; only "
                             f"tensors and plain values are loaded (weights_only=True)") from None
        raise ValueError(f"{flag} {path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "args", "step", "data"} <= ckpt.keys():
        raise ValueError(f"{flag} {path}: not a checkpoint written by train.py")
    return ckpt


def load_model(path, flag):
    """The trained ViT of a checkpoint, on the CPU, and the checkpoint; or a one-line ValueError naming `flag`."""
    ckpt = read_checkpoint(path, flag)
    try:
        config = {key: value for key, value in ckpt["config"].items() if (key, value) not in RETIRED_FIELDS}
        model = ViT(ViTConfig(**config))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{flag} {path}: not a model this code can build ({first_line(e)})") from None
    return model, ckpt


def read_resume(args, free_flags):
    """The checkpoint this run continues, or None where it starts: --resume PATH, or with --resume auto the output
    folder's checkpoint if it has one. Refused if it was trained with flags other than `free_flags` (those say
    where and how a run goes, not what it computes)."""
    if args.resume is None:
        return None
    path = Path(args.output_dir) / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        if args.resume == "auto":
            return None
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    ckpt = read_checkpoint(path, "--resume")
    changed = sorted(k for k, v in vars(args).items() if k not in free_flags and ckpt["args"].get(k) != v)
    if changed:
        differences = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)!r} -> {vars(args)[k]!r}" for k in changed]
        # A run's schedule ends at its --epochs: training on is a new run from its weights.
        hint = f"; to train it longer: --init-from {path} --output-dir NEW_DIR" if "epochs" in changed else ""
        raise ValueError(f"--resume {path}: flags differ from the checkpoint's run: {', '.join(differences)}{hint}")
    return ckpt


# ---- the run's progress
class TrainingState:
    """The run's progress, which its checkpoint carries: the step, the test accuracies, the training time, and the
    losses of the open log interval (so that a run resumed at any step logs what an uninterrupted run logs). Its
    speed leaves out this invocation's first log interval, which holds the warm-up (compilation, caches)."""

    def __init__(self, device, log_every):
        self.step = 0
        self.acc = None  # the last evaluation's test accuracy, %
        self.best_acc = None
        self.best_epoch = None
        self.train_seconds = 0.0
        # The interval's losses stay on the device until a log point: a step adds its loss by one copy, no sync.
        self.losses = torch.zeros(log_every, device=device)
        self.interval_steps = 0
        self.interval_start = time.perf_counter()
        self.intervals_logged = 0
        self.timed_steps = 0
        self.timed_seconds = 0.0

    def start_interval(self):
        """Restarts the interval's clock: what happened since (an evaluation, a save) is not training time."""
        self.interval_start = time.perf_counter()

    def add(self, loss):
        self.losses[self.interval_steps] = loss
        self.interval_steps += 1
        self.step += 1

    def first_bad_step(self):
        """The interval's first step whose loss was NaN or infinite (NO_BAD_STEP if none), as a tensor on the
        device: reading it is the sync."""
        losses = self.losses[: self.interval_steps]
        steps = torch.arange(self.step - len(losses), self.step, device=losses.device)
        none = torch.full((1,), NO_BAD_STEP, device=losses.device)
        return torch.cat([torch.where(losses.isfinite(), NO_BAD_STEP, steps), none]).amin()

    def end_interval(self, lr, batch_size) -> dict:
        """The mean loss and speed of the steps since the last log point; starts the next interval."""
        steps = self.interval_steps
        seconds = time.perf_counter() - self.interval_start
        self.train_seconds += seconds
        if self.intervals_logged > 0:
            self.timed_steps += steps
            self.timed_seconds += seconds
        self.intervals_logged += 1
        loss = self.losses[:steps].sum().item() / steps
        self.interval_steps = 0
        self.start_interval()
        return {"lr": lr, "loss": loss, "img_s": steps * batch_size / seconds, "ms_per_step": 1000 * seconds / steps}

    def add_eval(self, epoch, acc):
        """Takes a test accuracy (%) measured after `epoch` (counted from 1)."""
        self.acc = acc
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc = acc
            self.best_epoch = epoch

    def speed(self, batch_size) -> dict:
        """Images per second and ms per step over the timed intervals (None where there were none)."""
        if not self.timed_steps:
            return {"img_per_s": None, "ms_per_step": None}
        return {"img_per_s": self.timed_steps * batch_size / self.timed_seconds,
                "ms_per_step": 1000 * self.timed_seconds / self.timed_steps}

    def checkpoint(self):
        return {"step": self.step, "last_acc": self.acc, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds, "interval_losses": self.losses[: self.interval_steps].tolist()}

    def load(self, ckpt):
        self.step = ckpt["step"]
        self.acc = ckpt["last_acc"]
        self.best_acc = ckpt["best_acc"]
        self.best_epoch = ckpt["best_epoch"]
        self.train_seconds = ckpt["train_seconds"]
        # The interval goes on to the next log point, at most --log-every steps on, which may have changed.
        saved = ckpt["interval_losses"]
        self.losses = torch.zeros(len(saved) + len(self.losses), device=self.losses.device)
        self.losses[: len(saved)] = torch.tensor(saved)
        self.interval_steps = len(saved)


# ---- the session: this invocation's records, signals and ending
def keep_records_until(path: Path, step):
    """On resume, drops the metrics records after the checkpoint's `step` (they are redone), and a partial last line
    (a write cut short), which is said once."""
    if not path.exists():
        return
    whole, _, partial = path.read_bytes().rpartition(b"\n")
    if partial:
        note(f"dropped the partial last line of {path} ({len(partial)} bytes, a write cut short): its record is redone")
    kept = []
    for number, line in enumerate(whole.splitlines(), 1):
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {number} is not a metrics record ({e})") from None
        if record_step <= step:
            kept.append(line + b"\n")
    files.atomic_write(path, b"".join(kept))


def announce(facts, args):
    """Says once (rank 0), before the first step, what the run is about to do; warns where the global batch exceeds
    the training set, so that an epoch is a step or two."""
    where = args.data_dir if facts["dataset"] in data.FROM_FOLDER else "built in"
    classes = ", ".join(facts["classes"][:10]) + (", ..." if len(facts["classes"]) > 10 else "")
    images = " / ".join(f"{count:,} {split}" for split, count in facts["images"].items())
    note(f"{facts['dataset']} ({where}): {len(facts['classes'])} classes ({classes}), {images} images; "
         f"{facts['params']:,} parameters; global batch {args.batch_size}, {facts['steps_per_epoch']} steps per epoch "
         f"x {args.epochs} epochs; {facts['device']} ({facts['device_name']}), {facts['precision']}", "start")
    if args.batch_size > facts["images"]["train"]:
        note(f"--batch-size {args.batch_size} exceeds the {facts['images']['train']} training images: an epoch is "
             f"{facts['steps_per_epoch']} step(s); a smaller --batch-size takes more steps", "warning")


class Session:
    """One invocation of a run on one rank, in its locked output folder: the metrics log (records after the checkpoint
    are redone), the checkpoint writer, the signals and the progress bar. SIGTERM or SIGINT stops the run at the next
    step boundary (under DDP: the next log point or save, where the ranks agree) after a checkpoint; a second one at
    once, without saving."""

    def __init__(self, args, ranks, state, content, facts, on_exit, resumed):
        out = Path(args.output_dir)
        self.args = args
        self.ranks = ranks
        self.state = state
        self.content = content  # a function that returns what the checkpoint holds
        self.facts = facts  # what the run is: its size, flags and machine, for its first record and its summary
        self.metrics = out / "metrics.jsonl"  # a JSON record per line, each added whole by one write (rank 0)
        self.writer = files.CheckpointWriter(out / "checkpoint.pt", ranks)
        on_exit.callback(self.writer.finish)  # runs before the output folder's lock is released
        self.signum = None
        self.stopped = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            on_exit.callback(signal.signal, sig, signal.signal(sig, self._handle))  # the old handler, back at exit
        ranks.rank0_only(keep_records_until, self.metrics, state.step if resumed else -1)
        self.record(kind="run", epoch=state.step // facts["steps_per_epoch"], **facts)
        announce(facts, args)
        self.progress = tqdm(total=facts["total_steps"], initial=state.step, disable=ranks.rank != 0,
                             dynamic_ncols=True, desc="train")

    def record(self, **record):
        line = json.dumps({**record, "step": self.state.step}) + "\n"
        self.ranks.rank0_only(files.append_line, self.metrics, line.encode())

    def log_train(self, epoch, lr):
        metrics = self.state.end_interval(lr, self.args.batch_size)
        self.record(kind="train", epoch=epoch + 1, **metrics)
        self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                  img_s=f"{metrics['img_s']:.0f}")
        self.progress.update(self.state.step - self.progress.n)

    def log_eval(self, epoch, acc, loss):
        self.state.add_eval(epoch + 1, acc)
        self.record(kind="eval", epoch=epoch + 1, acc=acc, loss=loss)
        if self.ranks.rank == 0:
            self.progress.write(f"epoch {epoch + 1}: test acc {acc:.2f}% (best {self.state.best_acc:.2f}% at epoch "
                                f"{self.state.best_epoch})")

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def stop_asked(self):
        """A signal came, on a single process (under DDP the ranks learn of it at the next agreement)."""
        return self.ranks.world_size == 1 and self.signum is not None

    def agree_on_stop_and_losses(self, epoch):
        """At log points, saves and a stop asked for: the ranks agree (collective calls) on whether to stop and on
        the first step whose loss was NaN or infinite, which ends the run."""
        bad = self.state.first_bad_step()
        if self.ranks.world_size > 1:
            asked = torch.tensor(self.signum or 0, device=self.ranks.device)
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            self.signum = int(asked) or None
        self.stopped = self.signum is not None
        bad_step = int(bad)
        if bad_step != NO_BAD_STEP:
            raise NonFiniteLoss(f"the loss became NaN or infinite at step {bad_step} (epoch {epoch + 1}); stopped "
                                f"without saving")

    def save(self):
        self.writer.save(self.content)

    def explain(self, error):
        """A failure met while training, as the user reads it: what happened, the last good checkpoint, what to do."""
        last_good = self.writer.last_good()
        if isinstance(error, NonFiniteLoss):
            return NonFiniteLoss(f"{error}: {last_good}")
        if isinstance(error, files.DiskFull):
            return files.DiskFull(f"{error}; {last_good}: free space, then --resume auto continues the run")
        if isinstance(error, torch.OutOfMemoryError):
            return torch.OutOfMemoryError(
                f"out of memory after {self.state.step} steps at --batch-size {self.args.batch_size} over "
                f"{self.ranks.world_size} process(es); {last_good}: free the device's memory, then --resume auto "
                f"continues the run; or start a new run that needs less: a smaller --batch-size, more processes, --amp")
        return error

    def summary(self, failure, seconds) -> dict:
        state = self.state
        complete = state.step == self.facts["total_steps"]
        return {
            "complete": complete, "final_acc": state.acc if complete else None, "best_acc": state.best_acc,
            "best_epoch": state.best_epoch, "epochs_done": state.step // self.facts["steps_per_epoch"],
            "train_seconds": state.train_seconds, "total_seconds": seconds, **state.speed(self.args.batch_size),
            "stopped_by_signal": self.signum if self.stopped else None, **self.facts, "steps": state.step,
            "failed": str(failure) if failure else None,
        }

    def finish(self, failure, seconds):
        """Writes summary.json (rank 0) and says how the run ended; raises the failure that ended it."""
        self.progress.close()
        summary = self.summary(failure, seconds)
        out = Path(self.args.output_dir)
        # Not a collective call: a rank that failed alone (out of memory) must not wait here for the others.
        if self.ranks.rank == 0:
            try:
                files.atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
            except files.DiskFull as e:
                failure = failure or self.explain(e)
        if failure:
            raise failure
        state = self.state
        if self.ranks.rank == 0 and summary["complete"]:
            print(f"test accuracy: final {state.acc:.2f}% (epoch {self.args.epochs}), best {state.best_acc:.2f}% "
                  f"(epoch {state.best_epoch}); {state.train_seconds:.0f} s of training; {out}")
        elif self.ranks.rank == 0:
            print(f"stopped at step {state.step} of {self.facts['total_steps']} (epoch "
                  f"{state.step / self.facts['steps_per_epoch']:.2f}); continue with --resume {out / 'checkpoint.pt'} "
                  f"(or --resume auto)")
        return summary
