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
