"""Datasets and the training augmentation of PoorViTs (arXiv 2501.06220, Sec. 4; DeiT's recipe on CIFAR-10).

Every dataset is held in memory as uint8 images (N, 3, 32, 32) and int64 labels. Training samples pass through
flip -> crop with padding -> AutoAugment (CIFAR-10 policy) -> normalise -> random erasing, one image at a time
(torchvision.transforms.v2); whole batches are then mixed by CutMix or Mixup. Repeated augmentation shows each
image `reps` times per epoch. All randomness of a sample is a function of (seed, epoch, position in the epoch), so a
run gives the same batches on any number of processes or loader workers, and after a resume.
"""
import codecs
import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")
AUTO_AUGMENT_POLICIES = ("cifar10", "imagenet", "svhn", "none")
IMAGE_SIZE = 32
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
ERASE_SCALE, ERASE_RATIO = (0.02, 0.4), (0.3, 3.3)  # random erasing: area fraction and aspect ratio ranges
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
    """uint8 (B, C, H, W) -> float32, standardised per channel: (x / 255 - mean) / std as one scale and shift."""
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    # Made on the CPU and copied without blocking: a tensor built on a GPU from a list would wait for the GPU.
    scale = (1 / (255 * std)).to(images.device, non_blocking=True)
    shift = (mean / std).to(images.device, non_blocking=True)
    return images.float().mul_(scale).sub_(shift)


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
    """CIFAR-10/100 from the python-pickle files torchvision downloads (root/cifar-10-batches-py or
    root/cifar-100-python)."""
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


def read_image(path: Path) -> torch.Tensor:
    """An image file of any size as uint8 (3, 32, 32) RGB, resized bilinearly; a ValueError naming an unreadable
    file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _read_image_folder(folder: Path, classes=None):
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
            images.append(read_image(path))
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


def check_augmentation(crop_padding, auto_augment, random_erase):
    if auto_augment not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"--auto-augment {auto_augment!r} is not one of {', '.join(AUTO_AUGMENT_POLICIES)}")
    if not 0 <= random_erase <= 1:
        raise ValueError(f"--random-erase {random_erase} must be a probability in [0, 1]")
    if crop_padding < 0:
        raise ValueError(f"--crop-padding {crop_padding} must be >= 0")


def train_transform(mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25, pil=False):
    """The per-image training pipeline on a uint8 (3, 32, 32) tensor (a PIL image with pil=True); each step can be
    switched off."""
    check_augmentation(crop_padding, auto_augment, random_erase)
    steps = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if crop_padding:
        steps.append(v2.RandomCrop(IMAGE_SIZE, padding=crop_padding))
    if auto_augment != "none":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment)))
    if pil:
        steps.append(v2.PILToTensor())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erase:
        steps.append(v2.RandomErasing(p=random_erase, scale=ERASE_SCALE, ratio=ERASE_RATIO))
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


def check_sampling(global_batch, reps, world_size):
    if reps < 1:
        raise ValueError(f"--ra-reps {reps} must be >= 1")
    if global_batch % world_size:
        raise ValueError(f"--batch-size {global_batch} (global) must be divisible by the {world_size} processes")


class RepeatedAugmentationSampler(Sampler):
    """One semantics on 1 or many processes: epoch e is a random order (shared by all ranks) of `reps` copies of
    every image; it is cut into global batches, and rank r takes slots r, r + world_size, ... of each. The last
    incomplete global batch is dropped. Yields (image index, augmentation seed) for AugmentedImages."""

    def __init__(self, num_images, global_batch, reps=1, rank=0, world_size=1, seed=0):
        check_sampling(global_batch, reps, world_size)
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

    def epoch_order(self) -> torch.Tensor:
        """This rank's image indices for the whole epoch (from step 0), in order."""
        order_rng = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.num_images * self.reps, generator=order_rng) % self.num_images
        return order[self.rank : self.steps_per_epoch * self.global_batch : self.world_size]

    def __iter__(self):
        order = self.epoch_order().tolist()
        for k in range(self.start_step * self.global_batch // self.world_size, len(order)):
            slot = k * self.world_size + self.rank  # position in the epoch's global order
            yield order[k], derive_seed(self.seed, "augment", self.epoch, slot)


class BatchAutoAugment:
    """torchvision's AutoAugment with the sub-policy drawn for each image, not once per batch: images are grouped by
    the (op, signed magnitude) they drew and every group goes through torchvision's own op in one call."""

    def __init__(self, policy: str = "cifar10", size: int = IMAGE_SIZE):
        # The policy table, magnitude bins and op implementations are torchvision's (private, pinned version).
        self.tv = v2.AutoAugment(v2.AutoAugmentPolicy(policy))
        self.variants = []  # (op, magnitude) pairs, each applied by one call
        table = []  # [sub-policy][slot] -> (probability, index of the variant if positive, if negative)
        for sub_policy in self.tv._policies:
            slots = []
            for op, probability, bin_index in sub_policy:
                bins_fn, signed = self.tv._AUGMENTATION_SPACE[op]
                bins = bins_fn(10, size, size)
                magnitude = 0.0 if bins is None else float(bins[bin_index])
                signs = (magnitude, -magnitude if signed else magnitude)
                slots.append((probability, *(self._variant(op, m) for m in signs)))
            table.append(slots)
        self.probability = torch.tensor([[slot[0] for slot in sub] for sub in table])  # (policies, 2)
        self.variant_of = torch.tensor([[slot[1:] for slot in sub] for sub in table])  # (policies, 2, sign)

    def _variant(self, op, magnitude):
        if (op, magnitude) not in self.variants:
            self.variants.append((op, magnitude))
        return self.variants.index((op, magnitude))

    def draw(self, n: int, generator) -> torch.Tensor:
        """(n, 2) variant index of each image's two ops, -1 where the op is skipped (drawn on the CPU)."""
        sub_policy = torch.randint(len(self.probability), (n,), generator=generator)
        applied = torch.rand(n, 2, generator=generator) <= self.probability[sub_policy]
        negative = (torch.rand(n, 2, generator=generator) <= 0.5).long()
        variant = self.variant_of[sub_policy[:, None], torch.arange(2), negative]
        return torch.where(applied, variant, -1)

    def apply_variant(self, images, variant: int):
        op, magnitude = self.variants[variant]
        return self.tv._apply_image_or_video_transform(images, op, magnitude, self.tv.interpolation, self.tv._fill)

    def __call__(self, images, variants):
        """images: uint8 (B, C, H, W) on any device; variants: from draw(B). The grouping is planned on the CPU and
        reaches the device as one permutation per op slot, so the device is never waited for."""
        for slot in range(variants.shape[1]):
            group = variants[:, slot]
            order = torch.argsort(group, stable=True)
            keys, counts = torch.unique_consecutive(group[order], return_counts=True)
            order = order.to(images.device, non_blocking=True)
            sorted_images = images[order]
            pieces = [chunk if key < 0 else self.apply_variant(chunk, key)
                      for key, chunk in zip(keys.tolist(), sorted_images.split(counts.tolist()))]
            images = torch.empty_like(images).index_copy_(0, order, torch.cat(pieces))
        return images


class BatchAugment:
    """The pipeline of train_transform for a whole uint8 batch on its device (GPU or CPU), with every random choice
    made per image: flip, crop offsets, AutoAugment sub-policy and signs, erasing box. The choices are drawn on the
    CPU from `generator`, so a batch's augmentation depends only on that generator, not on the device."""

    def __init__(self, mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25):
        check_augmentation(crop_padding, auto_augment, random_erase)
        self.mean, self.std = mean, std
        self.hflip, self.padding, self.random_erase = hflip, crop_padding, random_erase
        self.auto_augment = BatchAutoAugment(auto_augment) if auto_augment != "none" else None

    def __call__(self, images, generator):
        n, _, h, w = images.shape
        if self.hflip or self.padding:
            flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
            top, left = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
            images = flip_crop(images, flip, top, left, self.padding)
        if self.auto_augment is not None:
            images = self.auto_augment(images, self.auto_augment.draw(n, generator))
        images = normalize(images, self.mean, self.std)
        if self.random_erase:
            images = erase(images, erasing_boxes(n, h, w, self.random_erase, generator))
        return images


def flip_crop(images, flip, top, left, padding):
    """Per image: horizontal flip (where `flip`), then the HxW crop at (top, left) of the zero-padded image."""
    n, c, h, w = images.shape
    padded_w = w + 2 * padding
    rows = top[:, None] + torch.arange(h)  # (n, h)
    cols = left[:, None] + torch.arange(w)  # (n, w)
    # A crop of the flipped padded image reads the mirrored columns of the unflipped one.
    cols = torch.where(flip[:, None], padded_w - 1 - cols, cols)
    pixel = rearrange(rows[:, :, None] * padded_w + cols[:, None, :], "n h w -> n 1 (h w)")
    padded = rearrange(F.pad(images, (padding,) * 4), "n c h w -> n c (h w)")
    crops = padded.gather(2, pixel.to(images.device, non_blocking=True).expand(n, c, h * w))
    return rearrange(crops, "n c (h w) -> n c h w", h=h)


def erasing_boxes(n, h, w, p, generator, scale=ERASE_SCALE, ratio=ERASE_RATIO, attempts=10):
    """torchvision's RandomErasing draw for n images at once: with probability p, up to 10 tries of an area and a
    log-uniform aspect ratio, the first box that fits is placed uniformly. (n, 4) top, left, height, width; height 0
    where nothing is erased."""
    area = h * w * torch.empty(n, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    box_h = (area * log_ratio.exp()).sqrt().round().long()
    box_w = (area / log_ratio.exp()).sqrt().round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 if none does)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    erased = (torch.rand(n, generator=generator) < p) & fits.any(1)
    top = (torch.rand(n, generator=generator) * (h - box_h + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - box_w + 1)).long()
    return torch.stack([top, left, box_h * erased, box_w * erased], dim=1)


def erase(images, boxes):
    """Zero (the mean colour, after normalisation) each image's box (top, left, height, width), in place; only the
    images with a box are touched, and which they are is known on the CPU."""
    _, _, h, w = images.shape
    chosen = (boxes[:, 2] > 0).nonzero()[:, 0]
    top, left, box_h, box_w = boxes[chosen].T[:, :, None]
    inside_rows = (torch.arange(h) >= top) & (torch.arange(h) < top + box_h)  # (k, h)
    inside_cols = (torch.arange(w) >= left) & (torch.arange(w) < left + box_w)  # (k, w)
    inside = (inside_rows[:, None, :, None] & inside_cols[:, None, None, :]).to(images.device, non_blocking=True)
    chosen = chosen.to(images.device, non_blocking=True)
    images[chosen] = images[chosen].masked_fill(inside, 0.0)
    return images


class DeviceLoader:
    """The training set held once on `device` as uint8; every epoch (set on the sampler) the sampler's order for
    this rank is cut into batches, augmented on the device a chunk of batches at a time. A chunk's randomness is
    seeded by (seed, epoch, rank, chunk) and chunks sit at fixed steps of the epoch, so a resume at any step replays
    the same batches."""

    def __init__(self, images, labels, sampler: RepeatedAugmentationSampler, augment: BatchAugment, device,
                 chunk_images: int = 4096):
        self.images, self.labels = images.to(device), labels.to(device)
        self.sampler, self.augment, self.device = sampler, augment, device
        self.batch = sampler.global_batch // sampler.world_size
        self.batches_per_chunk = max(1, chunk_images // self.batch)

    def __len__(self):
        return self.sampler.steps_per_epoch - self.sampler.start_step

    def __iter__(self):
        s = self.sampler
        order = s.epoch_order().view(s.steps_per_epoch, self.batch)
        for first in range(s.start_step // self.batches_per_chunk * self.batches_per_chunk, s.steps_per_epoch,
                           self.batches_per_chunk):
            steps = range(first, min(first + self.batches_per_chunk, s.steps_per_epoch))
            indices = order[steps.start : steps.stop].flatten().to(self.device, non_blocking=True)
            generator = torch.Generator().manual_seed(derive_seed(s.seed, "augment", s.epoch, s.rank, first))
            images = self.augment(self.images[indices], generator)
            batches = zip(steps, images.split(self.batch), self.labels[indices].split(self.batch))
            yield from ((x, y) for step, x, y in batches if step >= s.start_step)


def check_mixing(mixup_alpha, cutmix_alpha, prob):
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"--mixup-alpha {mixup_alpha} and --cutmix-alpha {cutmix_alpha} must be >= 0")
    if not 0 <= prob <= 1:
        raise ValueError(f"--mix-prob {prob} must be a probability in [0, 1]")


class BatchMix:
    """With probability `prob` a batch is mixed, by CutMix or Mixup with equal chance (DeiT/timm's recipe); a flag
    at alpha 0 removes that mixer. Targets always come back as (B, num_classes) probabilities."""

    def __init__(self, num_classes, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5):
        check_mixing(mixup_alpha, cutmix_alpha, prob)
        self.num_classes, self.prob = num_classes, prob
        self.mixers = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []
        if cutmix_alpha:
            self.mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))

    def __call__(self, images, labels):
        if self.mixers and torch.rand(()).item() < self.prob:
            mixer = self.mixers[torch.randint(len(self.mixers), ()).item()]
            return mixer(images, labels)
        return images, F.one_hot(labels, self.num_classes).to(images.dtype)
