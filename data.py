"""Datasets and the training augmentation of PoorViTs (arXiv 2501.06220, Sec. 4; DeiT's recipe on CIFAR-10).

Every dataset is held in memory as uint8 images (N, 3, 32, 32) and int64 labels. Training samples pass through
flip -> crop with padding -> AutoAugment (CIFAR-10 policy) -> normalise -> random erasing, one image at a time
(torchvision.transforms.v2); whole batches are then mixed by CutMix or Mixup. Repeated augmentation shows each
image `reps` times per epoch. All randomness of a sample is a function of (seed, epoch, position in the epoch), so a
run gives the same batches on any number of processes or loader workers, and after a resume.
"""
import codecs
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")
AUTO_AUGMENT_POLICIES = ("cifar10", "imagenet", "svhn", "none")
IMAGE_SIZE = 32
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageData:
    train_images: torch.Tensor  # (N, 3, 32, 32) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts`: no shared RNG state to save, restore or keep in step."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def channel_stats(images: torch.Tensor):
    pixels = images.double().div(255).transpose(0, 1).flatten(1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, standardised per channel."""
    mean = torch.tensor(mean, device=images.device).view(-1, 1, 1)
    std = torch.tensor(std, device=images.device).view(-1, 1, 1)
    return (images.float() / 255 - mean) / std


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles: accept numpy arrays and plain Python values, refuse anything that could run code."""

    allowed = {"_reconstruct": np.ndarray((0,)).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in self.allowed:
            return self.allowed[name]
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles written by Python 3 store bytes
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path, label_key: str):
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        labels = torch.tensor(batch[label_key], dtype=torch.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a CIFAR batch file ({type(e).__name__}: {e})") from None
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _torchvision_cifar(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if name == "cifar10" else CIFAR100


def download(name: str, root):
    """Fetch CIFAR-10/100 with torchvision (checks the archive's md5; a no-op when the files are there)."""
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"--download fetches cifar10 or cifar100, not --dataset {name!r}")
    _torchvision_cifar(name)(root, train=True, download=True)


def load_cifar(root, name: str = "cifar10") -> ImageData:
    """CIFAR-10/100 from the python-pickle files torchvision downloads (root/cifar-10-batches-py, root/cifar-100-python)."""
    tv_class = _torchvision_cifar(name)
    folder = Path(root) / tv_class.base_folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name} not found in {folder}: pass --download to fetch it, or --data-dir a folder holding {folder.name}"
        )
    label_key = "labels" if name == "cifar10" else "fine_labels"
    parts = {}
    for split, files in (("train", tv_class.train_list), ("test", tv_class.test_list)):
        paths = [folder / filename for filename, _md5 in files]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: pass --download to fetch {name} again")
        images, labels = zip(*(_read_cifar_batch(p, label_key) for p in paths))
        parts[split] = torch.cat(images), torch.cat(labels)
    meta = folder / tv_class.meta["filename"]
    with open(meta, "rb") as f:
        classes = list(_NumpyOnlyUnpickler(f, encoding="latin1").load()[tv_class.meta["key"]])
    mean, std = CIFAR10_STATS if name == "cifar10" else CIFAR100_STATS
    return ImageData(*parts["train"], *parts["test"], classes, mean, std)


def load_digits(test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 1,797 bundled 8x8 handwritten digits (0-16), upsampled to 32x32 RGB; a fixed train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    small = torch.from_numpy(digits.images).float().unsqueeze(1) * (255 / 16)
    images = F.interpolate(small, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_test = int(len(images) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return ImageData(images[train], labels[train], images[test], labels[test], [str(c) for c in range(10)],
                     *channel_stats(images[train]))


def _read_image_folder(folder: Path, classes=None):
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: --data-dir needs train/<class>/* and val/<class>/*")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes or found
    if len(classes) < 2:
        raise ValueError(f"{folder} has {len(classes)} class folder(s): a classifier needs at least 2")
    if not set(found) <= set(classes):
        raise ValueError(f"{folder} has classes not in train/: {', '.join(sorted(set(found) - set(classes)))}")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{path}: cannot read image ({e})") from None
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return torch.stack(images), torch.tensor(labels), classes


def load_image_folder(root) -> ImageData:
    """A user's dataset: root/train/<class>/* and root/val/<class>/*, any size, resized to 32x32 RGB."""
    train_images, train_labels, classes = _read_image_folder(Path(root) / "train")
    test_images, test_labels, _ = _read_image_folder(Path(root) / "val", classes)
    return ImageData(train_images, train_labels, test_images, test_labels, classes, *channel_stats(train_images))


def load_dataset(name: str, data_dir="data") -> ImageData:
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, name)
    if name == "digits":
        return load_digits()
    if name == "imagefolder":
        return load_image_folder(data_dir)
    raise ValueError(f"--dataset {name!r} is not one of {', '.join(DATASETS)}")


def train_transform(mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25):
    """The per-image training pipeline on a uint8 (3, 32, 32) tensor; each step can be switched off."""
    if auto_augment not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"--auto-augment {auto_augment!r} is not one of {', '.join(AUTO_AUGMENT_POLICIES)}")
    if not 0 <= random_erase <= 1:
        raise ValueError(f"--random-erase {random_erase} must be a probability in [0, 1]")
    if crop_padding < 0:
        raise ValueError(f"--crop-padding {crop_padding} must be >= 0")
    steps = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if crop_padding:
        steps.append(v2.RandomCrop(IMAGE_SIZE, padding=crop_padding))
    if auto_augment != "none":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erase:
        steps.append(v2.RandomErasing(p=random_erase, scale=(0.02, 0.4), ratio=(0.3, 3.3)))
    return v2.Compose(steps)


class AugmentedImages(Dataset):
    """Indexed by (image index, seed): the seed fixes that sample's augmentation, wherever it is computed."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator, which the v2 transforms draw from: torch.manual_seed would cost ~70 us.
            torch.default_generator.manual_seed(seed)
            return self.transform(self.images[index]), self.labels[index]


class RepeatedAugmentationSampler(Sampler):
    """One semantics on 1 or many processes: epoch e is a random order (shared by all ranks) of `reps` copies of
    every image; it is cut into global batches, and rank r takes slots r, r + world_size, ... of each. The last
    incomplete global batch is dropped. Yields (image index, augmentation seed) for AugmentedImages."""

    def __init__(self, num_images, global_batch, reps=1, rank=0, world_size=1, seed=0):
        if reps < 1:
            raise ValueError(f"--ra-reps {reps} must be >= 1")
        if global_batch % world_size:
            raise ValueError(f"--batch-size {global_batch} (global) must be divisible by the {world_size} processes")
        self.steps_per_epoch = num_images * reps // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {global_batch} exceeds the {num_images * reps} samples of an epoch")
        self.num_images, self.global_batch, self.reps = num_images, global_batch, reps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.global_batch // self.world_size

    def __iter__(self):
        order_rng = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.num_images * self.reps, generator=order_rng) % self.num_images
        begin, end = self.start_step * self.global_batch, self.steps_per_epoch * self.global_batch
        for slot in range(begin + self.rank, end, self.world_size):
            yield int(order[slot]), derive_seed(self.seed, "augment", self.epoch, slot)


class BatchMix:
    """With probability `prob` a batch is mixed, by CutMix or Mixup with equal chance (DeiT/timm's recipe); a flag
    at alpha 0 removes that mixer. Targets always come back as (B, num_classes) probabilities."""

    def __init__(self, num_classes, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"--mixup-alpha {mixup_alpha} and --cutmix-alpha {cutmix_alpha} must be >= 0")
        if not 0 <= prob <= 1:
            raise ValueError(f"--mix-prob {prob} must be a probability in [0, 1]")
        self.num_classes, self.prob = num_classes, prob
        self.mixers = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []
        if cutmix_alpha:
            self.mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))

    def __call__(self, images, labels):
        if self.mixers and torch.rand(()).item() < self.prob:
            mixer = self.mixers[torch.randint(len(self.mixers), ()).item()]
            return mixer(images, labels)
        return images, F.one_hot(labels, self.num_classes).to(images.dtype)
