"""train.py with one injected fault, for the DDP failure test: rank 1 raises at its 3rd step."""
import os
import sys

import train

real_step = train.train_step
calls = 0


def failing_step(*args, **kwargs):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == 3:
        raise RuntimeError("injected failure on rank 1")
    return real_step(*args, **kwargs)


train.train_step = failing_step
sys.argv[0] = "train.py"
train.cli()
