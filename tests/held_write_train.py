"""train.py whose second checkpoint write stops part-way, for the kill -9 test: its first os.write to the temporary
checkpoint file writes half of the bytes, then HELD_WRITE_MARKER gets "<bytes written> <bytes of the file>" and the
writer thread waits there until the process is killed."""
import os
import sys
import threading
from pathlib import Path

import train

real_write, writes = os.write, []


def write(fd, data):
    starts_a_file = os.lseek(fd, 0, os.SEEK_CUR) == 0
    if Path(os.readlink(f"/proc/self/fd/{fd}")).name == ".checkpoint.pt.tmp" and starts_a_file:
        writes.append(len(data))
        if len(writes) == 2:
            written = real_write(fd, data[: len(data) // 2])
            marker = Path(os.environ["HELD_WRITE_MARKER"])
            marker.with_suffix(".tmp").write_text(f"{written} {len(data)}")
            os.replace(marker.with_suffix(".tmp"), marker)  # whole when it appears
            threading.Event().wait()
    return real_write(fd, data)


os.write = write
sys.argv[0] = "train.py"
train.cli()
