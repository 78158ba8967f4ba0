import os
import pickle

import numpy as np
import pytest
import torch


def images(n=16, seed=0):
    """Random uint8 images (n, 3, 32, 32)."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class RunsCode:
    """A pickle payload that would create a file named pwned in the working folder if it were ever run."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def write_cifar(root, name="cifar10", per_batch=6, seed=0):
    """Small CIFAR files in the real on-disk format (python pickles of uint8 rows: 1024 R, 1024 G, 1024 B)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        meta, meta_key, classes = "batches.meta", "label_names", [f"class{i}" for i in range(10)]
        test_file = "test_batch"
    else:
        folder, files, label_key = root / "cifar-100-python", ["train"], "fine_labels"
        meta, meta_key, classes = "meta", "fine_label_names", [f"class{i}" for i in range(100)]
        test_file = "test"
    folder.mkdir(parents=True)
    written = {}
    for filename in files + [test_file]:
        batch = {
            "batch_label": filename,
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            label_key: rng.integers(0, len(classes), size=per_batch).tolist(),
            "filenames": [f"{filename}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / filename, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[filename] = batch
    with open(folder / meta, "wb") as f:
        pickle.dump({meta_key: classes, "num_cases_per_batch": per_batch}, f, protocol=2)
    return folder, written


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar(tmp_path)
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
