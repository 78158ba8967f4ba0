"""The machinery of a PoorViTs training run (train.py is the recipe): its device; its locked output folder with
metrics.jsonl, checkpoint.pt (atomic, in the background) and summary.json; preemption signals; failures said once,
by rank 0, with an exit code a job scheduler can act on. predict.py and analyze.py read checkpoints through here.
"""
import argparse
import contextlib
import errno
import fcntl
import importlib.metadata
import io
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import einops
import torch
import torch.distributed as dist
import torchvision
from torch.utils._pytree import tree_map
from tqdm import tqdm

import data
from model import ViT, ViTConfig


# ---- what can go wrong: each cause a job scheduler can act on has its exit code (docs/reliability.md)
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops without saving, the last good checkpoint stays."""


class DiskFull(OSError):
    pass


class OutputDirInUse(RuntimeError):
    pass


class FailedOnRank0(Exception):
    """This rank's view of a failure that rank 0 reports: the process ends quietly with the same exit code."""

    def __init__(self, exit_code):
        super().__init__(f"rank 0 failed (exit code {exit_code})")
        self.exit_code = exit_code


# 2 and 3 need a person; after 4-7 the environment is fixed and the run continued with --resume auto. Also 1: an
# unexpected error (with its traceback), 128 + N: stopped by signal N.
EXIT_CODES = {ValueError: 2, FileNotFoundError: 2, NonFiniteLoss: 3, data.DownloadError: 4, DiskFull: 5,
              OutputDirInUse: 6, torch.OutOfMemoryError: 7}
NO_BAD_STEP = 2**62  # a first_bad_step when every loss of the interval was finite


def exit_code(error) -> int:
    return next((code for kind, code in EXIT_CODES.items() if isinstance(error, kind)), 1)


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]


def is_rank0() -> bool:
    """Rank 0, or a single process: the one that says what every rank would say."""
    return os.environ.get("RANK", "0") == "0"


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line (like every other error of train.py), once under torchrun."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if is_rank0() else None)


def note(text):
    if is_rank0():
        tqdm.write(f"train.py: note: {text}", file=sys.stderr)  # leaves the progress bar whole


# ---- the device
def device_of(name):
    """--device `name` (cuda, cuda:N, cpu). Unset: cuda on a build of torch with CUDA, which must then start (a GPU
    run that silently trained on the CPU would report hours of the wrong thing), else cpu."""
    gpu_build = torch.version.cuda or torch.version.hip
    if name is None and not gpu_build:
        return torch.device("cpu")
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
            "device_name": device_name(device), "hostname": platform.node(), **library_versions(device)}


class Rank0:
    """Work rank 0 alone does (claim the output dir, download, read the checkpoint, write files), whose outcome every
    rank learns (one broadcast): a failure stops all ranks, rank 0 raising the error, the others FailedOnRank0."""

    def __init__(self, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def __call__(self, work, *args):
        """work(*args)'s result on rank 0, None on the others."""
        error = result = None
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

    def shared(self, work, *args):
        """work(*args)'s result on rank 0, sent to every rank: other nodes need not see rank 0's files."""
        result = [self(work, *args)]
        if self.world_size > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def close(self):
        """destroy_process_group after a pause (GIL released) for gloo's threads to free their last work, which needs
        the GIL: the thread dropping the group's last reference joins them holding it (a deadlock seen, torch 2.11)."""
        time.sleep(0.2)
        dist.destroy_process_group()

    def first(self, work, *args):
        """work(*args) on rank 0, then on every other rank: an error all would meet is said once, by rank 0."""
        result = self(work, *args)
        return result if self.rank == 0 else work(*args)


# ---- files: written whole or not at all
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
    """Adds a line to a log by one write to an O_APPEND file: a kill leaves it whole or absent, and what of it a
    nearly full disk took is cut off again."""
    with writing(path, len(line)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            if os.write(fd, line) < len(line):
                os.ftruncate(fd, end)
                raise OSError(errno.ENOSPC, "the disk took only part of the line")
        finally:
            os.close(fd)


def copy_to_host(state):
    """`state` with every tensor copied into new CPU memory, which training does not change while it is written. From
    a GPU into pinned memory without blocking: the copies have landed once an event recorded after them has."""
    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t  # numbers, strings, None: immutable
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)
        return t.detach().to("cpu", copy=True)
    return tree_map(copy, state)


class CheckpointWriter:
    """Writes the checkpoint on a one-worker executor (training waits for neither serialisation nor fsync). Rank 0
    writes; `save` and `join` are collective (Rank0): a write's error stops every rank at the next save or join."""

    def __init__(self, path: Path, rank0: Rank0):
        self.path, self.rank0, self.write = path, rank0, None  # write: the future of the write in flight
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")

    def save(self, content):
        """Waits for the write in flight, then starts writing `content()` (called on rank 0)."""
        self.join()
        self.rank0(self._start, content)

    def join(self):
        self.rank0(self._wait)  # raises the error of the write in flight

    def finish(self):
        """Waits for the write in flight without a collective call, for a run that ends by another error or exits."""
        with contextlib.suppress(Exception):
            self._wait()
        self.executor.shutdown()

    def last_good(self) -> str:
        """The checkpoint on disk, once the write in flight has ended: written atomically, it is the last whole one."""
        self.finish()
        if not self.path.is_file():
            return "no checkpoint was saved yet"
        step = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)["step"]
        return f"the last good checkpoint is {self.path} (step {step})"

    def _start(self, content):
        snapshot, copied = copy_to_host(content()), None
        if self.rank0.device.type == "cuda":
            # A blocking-sync event: the writer sleeps on it instead of spinning a core.
            copied = torch.cuda.Event(blocking=True)
            copied.record(torch.cuda.current_stream(self.rank0.device))
        self.write = self.executor.submit(self._write, snapshot, copied)

    def _wait(self):
        write, self.write = self.write, None
        if write is not None:
            write.result()

    def _write(self, snapshot, copied):
        if copied is not None:
            copied.synchronize()
        buffer = io.BytesIO()  # in memory first: atomic_write then knows the size to report if the disk is full
        torch.save(snapshot, buffer)
        atomic_write(self.path, buffer.getbuffer())


# ---- the output folder and the checkpoint to continue
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")


def lock_output_dir(out: Path, on_exit: contextlib.ExitStack):
    """An OS-held lock on out/.lock, which names its holder, for the life of the run: the kernel drops it when the
    process ends, kill -9 included. POSIX locks (lockf), not flock: no forked child inherits one, or keeps it."""
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
    (they may hold the space it needs); refuses a folder holding another run unless resuming it."""
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


def read_checkpoint(path, flag):
    """A train.py checkpoint, loaded running no code from it (weights_only); a damaged or foreign one: ValueError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for damaged or foreign files
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # a class or function it would call
            raise ValueError(f"{flag} {path}: refused: it holds objects that would run code when loaded; only "
                             f"tensors and plain values are loaded (weights_only=True)") from None
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


def read_resume(args, free_flags):
    """The checkpoint this run continues (None: it starts): --resume PATH, or with --resume auto the output dir's if
    it has one; refused if it was trained with flags other than `free_flags` (where and how a run goes)."""
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
        raise ValueError(f"--resume {path}: flags differ from the checkpoint's run: "
                         + ", ".join(f"--{k.replace('_', '-')} {ckpt['args'].get(k)!r} -> {vars(args)[k]!r}"
                                     for k in changed))
    return ckpt


# ---- the run's records
def keep_records_until(path: Path, step):
    """On resume: drops the metrics records after the checkpoint's `step` (they are redone), and a partial last line
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
    atomic_write(path, b"".join(kept))


class Run:
    """One invocation's bookkeeping on one rank, in the locked output dir: metrics log (records after the checkpoint
    redone), checkpoint writer, signals, progress bar. SIGTERM or SIGINT stops the run at the next step boundary (under
    DDP: the next log point or save, where ranks agree) after a checkpoint; a second one at once, without saving."""

    def __init__(self, args, rank0, state, content, facts, on_exit, resumed):
        out = Path(args.output_dir)
        self.args, self.rank0, self.state, self.content, self.facts = args, rank0, state, content, facts
        self.metrics = out / "metrics.jsonl"  # a JSON record per line, each added whole by one write (rank 0)
        self.writer = CheckpointWriter(out / "checkpoint.pt", rank0)
        on_exit.callback(self.writer.finish)  # runs before the output dir's lock is released
        self.signum, self.stopped = None, False
        for sig in (signal.SIGTERM, signal.SIGINT):
            on_exit.callback(signal.signal, sig, signal.signal(sig, self._handle))  # the old handler, back at exit
        rank0(keep_records_until, self.metrics, state.step if resumed else -1)
        self.record(kind="run", epoch=state.step // facts["steps_per_epoch"], **facts)
        self.progress = tqdm(total=facts["total_steps"], initial=state.step, disable=rank0.rank != 0,
                             dynamic_ncols=True, desc="train")

    def record(self, **record):
        self.rank0(append_line, self.metrics, (json.dumps({**record, "step": self.state.step}) + "\n").encode())

    def log_train(self, epoch, lr):
        metrics = self.state.log_interval(lr, self.args.batch_size)
        self.record(kind="train", epoch=epoch + 1, **metrics)
        self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                  img_s=f"{metrics['img_s']:.0f}")
        self.progress.update(self.state.step - self.progress.n)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def stop_asked(self):
        return self.rank0.world_size == 1 and self.signum is not None

    def agree(self, epoch):
        """At log points, saves and a stop asked for: the ranks agree (collective calls) on a stop and on the first
        step whose loss was NaN or infinite, which stops the run."""
        bad = self.state.first_bad_step()
        if self.rank0.world_size > 1:
            asked = torch.tensor(self.signum or 0, device=self.rank0.device)
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            self.signum = int(asked) or None
        self.stopped, bad = self.signum is not None, int(bad)
        if bad != NO_BAD_STEP:
            raise NonFiniteLoss(f"the loss became NaN or infinite at step {bad} (epoch {epoch + 1}); stopped without "
                                f"saving")

    def log_eval(self, epoch, acc, loss):
        state = self.state
        if state.best_acc is None or acc > state.best_acc:
            state.best_acc, state.best_epoch = acc, epoch + 1
        state.acc = acc
        self.record(kind="eval", epoch=epoch + 1, acc=acc, loss=loss)
        if self.rank0.rank == 0:
            self.progress.write(f"epoch {epoch + 1}: test acc {acc:.2f}% (best {self.state.best_acc:.2f}% at epoch "
                                f"{self.state.best_epoch})")

    def save(self):
        self.writer.save(self.content)

    def explain(self, error):
        """A failure met while training, as the user reads it: what happened, the last good checkpoint, what to do."""
        last_good = self.writer.last_good()
        if isinstance(error, NonFiniteLoss):
            return NonFiniteLoss(f"{error}: {last_good}")
        if isinstance(error, DiskFull):
            return DiskFull(f"{error}; {last_good}: free space, then --resume auto continues the run")
        if isinstance(error, torch.OutOfMemoryError):
            world_size = self.rank0.world_size
            return torch.OutOfMemoryError(
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
        timed_steps, timed_seconds = state.timed or (0, 0.0)  # the speed leaves out the first interval (warm-up)
        summary = {
            "complete": complete, "final_acc": state.acc if complete else None, "best_acc": state.best_acc,
            "best_epoch": state.best_epoch, "epochs_done": state.step // self.facts["steps_per_epoch"],
            "train_seconds": state.train_seconds, "total_seconds": seconds,
            "img_per_s": timed_steps * self.args.batch_size / timed_seconds if timed_steps else None,
            "ms_per_step": 1000 * timed_seconds / timed_steps if timed_steps else None,
            "stopped_by_signal": self.signum if self.stopped else None, **self.facts, "steps": state.step,
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
        out = Path(self.args.output_dir)
        if self.rank0.rank == 0 and complete:
            print(f"test accuracy: final {state.acc:.2f}% (epoch {self.args.epochs}), best {state.best_acc:.2f}% "
                  f"(epoch {state.best_epoch}); {state.train_seconds:.0f} s of training; {out}")
        elif self.rank0.rank == 0:
            print(f"stopped at step {state.step} of {self.facts['total_steps']} (epoch "
                  f"{state.step / self.facts['steps_per_epoch']:.2f}); continue with --resume {out / 'checkpoint.pt'} "
                  f"(or --resume auto)")
        return summary
