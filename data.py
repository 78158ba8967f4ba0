"""Datasets, the per-image training augmentation, repeated augmentation and batch mixing of PoorViTs: the recipe of
the seed's finetune.py (arXiv 2501.06220). Datasets are held in memory as uint8 images (N, 3, S, S), S the one image
size of a run (docs/datasets.md); train_transform is the per-image pipeline in torchvision's transforms, the
specification augment.py's batched one is tested against. All randomness derives from the seed and the position
in the run: the same batches on any number of processes.
"""
import fcntl
import functools
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.datasets import CIFAR10, CIFAR100, SVHN, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS as IMAGE_SUFFIXES
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, download_url
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "synthetic", "svhn", "tinyimagenet")
FROM_FOLDER = ("cifar10", "cifar100", "imagefolder", "svhn", "tinyimagenet")  # read from data_dir; the others built in
AUTO_AUGMENT_POLICIES = ("cifar10", "imagenet", "svhn", "none")
IMAGE_SIZE = 32  # the native size of CIFAR, SVHN, digits (upsampled) and synthetic
EVAL_CHUNK = 1024  # test images per forward pass of an evaluation
CIFAR = {"cifar10": (CIFAR10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
         "cifar100": (CIFAR100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))}
CIFAR10_STATS = CIFAR["cifar10"][1]
# SVHN's mean and std as the SPT/LSA reference (aanna0701/SPT_LSA_ViT) normalises it.
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
# Tiny-ImageNet-200 (cs231n): its archive (url, filename, md5), the folder it unpacks to, and the reference's stats.
TINY_IMAGENET = ("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "tiny-imagenet-200.zip",
                 "90528d7ca1a48142e341f4ef8d21d0de")
TINY_FOLDER = "tiny-imagenet-200"
TINY_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
# What a flag left unset defaults to: the image side, and where SPT/LSA's reference trained a dataset otherwise, its
# patch and AutoAugment policy (docs/datasets.md). An image folder's side (None) is its files' own.
DEFAULTS = dict(img_size=IMAGE_SIZE, patch_size=4, auto_augment="cifar10")
DATASET_DEFAULTS = {"svhn": dict(auto_augment="svhn"), "imagefolder": dict(img_size=None),
                    "tinyimagenet": dict(img_size=64, patch_size=8, auto_augment="imagenet")}
# The datasets --download fetches: (url, filename, md5) of each of their files (SVHN: train and test, not extra).
ARCHIVES = {**{name: [(tv.url, tv.filename, tv.tgz_md5)] for name, (tv, _) in CIFAR.items()},
            "svhn": [SVHN.split_list[split] for split in ("train", "test")], "tinyimagenet": [TINY_IMAGENET]}
ERASE_SCALE = (0.02, 0.4)  # random erasing: the range of the box's area, as a fraction of the image's
ERASE_RATIO = (0.3, 1 / 0.3)  # random erasing: the range of the box's aspect ratio
ERASE_ATTEMPTS = 100  # random erasing: tries at a box that fits, as the seed
AA_FILL = 128  # AutoAugment: the grey that translate, shear and rotate leave where the image was, as the seed


@dataclass
class ImageData:
    train_images: torch.Tensor  # (N, 3, S, S) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test_split: str = "test"  # what the held-out images are called: an image folder's are its val/ images


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

    @functools.cache  # once per device: (scale, shift), each (C, 1, 1)
    def constants(self, device):
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return to_device(1 / (255 * std), device), to_device(mean / std, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self.constants(images.device)
        return images.to(torch.get_default_dtype()).mul_(scale).sub_(shift)


class DownloadError(OSError):
    """A dataset could not be fetched (no network, a cut transfer); the message names the archive to place instead."""


def fetch(name: str, root, url, filename, md5):
    """One file of `name` into `root`, md5-checked (a file already there and whole is not fetched again); CIFAR's
    and Tiny-ImageNet's archives are extracted (Tiny-ImageNet's unless its folder is there). Processes that fetch
    into one `root` at once take turns: the first fetches, the others find its files whole (checked) and fetch
    nothing."""
    Path(root).mkdir(parents=True, exist_ok=True)
    # torchvision writes the archive and its files under their own names: the lock (POSIX, dropped when the process
    # ends, however it ends) keeps another process from reading them half-written or writing them too.
    with open(Path(root) / ".download.lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        if name in CIFAR:
            CIFAR[name][0](root, train=True, download=True)
        elif name == "svhn":
            download_url(url, root, filename, md5)
        elif not (Path(root) / TINY_FOLDER).is_dir():
            download_and_extract_archive(url, root, filename=filename, md5=md5)


def download(name: str, root):
    """Fetch a dataset of ARCHIVES (md5-checked per file; a no-op when the files are there). A file placed in
    `root` by hand is checked (and extracted) instead: an offline machine needs only a copy."""
    for url, filename, md5 in ARCHIVES[name]:
        try:
            fetch(name, root, url, filename, md5)
        # urllib's errors are OSErrors; torchvision raises RuntimeError on a bad md5
        except (OSError, RuntimeError) as e:
            used = "checked" if name == "svhn" else "checked and extracted"
            raise DownloadError(
                f"could not fetch {name} ({type(e).__name__}: {getattr(e, 'reason', None) or e}): fetch {url} "
                f"elsewhere and place it as {Path(root) / filename} (md5 {md5}), then run again: it is {used} "
                f"instead of fetched"
            ) from None


def file_problem(name, folder: Path, files) -> Exception:
    """Why torchvision refuses a dataset's folder, naming the first of its (filename, md5) files that is missing or
    damaged (md5 mismatch)."""
    if not folder.is_dir():
        return FileNotFoundError(f"{name} not found in {folder}")
    for filename, md5 in files:
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
        files = tv_class.train_list + tv_class.test_list + [(tv_class.meta["filename"], tv_class.meta["md5"])]
        raise file_problem(name, Path(root) / tv_class.base_folder, files) from None
    images = [rearrange(torch.from_numpy(s.data), "n h w c -> n c h w").contiguous() for s in splits]
    labels = [torch.tensor(s.targets) for s in splits]
    return ImageData(images[0], labels[0], images[1], labels[1], list(splits[0].classes), mean, std)


def load_svhn(root) -> ImageData:
    """SVHN's cropped digits (train and test, 32x32; not `extra`) through torchvision, which checks each .mat file's
    md5 and reads it with scipy; the files' label 10, the digit 0, becomes 0."""
    try:
        splits = [SVHN(root, split) for split in ("train", "test")]
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        raise file_problem("svhn", Path(root), [(filename, md5) for _, filename, md5 in ARCHIVES["svhn"]]) from None
    images = [torch.from_numpy(np.ascontiguousarray(s.data)) for s in splits]  # (N, 3, H, W)
    labels = [torch.from_numpy(s.labels) for s in splits]
    return ImageData(images[0], labels[0], images[1], labels[1], [str(c) for c in range(10)], *SVHN_STATS)


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


def read_image(path: Path, size=None) -> torch.Tensor:
    """An image file as uint8 (3, size, size) RGB, resized bilinearly; size None: (3, H, W), as it is."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def common_size(paths) -> int:
    """The side of image files that are all square and of one size (only their headers are read)."""
    from PIL import Image, UnidentifiedImageError

    sizes = {}
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.setdefault(img.size, path)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot read image ({e})") from None
    (width, height), path = next(iter(sizes.items()))
    if len(sizes) > 1 or width != height:
        shown = ", ".join(f"{w}x{h} ({p})" for (w, h), p in list(sizes.items())[:3])
        raise ValueError(f"the images are not all of one square size ({shown}): choose one with --img-size")
    return width


def read_images(train, val, classes, size=None, max_bytes=None, stats=None) -> ImageData:
    """The (path, label) samples of `train` and `val` read at `size` (None: the files' own, which must agree), unless
    the uint8 images would take more than `max_bytes`; normalised by `stats` (None: the train images' own)."""
    paths = [path for path, _ in train + val]
    size = size or common_size(paths)
    needed = len(paths) * 3 * size * size
    if max_bytes is not None and needed > max_bytes:
        raise ValueError(f"{len(paths)} images of {size}x{size} take {needed / 2**30:.1f} GiB as uint8, more than the "
                         f"{max_bytes / 2**30:.1f} GiB the device can hold them in: choose a smaller --img-size")
    # PIL decodes without the GIL: threads read the files side by side.
    with ThreadPoolExecutor() as pool:
        images = torch.stack(list(pool.map(read_image, paths, [size] * len(paths))))
    labels = torch.tensor([label for _, label in train + val])
    n = len(train)
    # Both callers hold out their val/ images.
    return ImageData(images[:n], labels[:n], images[n:], labels[n:], classes, *(stats or channel_stats(images[:n])),
                     "val")


def load_image_folder(root, size=None, max_bytes=None) -> ImageData:
    """A user's dataset in torchvision's ImageFolder layout, root/train/<class>/* and root/val/<class>/* (val's
    classes among train's, none of them empty), read as read_images does. Every error names the layout: there is
    nothing to download."""
    splits = {}
    layout = f"an image folder DIR holds DIR/train/<class>/*, DIR/val/<class>/* (here DIR is {root})"
    for name in ("train", "val"):
        folder = Path(root) / name
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder: {layout}")
        splits[name] = split = ImageFolder(folder, allow_empty=True)
        if len(splits["train"].classes) < 2:
            raise ValueError(f"{folder} has {len(split.classes)} class folder(s), a classifier needs 2: {layout}")
        extra = sorted(set(split.classes) - set(splits["train"].classes))
        if extra:
            raise ValueError(f"{folder} has classes not in train/: {', '.join(extra)}")
        empty = sorted(set(split.classes) - {split.classes[t] for t in split.targets})
        if empty or not split.samples:
            where = folder / empty[0] if empty else folder
            raise ValueError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)}): {layout}")
    train, val = splits.values()
    val_samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
    return read_images(train.samples, val_samples, train.classes, size, max_bytes)


def read_lines(path: Path) -> list:
    """The tab-separated fields of each line of a text file of Tiny-ImageNet's."""
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def load_tiny_imagenet(root, size=None, max_bytes=None) -> ImageData:
    """Tiny-ImageNet-200 as its archive unpacks, read in place: train/<wnid>/images/*.JPEG through ImageFolder, and
    val/images/*.JPEG labelled by val/val_annotations.txt; each class named by words.txt. Its test split has no
    labels."""
    folder = Path(root) / TINY_FOLDER
    if not (folder / "train").is_dir():
        raise FileNotFoundError(f"tinyimagenet not found in {folder}")
    train = ImageFolder(folder / "train")
    val = folder / "val"
    val_samples = [(str(val / "images" / file), wnid) for file, wnid, *_ in read_lines(val / "val_annotations.txt")]
    unknown = sorted({wnid for _, wnid in val_samples} - set(train.classes))
    if unknown:
        raise ValueError(f"{val} has classes not in train/: {', '.join(unknown)}")
    names = {wnid: name for wnid, name, *_ in read_lines(folder / "words.txt")}
    classes = [names.get(wnid, wnid) for wnid in train.classes]
    val_samples = [(path, train.class_to_idx[wnid]) for path, wnid in val_samples]
    return read_images(train.samples, val_samples, classes, size, max_bytes, TINY_STATS)


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) resized to (N, C, size, size), bilinearly with antialiasing, a chunk at a time."""
    chunks = [F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True) for chunk in images.split(1024)]
    return torch.cat(chunks).round_().clamp_(0, 255).to(torch.uint8)


def load_dataset(name: str, data_dir="data", size=None, max_bytes=None) -> ImageData:
    """Dataset `name` with images of `size` (None: the dataset's own size), refused where its uint8 images would take
    more than `max_bytes`."""
    loaders = {"cifar10": lambda: load_cifar(data_dir, "cifar10"), "cifar100": lambda: load_cifar(data_dir, "cifar100"),
               "digits": load_digits, "imagefolder": lambda: load_image_folder(data_dir, size, max_bytes),
               "synthetic": load_synthetic, "svhn": lambda: load_svhn(data_dir),
               "tinyimagenet": lambda: load_tiny_imagenet(data_dir, size, max_bytes)}
    if name not in loaders:
        raise ValueError(f"name={name!r} must be one of {', '.join(DATASETS)}")
    dataset = loaders[name]()
    if size is not None and dataset.train_images.shape[-1] != size:
        # The sets held in memory at their own size are resized as a whole.
        dataset.train_images = resized(dataset.train_images, size)
        dataset.test_images = resized(dataset.test_images, size)
    return dataset


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
                    pil=False, size=IMAGE_SIZE):
    """The training pipeline of one uint8 (3, size, size) tensor (a PIL image with pil=True) in torchvision's
    per-image transforms: the reference augment.BatchAugment is tested against."""
    check_augmentation(crop_padding, auto_augment, random_erase, aa_fill)
    steps = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if crop_padding:
        steps.append(v2.RandomCrop(size, padding=crop_padding))
    if auto_augment != "none":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment), fill=aa_fill))
    if pil:
        steps.append(v2.PILToTensor())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erase:
        # The seed fills the box with the raw channel means, written after normalisation: its quirk, kept.
        steps.append(v2.Lambda(lambda image: erase(image[None], erasing_boxes(1, size, size, random_erase), mean)[0]))
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
