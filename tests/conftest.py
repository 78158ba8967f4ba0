import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100


def images(n=16, seed=0):
    """Random uint8 images (n, 3, 32, 32)."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class RunsCode:
    """A pickle payload that would create a file named pwned in the working folder if it were ever run."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def write_cifar(root, name="cifar10", per_batch=6, seed=0):
    """Random images and labels in CIFAR-10/100's real on-disk format (python pickles of uint8 rows: 1024 R, 1024 G,
    1024 B), `per_batch` images per file. Returns the folder and each file's content."""
    rng = np.random.default_rng(seed)
    tv_class = CIFAR10 if name == "cifar10" else CIFAR100
    label_key, meta_key = ("labels", "label_names") if name == "cifar10" else ("fine_labels", "fine_label_names")
    classes = [f"class{i}" for i in range(10 if name == "cifar10" else 100)]
    folder = Path(root) / tv_class.base_folder
    folder.mkdir(parents=True)
    written = {}
    for filename, _ in tv_class.train_list + tv_class.test_list:
        batch = {"batch_label": filename, "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, len(classes), size=per_batch).tolist(),
                 "filenames": [f"{filename}_{i}.png" for i in range(per_batch)]}
        with open(folder / filename, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[filename] = batch
    with open(folder / tv_class.meta["filename"], "wb") as f:
        pickle.dump({meta_key: classes, "num_cases_per_batch": per_batch}, f, protocol=2)
    return folder, written


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def accept_cifar(monkeypatch, folder, name="cifar10"):
    """torchvision checks every CIFAR file's md5 before reading it: make it accept the files in `folder` as they are
    now (a later change to a file is then a damaged file)."""
    tv_class = CIFAR10 if name == "cifar10" else CIFAR100
    for files in ("train_list", "test_list"):
        monkeypatch.setattr(tv_class, files, [[f, md5(folder / f)] for f, _ in getattr(tv_class, files)])
    monkeypatch.setattr(tv_class, "meta", {**tv_class.meta, "md5": md5(folder / tv_class.meta["filename"])})


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    folder, _ = write_cifar(tmp_path)
    accept_cifar(monkeypatch, folder)
    return tmp_path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder: a tiny ViT (dim 32, depth 2, two CLS tokens) trained for one epoch on digits."""
    import train

    out = tmp_path_factory.mktemp("trained_run")
    flags = ["--dataset", "digits", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "4",
             "--num-cls", "2", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--lr", "3e-3",
             "--ra-reps", "2", "--log-every", "10", "--no-hflip", "--auto-augment", "none", "--random-erase", "0",
             "--mixup-alpha", "0", "--cutmix-alpha", "0", "--drop-path", "0", "--device", "cpu",
             "--output-dir", str(out)]
    train.main(train.get_args_parser().parse_args(flags))
    return out
