"""The files of a PoorViTs run, each written whole or not at all: the checkpoint in the background (training waits for
neither serialisation nor fsync), summary.json atomically, and metrics.jsonl a whole line at a time. A disk that
fills up is said in one line that names the file and the bytes it needed (run.py gives it its exit code).
"""
import contextlib
import errno
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._pytree import tree_map


class DiskFull(OSError):
    """No space left for a file of the run; the message names the file and the bytes it needed."""


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


def remove_unused(out: Path, created: list):
    """Where `out` holds nothing but the run's .lock (the run failed before it began), removes the lock and the
    folders the run created (`out` first, then its parents): a failed start leaves nothing behind."""
    if [path.name for path in out.iterdir()] == [".lock"]:
        (out / ".lock").unlink()
        with contextlib.suppress(OSError):  # a folder that something else has written into since stays
            for folder in created:
                folder.rmdir()


def atomic_write(path: Path, payload):
    """Writes `payload` (bytes) to a temporary file, fsyncs it and renames it over `path`, so that a reader never sees
    a half-written file. On any failure the temporary file is removed, so that it holds no space."""
    tmp = temp_path(path)
    try:
        with writing(path, len(payload)):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # open()'s mode: the umask decides
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
    """Adds a line to a log by one write to an O_APPEND file, so that a kill leaves the line whole or absent. Where a
    nearly full disk took only part of it, that part is cut off again."""
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
    """`state` with every tensor copied into new CPU memory, which training does not change while it is written. A
    GPU tensor goes into pinned memory without blocking: the copies have landed once an event recorded after them
    has."""
    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t  # numbers, strings, None: immutable
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)
        return t.detach().to("cpu", copy=True)
    return tree_map(copy, state)


class CheckpointWriter:
    """Writes the checkpoint on a one-worker executor, at most one write in flight. Rank 0 writes; `save` and `join`
    are collective calls (run.Ranks), so that a write's error stops every rank at the next save or join."""

    def __init__(self, path: Path, ranks):
        self.path = path
        self.ranks = ranks
        self.write = None  # the future of the write in flight
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")

    def save(self, content):
        """Waits for the write in flight, then starts writing `content()` (called on rank 0)."""
        self.join()
        self.ranks.rank0_only(self._start, content)

    def join(self):
        """Waits for the write in flight; its error, if any, is raised on every rank."""
        self.ranks.rank0_only(self._wait)

    def finish(self):
        """Waits for the write in flight without a collective call, for a run that ends by another error or exits."""
        with contextlib.suppress(Exception):
            self._wait()
        self.executor.shutdown()

    def last_good(self) -> str:
        """Names the checkpoint on disk once the write in flight has ended: written atomically, it is the last whole
        one."""
        self.finish()
        if not self.path.is_file():
            return "no checkpoint was saved yet"
        step = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)["step"]
        return f"the last good checkpoint is {self.path} (step {step})"

    def _start(self, content):
        snapshot = copy_to_host(content())
        copied = None
        if self.ranks.device.type == "cuda":
            # A blocking-sync event: the writer sleeps on it instead of spinning a core.
            copied = torch.cuda.Event(blocking=True)
            copied.record(torch.cuda.current_stream(self.ranks.device))
        self.write = self.executor.submit(self._write, snapshot, copied)

    def _wait(self):
        write = self.write
        self.write = None
        if write is not None:
            write.result()

    def _write(self, snapshot, copied):
        if copied is not None:
            copied.synchronize()
        # Serialised in memory first, so that atomic_write knows the size to report if the disk is full.
        buffer = io.BytesIO()
        torch.save(snapshot, buffer)
        atomic_write(self.path, buffer.getbuffer())
