"""Datasets, the per-image training augmentation, repeated augmentation and batch mixing of PoorViTs: the recipe of
the seed's finetune.py (arXiv 2501.06220). Datasets are held in memory as uint8 images (N, 3, 32, 32); train_transform
is the per-image pipeline in torchvision's transforms, the specification augment.py's batched one is tested against.
All randomness derives from the seed and the position in the run: the same batches on any number of processes.
"""
import fcntl
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS as IMAGE_SUFFIXES
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "synthetic")
AUTO_AUGMENT_POLICIES = ("cifar10", "imagenet", "svhn", "none")
IMAGE_SIZE = 32
EVAL_CHUNK = 1024  # test images per forward pass of an evaluation
CIFAR = {"cifar10": (CIFAR10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
         "cifar100": (CIFAR100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))}
CIFAR10_STATS = CIFAR["cifar10"][1]
ERASE_SCALE = (0.02, 0.4)  # random erasing: the range of the box's area, as a fraction of the image's
ERASE_RATIO = (0.3, 1 / 0.3)  # random erasing: the range of the box's aspect ratio
ERASE_ATTEMPTS = 100  # random erasing: tries at a box that fits, as the seed
AA_FILL = 128  # AutoAugment: the grey that translate, shear and rotate leave where the image was, as the seed


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


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor copied to `device` without making the host wait: on CUDA from pinned memory, since a non_blocking
    copy from pageable memory still waits for the device."""
    device = torch.device(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class Normalize:
    """Turns uint8 images (B, C, H, W) into floats standardised per channel, (x / 255 - mean) / std, computed as one
    multiply and one subtract in torch's default dtype. Its two constants are copied to a device once, at the first
    batch there, so that no later batch copies anything from the host."""

    def __init__(self, mean, std):
        self.mean = mean
        self.std = std
        self.on_device = {}  # device -> (scale, shift), each (C, 1, 1)

    def constants(self, device):
        if device not in self.on_device:
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            self.on_device[device] = (to_device(1 / (255 * std), device), to_device(mean / std, device))
        return self.on_device[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self.constants(images.device)
        return images.to(torch.get_default_dtype()).mul_(scale).sub_(shift)


class DownloadError(OSError):
    """A dataset could not be fetched (no network, a cut transfer); the message names the archive to place instead."""


def download(name: str, root):
    """Fetch CIFAR-10/100 with torchvision (md5-checked; a no-op when the files are there). An archive placed in
    `root` by hand is checked and extracted instead: an offline machine needs only a copy. Processes that fetch into
    one `root` at once take turns: the first fetches, the others find its files whole (checked) and fetch nothing."""
    tv_class = CIFAR[name][0]
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        # torchvision writes the archive and the batches under their own names: the lock (POSIX, dropped when the
        # process ends, however it ends) keeps another process from reading them half-written or writing them too.
        with open(Path(root) / ".download.lock", "a") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            tv_class(root, train=True, download=True)
    except (OSError, RuntimeError) as e:  # urllib's errors are OSErrors; torchvision raises RuntimeError on a bad md5
        raise DownloadError(
            f"could not fetch {name} ({type(e).__name__}: {getattr(e, 'reason', None) or e}): fetch {tv_class.url} "
            f"elsewhere and place it as {Path(root) / tv_class.filename} (md5 {tv_class.tgz_md5}), then run "
            f"again: it is checked and extracted instead of fetched"
        ) from None


def cifar_problem(name, folder: Path, tv_class) -> Exception:
    """Why torchvision refuses a CIFAR folder, naming the first missing or damaged file (md5 mismatch)."""
    if not folder.is_dir():
        return FileNotFoundError(f"{name} not found in {folder}")
    meta = (tv_class.meta["filename"], tv_class.meta["md5"])
    for filename, md5 in tv_class.train_list + tv_class.test_list + [meta]:
        if not (folder / filename).is_file():
            return FileNotFoundError(f"{folder} lacks {filename}")
        if not check_integrity(str(folder / filename), md5):
            return ValueError(f"{folder / filename} is damaged (its md5 is not {md5}): delete it and --download again")
    return ValueError(f"{folder}: torchvision cannot read it")


def load_cifar(root, name: str = "cifar10") -> ImageData:
    """CIFAR-10/100 through torchvision.datasets, which checks every file's md5 before it unpickles it."""
    tv_class, (mean, std) = CIFAR[name]
    try:
        splits = [tv_class(root, train=train) for train in (True, False)]
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        raise cifar_problem(name, Path(root) / tv_class.base_folder, tv_class) from None
    images = [rearrange(torch.from_numpy(s.data), "n h w c -> n c h w").contiguous() for s in splits]
    labels = [torch.tensor(s.targets) for s in splits]
    return ImageData(images[0], labels[0], images[1], labels[1], list(splits[0].classes), mean, std)


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


def load_synthetic(train: int = 50_000, test: int = 10_000) -> ImageData:
    """Random uint8 images and labels in CIFAR-10's shapes and statistics: speed checks without the data."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (train + test, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (train + test,), generator=g)
    return ImageData(images[:train], labels[:train], images[train:], labels[train:], [str(c) for c in range(10)],
                     *CIFAR10_STATS)


def read_image(path: Path) -> torch.Tensor:
    """An image file of any size as uint8 (3, 32, 32) RGB, resized bilinearly."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def load_image_folder(root) -> ImageData:
    """A user's dataset in torchvision's ImageFolder layout, root/train/<class>/* and root/val/<class>/* (val's
    classes among train's), images of any size resized to 32x32 RGB."""
    splits = {}
    for name in ("train", "val"):
        folder = Path(root) / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder: an image folder holds train/<class>/*, val/<class>/*")
        splits[name] = split = ImageFolder(folder, allow_empty=True)
        if len(splits["train"].classes) < 2:
            raise ValueError(f"{folder} has {len(split.classes)} class folder(s): a classifier needs at least 2")
        extra = sorted(set(split.classes) - set(splits["train"].classes))
        if extra:
            raise ValueError(f"{folder} has classes not in train/: {', '.join(extra)}")
        if not split.samples:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    train, val = splits.values()
    images = [torch.stack([read_image(path) for path, _ in split.samples]) for split in (train, val)]
    labels = [torch.tensor([train.class_to_idx[split.classes[t]] for _, t in split.samples]) for split in (train, val)]
    return ImageData(images[0], labels[0], images[1], labels[1], train.classes, *channel_stats(images[0]))


def load_dataset(name: str, data_dir="data") -> ImageData:
    loaders = {"cifar10": lambda: load_cifar(data_dir, "cifar10"), "cifar100": lambda: load_cifar(data_dir, "cifar100"),
               "digits": load_digits, "imagefolder": lambda: load_image_folder(data_dir), "synthetic": load_synthetic}
    if name not in loaders:
        raise ValueError(f"name={name!r} must be one of {', '.join(DATASETS)}")
    return loaders[name]()


# ---- the per-image augmentation (torchvision's transforms: the specification of augment.py's batched pipeline)
def erasing_boxes(n, h, w, p, generator=None, scale=ERASE_SCALE, ratio=ERASE_RATIO, attempts=ERASE_ATTEMPTS):
    """The boxes of the seed's random erasing for n images of h x w. Each image is erased with probability p. Its box
    is tried with an area drawn uniformly from scale * h * w and an aspect ratio drawn uniformly from `ratio`, until
    one fits (at most `attempts` tries; each round tries every image still without a box), and is placed uniformly.
    Returns (n, 4) int64: top, left, height, width, with height 0 where nothing is erased."""
    erased = (torch.rand(n, generator=generator) < p).nonzero()[:, 0]
    size = torch.zeros(len(erased), 2, dtype=torch.long)
    waiting = torch.arange(len(erased))  # the erased images still without a box that fits
    for _ in range(attempts):
        if not len(waiting):
            break
        area = h * w * torch.empty(len(waiting), dtype=torch.float64).uniform_(*scale, generator=generator)
        aspect = torch.empty(len(waiting), dtype=torch.float64).uniform_(*ratio, generator=generator)
        tried = torch.stack([(area * aspect).sqrt(), (area / aspect).sqrt()], dim=1).round().long()
        fits = (tried[:, 0] < h) & (tried[:, 1] < w)
        size[waiting[fits]] = tried[fits]
        waiting = waiting[~fits]
    corner = torch.rand(len(erased), 2, generator=generator, dtype=torch.float64) * (torch.tensor([h, w]) - size + 1)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    boxes[erased] = torch.cat([corner.long(), size], dim=1)
    return boxes


def erase(images, boxes, value):
    """Float images (n, C, H, W) with each image's box (top, left, height, width; height 0: none) filled, in place,
    with `value`, a float per channel; `boxes` is a tensor on the images' device."""
    _, _, h, w = images.shape
    top, left, box_h, box_w = rearrange(boxes, "n box -> box n 1 1")
    rows = rearrange(torch.arange(h, device=images.device), "h -> h 1")
    cols = torch.arange(w, device=images.device)
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)  # (n, H, W)
    for channel, fill in zip(images.unbind(1), value):
        channel.masked_fill_(inside, fill)
    return images


class RandomErasing:
    """The seed's random erasing of one normalised (C, H, W) image, as a step of a v2.Compose pipeline."""

    def __init__(self, p, value):
        self.p = p
        self.value = value

    def __call__(self, image):
        _, h, w = image.shape
        return erase(image[None], erasing_boxes(1, h, w, self.p), self.value)[0]


def check_augmentation(crop_padding, auto_augment, random_erase, aa_fill=AA_FILL):
    if auto_augment not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"auto_augment={auto_augment!r} must be one of {', '.join(AUTO_AUGMENT_POLICIES)}")
    if not 0 <= random_erase <= 1:
        raise ValueError(f"random_erase={random_erase} must be a probability in [0, 1]")
    if crop_padding < 0:
        raise ValueError(f"crop_padding={crop_padding} must be >= 0")
    if not (isinstance(aa_fill, int) and 0 <= aa_fill <= 255):
        raise ValueError(f"aa_fill={aa_fill} must be an integer in 0..255 (a grey level)")


def train_transform(mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25, aa_fill=AA_FILL,
                    pil=False):
    """The training pipeline of one uint8 (3, 32, 32) tensor (a PIL image with pil=True) in torchvision's per-image
    transforms: the reference augment.BatchAugment is tested against."""
    check_augmentation(crop_padding, auto_augment, random_erase, aa_fill)
    steps = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if crop_padding:
        steps.append(v2.RandomCrop(IMAGE_SIZE, padding=crop_padding))
    if auto_augment != "none":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment), fill=aa_fill))
    if pil:
        steps.append(v2.PILToTensor())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erase:
        # The seed fills the box with the raw channel means, written after normalisation: its quirk, kept.
        steps.append(RandomErasing(random_erase, mean))
    return v2.Compose(steps)


# ---- repeated augmentation: the order of an epoch's samples
RA_MODES = ("shuffles", "in-batch")


def rank_part(rows, steps, world_size, rank):
    """This rank's part of `rows`, whose first axis runs over `steps` global batches one after another (the epoch's
    image order, or a choice per image): the rank-th contiguous slice of every global batch."""
    parts = rearrange(rows, "(s w b) ... -> s w b ...", s=steps, w=world_size)
    return rearrange(parts[:, rank], "s b ... -> (s b) ...")


class RepeatedAugmentationSampler:
    """Repeated augmentation: every image is seen `reps` times an epoch. In mode "shuffles" (the seed's RASampler on
    one process) an epoch is `reps` independent shuffles one after another; in mode "in-batch" (the seed under
    torchrun) it is one shuffle with each image repeated `reps` times in a row. The epoch is cut into global batches
    (an incomplete last one is dropped), and rank r takes the r-th slice of each, so that the processes together see
    what one process would."""

    def __init__(self, num_images, global_batch, reps=1, rank=0, world_size=1, seed=0, mode="shuffles"):
        if reps < 1:
            raise ValueError(f"reps={reps} must be >= 1")
        if mode not in RA_MODES:
            raise ValueError(f"mode={mode!r} must be one of {', '.join(RA_MODES)}")
        if global_batch % world_size:
            raise ValueError(f"global_batch={global_batch} must be divisible by world_size={world_size}")
        self.steps_per_epoch = num_images * reps // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"global_batch={global_batch} exceeds the {num_images * reps} samples of an epoch")
        self.num_images = num_images
        self.global_batch = global_batch
        self.reps = reps
        self.mode = mode
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batch = global_batch // world_size  # per rank
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        """The epoch to yield next, from its step `start_step` (a resumed run's)."""
        self.epoch = epoch
        self.start_step = start_step

    def epoch_order(self) -> torch.Tensor:
        """This rank's image indices for the whole epoch (from step 0), in order."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        if self.mode == "shuffles":
            order = torch.cat([torch.randperm(self.num_images, generator=generator) for _ in range(self.reps)])
        else:
            order = torch.randperm(self.num_images, generator=generator).repeat_interleave(self.reps)
        order = order[: self.steps_per_epoch * self.global_batch]
        return rank_part(order, self.steps_per_epoch, self.world_size, self.rank)


# ---- batch mixing
def mixup(images, partner, lam, rng):
    """Mixup (Zhang et al. 2018): each image blended with its partner's, weight lam on its own."""
    return images * lam + images[partner] * (1 - lam), lam


def cutmix(images, partner, lam, rng):
    """CutMix (Yun et al. 2019) as the seed's rand_bbox: a box of side sqrt(1 - lam) of the image's, centred on a
    uniform pixel and clipped, copied from the partner into every image; lam then becomes the uncovered fraction."""
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = rng.randrange(h), rng.randrange(w)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    images = images.clone()
    images[..., top:bottom, left:right] = images[partner, :, top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (h * w)


class BatchMix:
    """With probability `prob` a batch is mixed by CutMix or Mixup, with equal chance (an alpha of 0 removes one). Each
    image gets a partner from a random permutation of the batch, as in the seed (torchvision's mixing pairs
    neighbours, which under in-batch repeats would be an image's own copy). The targets are (B, num_classes) soft
    labels. The host draws the choices from `rng` (a random.Random); the permutation is drawn on the device."""

    def __init__(self, num_classes, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0")
        if not 0 <= prob <= 1:
            raise ValueError(f"prob={prob} must be a probability in [0, 1]")
        self.num_classes = num_classes
        self.prob = prob
        self.mixers = [(mix, alpha) for mix, alpha in ((mixup, mixup_alpha), (cutmix, cutmix_alpha)) if alpha]

    def __call__(self, images, labels, rng):
        targets = F.one_hot(labels, self.num_classes).to(images.dtype)
        if not self.mixers or rng.random() >= self.prob:
            return images, targets
        mix, alpha = rng.choice(self.mixers)
        partner = torch.randperm(len(images), device=images.device)
        images, lam = mix(images, partner, rng.betavariate(alpha, alpha), rng)
        return images, targets * lam + targets[partner] * (1 - lam)
