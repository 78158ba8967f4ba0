import os

import pytest
import torch

import data


def images(n=16, seed=0):
    """Random uint8 images (n, 3, 32, 32)."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class RunsCode:
    """A pickle payload that would create a file named pwned in the working folder if it were ever run."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture
def cifar_root(tmp_path):
    data.write_cifar(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder: a tiny ViT (dim 32, depth 2, two CLS tokens) trained for one epoch on digits."""
    import train

    out = tmp_path_factory.mktemp("trained_run")
    flags = ["--dataset", "digits", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "4",
             "--num-cls", "2", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--lr", "3e-3",
             "--ra-reps", "2", "--log-every", "10", "--no-hflip", "--auto-augment", "none", "--random-erase", "0",
             "--mixup-alpha", "0", "--cutmix-alpha", "0", "--drop-path", "0", "--output-dir", str(out)]
    train.main(train.get_args_parser().parse_args(flags))
    return out
