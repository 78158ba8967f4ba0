import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

import data


def images(n=16, seed=0, size=32):
    """Random uint8 images (n, 3, size, size)."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


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


def write_svhn(root, train=8, test=4, seed=0):
    """Random images and labels in SVHN's real on-disk format: train_32x32.mat and test_32x32.mat (MATLAB 5, via
    scipy), X (32, 32, 3, N) uint8 with rows first, y (N, 1) with labels 1..10 (10: the digit 0). Returns {split:
    (X, y)}."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # every label 1..10 where n allows
        savemat(Path(root) / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


def accept_svhn(monkeypatch, root):
    """torchvision checks each SVHN file's md5 before reading it: make it (and data's download list) accept the files
    in `root` as they are now."""
    split_list = {split: [url, name, md5(Path(root) / name) if (Path(root) / name).exists() else expected]
                  for split, (url, name, expected) in SVHN.split_list.items()}
    monkeypatch.setattr(SVHN, "split_list", split_list)
    monkeypatch.setitem(data.ARCHIVES, "svhn", [split_list["train"], split_list["test"]])


def write_folder(root, spec, size=(40, 24)):
    """spec: {"train/cat": n, ...} -> PNG files of n images each (size: width, height)."""
    rng = np.random.default_rng(0)
    for sub, n in spec.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / sub / f"{i}.png")


TINY_WNIDS = ["n01443537", "n01629819", "n09999999"]


def write_tiny_imagenet(root, per_class=3, val_per_class=2, size=64, seed=0):
    """A Tiny-ImageNet-200 tree as its archive unpacks (JPEGs at `size`, boxes files, wnids.txt, words.txt with more
    wnids than the classes, val/images + val/val_annotations.txt, an unlabelled test/), 3 classes. Returns the folder
    and {val file: wnid}."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"

    def jpeg(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, "JPEG")

    for wnid in TINY_WNIDS:
        for i in range(per_class):
            jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t1\t20\t30\n" for i in range(per_class)))
    val = {f"val_{i}.JPEG": TINY_WNIDS[(i * 2) % len(TINY_WNIDS)] for i in range(val_per_class * len(TINY_WNIDS))}
    for name, wnid in val.items():
        jpeg(folder / "val" / "images" / name)
    (folder / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t1\t20\t30\n" for name, wnid in val.items()))
    jpeg(folder / "test" / "images" / "test_0.JPEG")
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    words = {"n00001740": "entity", "n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
             "n09999999": "test class"}
    (folder / "words.txt").write_text("".join(f"{wnid}\t{name}\n" for wnid, name in words.items()))
    return folder, val


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
