"""Datasets and the training augmentation of PoorViTs (arXiv 2501.06220; the recipe of the seed's finetune.py).

Every dataset is held in memory as uint8 images (N, 3, 32, 32) and int64 labels. Training samples pass through
flip -> crop with padding -> AutoAugment (CIFAR-10 policy) -> normalise -> random erasing, every choice made per
image: on the training device a chunk of batches at a time (DeviceLoader, BatchAugment), each op equal to
torchvision's (train_transform, the per-image reference); whole batches are then mixed by CutMix or Mixup.
Repeated augmentation shows each image `reps` times per epoch. All randomness is a function of the seed and the
position in the run, so a run gives the same batches on any number of processes, and after a resume.
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
from torch.utils.data import Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")
AUTO_AUGMENT_POLICIES = ("cifar10", "imagenet", "svhn", "none")
IMAGE_SIZE = 32
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
ERASE_SCALE, ERASE_RATIO = (0.02, 0.4), (0.3, 1 / 0.3)  # random erasing: area fraction and aspect ratio ranges
ERASE_ATTEMPTS = 100  # random erasing: tries at a box that fits, as the seed
AA_FILL = 128  # AutoAugment: the grey that translate, shear and rotate leave where the image was, as the seed
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


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor copied to `device` without making the host wait: on CUDA from pinned memory, since a non_blocking
    copy from pageable memory still waits for the device."""
    device = torch.device(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def normalization(mean, std) -> torch.Tensor:
    """(2, C, 1, 1) float32 on the CPU: the scale 1 / (255 std) and the shift mean / std that `normalize` applies."""
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return torch.stack([1 / (255 * std), mean / std])


def scale_shift(images: torch.Tensor, constants: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 images * scale - shift, with `constants` from `normalization` on the images' device."""
    scale, shift = constants
    return images.float().mul_(scale).sub_(shift)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, standardised per channel: (x / 255 - mean) / std as one scale and shift."""
    return scale_shift(images, to_device(normalization(mean, std), images.device))


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


class DownloadError(OSError):
    """A dataset could not be fetched (no network, a cut transfer); the message names the archive to place instead."""


def download(name: str, root):
    """Fetch CIFAR-10/100 with torchvision (checks the archive's md5; a no-op when the files are there). An archive
    placed in `root` by hand is checked and extracted instead of fetched, so an offline machine needs only a copy."""
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name={name!r}: only cifar10 and cifar100 are downloaded")
    tv_class = _torchvision_cifar(name)
    try:
        tv_class(root, train=True, download=True)
    except (OSError, RuntimeError) as e:  # urllib's errors are OSErrors; torchvision raises RuntimeError on a bad md5
        raise DownloadError(
            f"could not fetch {name} ({type(e).__name__}: {getattr(e, 'reason', None) or e}): fetch {tv_class.url} "
            f"elsewhere and place it as {Path(root) / tv_class.filename} (md5 {tv_class.tgz_md5}), then run "
            f"again: it is checked and extracted instead of fetched"
        ) from None


def load_cifar(root, name: str = "cifar10") -> ImageData:
    """CIFAR-10/100 from the python-pickle files torchvision downloads (root/cifar-10-batches-py or
    root/cifar-100-python)."""
    tv_class = _torchvision_cifar(name)
    folder = Path(root) / tv_class.base_folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} not found in {folder}")
    label_key = "labels" if name == "cifar10" else "fine_labels"
    parts = {}
    for split, files in (("train", tv_class.train_list), ("test", tv_class.test_list)):
        paths = [folder / filename for filename, _md5 in files]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}")
        images, labels = zip(*(_read_cifar_batch(p, label_key) for p in paths))
        parts[split] = torch.cat(images), torch.cat(labels)
    meta = folder / tv_class.meta["filename"]
    with open(meta, "rb") as f:
        classes = list(_NumpyOnlyUnpickler(f, encoding="latin1").load()[tv_class.meta["key"]])
    mean, std = CIFAR10_STATS if name == "cifar10" else CIFAR100_STATS
    return ImageData(*parts["train"], *parts["test"], classes, mean, std)


def write_cifar(root, name: str = "cifar10", per_batch: int = 6, seed: int = 0):
    """Random images and labels in CIFAR-10/100's real on-disk format (python pickles of uint8 rows: 1024 R, 1024 G,
    1024 B), `per_batch` images per file, for tests and machines that cannot download. Returns the folder and each
    file's content."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files = Path(root) / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
        label_key = "labels"
        meta, meta_key, classes = "batches.meta", "label_names", [f"class{i}" for i in range(10)]
        test_file = "test_batch"
    else:
        folder, files, label_key = Path(root) / "cifar-100-python", ["train"], "fine_labels"
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
        raise FileNotFoundError(f"{folder} is not a directory: an image folder holds train/<class>/* and val/<class>/*")
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
    raise ValueError(f"name={name!r} must be one of {', '.join(DATASETS)}")


def check_augmentation(crop_padding, auto_augment, random_erase, aa_fill=AA_FILL):
    if auto_augment not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"auto_augment={auto_augment!r} must be one of {', '.join(AUTO_AUGMENT_POLICIES)}")
    if not 0 <= random_erase <= 1:
        raise ValueError(f"random_erase={random_erase} must be a probability in [0, 1]")
    if crop_padding < 0:
        raise ValueError(f"crop_padding={crop_padding} must be >= 0")
    if not (isinstance(aa_fill, int) and 0 <= aa_fill <= 255):
        raise ValueError(f"aa_fill={aa_fill} must be an integer in 0..255 (a grey level)")


def erasing_boxes(n, h, w, p, generator=None, scale=ERASE_SCALE, ratio=ERASE_RATIO, attempts=ERASE_ATTEMPTS):
    """The seed's random erasing draw for n images (from torch's default generator when `generator` is None): with
    probability p, up to `attempts` tries of an area uniform in scale * h * w and an aspect ratio uniform on a linear
    scale in `ratio`; the first box with height < h and width < w is placed uniformly. (n, 4) int64 top, left,
    height, width; height 0 where nothing is erased."""
    erased = (torch.rand(n, generator=generator) < p).nonzero()[:, 0]
    tries = (len(erased), attempts)
    area = h * w * torch.empty(tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    aspect = torch.empty(tries, dtype=torch.float64).uniform_(*ratio, generator=generator)
    box_h, box_w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 if none does)
    box_h, box_w = box_h.gather(1, first)[:, 0] * fits.any(1), box_w.gather(1, first)[:, 0] * fits.any(1)
    top = (torch.rand(len(erased), generator=generator, dtype=torch.float64) * (h - box_h + 1)).long()
    left = (torch.rand(len(erased), generator=generator, dtype=torch.float64) * (w - box_w + 1)).long()
    boxes = torch.zeros(n, 4, dtype=torch.long)
    boxes[erased] = torch.stack([top, left, box_h, box_w], dim=1)
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
    """The seed's random erasing of one normalised (C, H, W) image, as a step of a v2.Compose pipeline: the box is
    drawn by erasing_boxes from torch's default generator."""

    def __init__(self, p, value):
        self.p, self.value = p, value

    def __call__(self, image):
        _, h, w = image.shape
        return erase(image[None], erasing_boxes(1, h, w, self.p), self.value)[0]


def train_transform(mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25, aa_fill=AA_FILL,
                    pil=False):
    """The training pipeline of one uint8 (3, 32, 32) tensor (a PIL image with pil=True) in torchvision's own
    per-image transforms: the reference BatchAugment is tested against, and bench.py's per-image baseline."""
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


RA_MODES = ("shuffles", "in-batch")


def rank_part(order, steps, world_size, rank):
    """This rank's part of `order` (..., steps * global batch: global batches one after another): the rank-th
    contiguous slice of every global batch, (..., steps * per-rank batch)."""
    parts = rearrange(order, "... (s w b) -> ... s w b", s=steps, w=world_size)
    return rearrange(parts[..., rank, :], "... s b -> ... (s b)")


class RepeatedAugmentationSampler(Sampler):
    """Repeated augmentation: epoch e holds `reps` copies of every image, in an order shared by all ranks.
    shuffles: `reps` independent shuffles one after another (the seed's single-process RASampler);
    in-batch: one shuffle with each image repeated `reps` times in a row (the seed under torchrun; "batch
    augmentation", Hoffer et al. 2019), so a batch holds about B/reps images in `reps` augmented copies each.
    The order is cut into global batches (the incomplete last one dropped) and rank r takes the r-th contiguous
    slice of each: a global batch is the same samples on 1 or N processes. Yields this rank's image indices."""

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
        self.num_images, self.global_batch, self.reps, self.mode = num_images, global_batch, reps, mode
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch = global_batch // world_size  # per rank
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.batch

    def epoch_order(self) -> torch.Tensor:
        """This rank's image indices for the whole epoch (from step 0), in order."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        if self.mode == "shuffles":
            order = torch.cat([torch.randperm(self.num_images, generator=generator) for _ in range(self.reps)])
        else:
            order = torch.randperm(self.num_images, generator=generator).repeat_interleave(self.reps)
        order = order[: self.steps_per_epoch * self.global_batch]
        return rank_part(order, self.steps_per_epoch, self.world_size, self.rank)

    def __iter__(self):
        yield from self.epoch_order()[self.start_step * self.batch :].tolist()


def rows_to_device(rows: dict, device) -> dict:
    """Named int64 tensors of one length n, each (n,) or (k, n), moved to `device` in a single copy; returns views of
    that copy under the same names and shapes."""
    if not rows:
        return {}
    flat = [rearrange(row, "... n -> (...) n") for row in rows.values()]
    packed = to_device(torch.cat(flat), device).split([len(f) for f in flat])
    return {name: part.view(row.shape) for (name, row), part in zip(rows.items(), packed)}


def inverse_affine(center, angle, translate, shear):
    """torchvision's _get_inverse_affine_matrix at scale 1, step for step in Python floats: the 2x3 matrix from an
    output pixel to the input pixel it reads (coordinates centred on the image), bit for bit the one its affine and
    rotate build."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += cx - matrix[0] * (cx + tx) - matrix[1] * (cy + ty)
    matrix[5] += cy - matrix[3] * (cx + tx) - matrix[4] * (cy + ty)
    return matrix


def geometry_matrix(op, magnitude, h, w):
    """The inverse matrix torchvision's AutoAugment builds for a geometric op on an h x w image; identity for the
    other ops."""
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        # AutoAugment shears about the top-left corner, (-w/2, -h/2) in centred coordinates.
        return inverse_affine([-0.5 * w, -0.5 * h], 0.0, [0.0, 0.0], shear)
    if op in ("TranslateX", "TranslateY"):
        shift = float(int(magnitude))
        return inverse_affine([0.0, 0.0], 0.0, [shift, 0.0] if op == "TranslateX" else [0.0, shift], [0.0, 0.0])
    if op == "Rotate":
        # rotate() first brings the angle into [0, 360), then turns the other way round from affine().
        return inverse_affine([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], [0.0, 0.0])
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def variant_values(variants, size):
    """(variants, 10) float32 on the CPU, one row per (op, magnitude): the inverse matrix divided by (w/2, h/2) as
    torchvision's _affine_grid divides it, the blend factor 1 + m and 1 - factor (brightness, colour, contrast,
    sharpness), the solarize threshold and the posterize bit mask."""
    theta = torch.tensor([geometry_matrix(op, m, size, size) for op, m in variants], dtype=torch.float32)
    theta = rearrange(theta, "v (row col) -> v row col", row=2) / torch.tensor([[0.5 * size], [0.5 * size]])
    bits = [int(m) if op == "Posterize" else 8 for op, m in variants]
    params = torch.tensor([[1.0 + m, 1.0 - (1.0 + m), 255 * m, ((1 << b) - 1) << (8 - b)]
                           for (_, m), b in zip(variants, bits)], dtype=torch.float32)
    return torch.cat([rearrange(theta, "v row col -> v (row col)"), params], dim=1)


def affine_grid(theta, h, w):
    """torchvision's _affine_grid for one (1, 3, 2) matrix already divided by (w/2, h/2), computed as it does on the
    device: the grid_sample coordinates each pixel of an h x w output reads."""
    device = theta.device
    base = torch.empty(1, h, w, 3, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(rearrange(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device), "h -> h 1"))
    base[..., 2].fill_(1)
    grid = rearrange(base, "1 h w xy1 -> 1 (h w) xy1").bmm(theta)
    return rearrange(grid, "1 (h w) xy -> 1 h w xy", h=h)


def sample_nearest(images, grid, fill):
    """torchvision's _apply_grid_transform (nearest, with a fill) for uint8 images, each with its own grid: a channel
    of ones, sampled alongside, marks the output pixels that come from outside the image."""
    n, c, h, w = images.shape
    ones = torch.ones(n, 1, h, w, device=images.device)
    sampled = F.grid_sample(torch.cat([images.float(), ones], dim=1), grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)
    pixels, inside = sampled.split([c, 1], dim=1)
    return torch.where(inside < 0.5, float(fill), pixels).to(torch.uint8)


def per_image(values):
    return rearrange(values, "n -> n 1 1 1")


def fused_add(a, alpha, b):
    """a + alpha * b rounded once to float32, as ATen's add(a, b, alpha=...) computes it (a fused multiply-add): here
    alpha is a tensor. float64 holds these sums of 8-bit-scale terms exactly, so the one rounding is the last."""
    return (a.double() + alpha.double() * b.double()).float()


def grey(images):
    """torchvision's luma of uint8 RGB images, floored as its saturation and contrast use it: (n, 1, H, W) float32."""
    r, g, b = images.unbind(-3)
    return rearrange(r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_(), "n h w -> n 1 h w")


def blend(images, other, variant, tables):
    """torchvision's _blend with each image's factor: images * factor + (1 - factor) * other, clamped to uint8."""
    scaled = images.float().mul_(per_image(tables["factor"][variant]))
    return fused_add(scaled, per_image(tables["alpha"][variant]), other).clamp_(0, 255).to(torch.uint8)


def sharpen(images, variant, tables):
    """torchvision's adjust_sharpness with each image's factor: the inner pixels blend with a 3x3 blur (rounded),
    the border stays."""
    c = images.shape[1]
    out = images.float()
    blurred = F.conv2d(out, tables["blur"].expand(c, 1, 3, 3), groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.copy_(fused_add(inner, per_image(tables["alpha"][variant]), blurred - inner))
    return out.clamp_(0, 255).to(torch.uint8)


def autocontrast(images):
    """torchvision's autocontrast: each channel stretched to 0..255, a flat channel left as it is."""
    x = images.float()
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return x.sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


# One call per kind of op and slot, whatever the magnitudes: each image's variant (op, magnitude) indexes the tables.
KIND_OPS = {
    "affine": lambda x, v, t: sample_nearest(x, t["grid"][v], t["fill"]),  # shear, translate, rotate
    "Brightness": lambda x, v, t: x.float().mul_(per_image(t["factor"][v])).clamp_(0, 255).to(torch.uint8),
    "Color": lambda x, v, t: blend(x, grey(x), v, t),
    "Contrast": lambda x, v, t: blend(x, grey(x).mean((-3, -2, -1), keepdim=True), v, t),
    "Sharpness": sharpen,
    "Posterize": lambda x, v, t: x & per_image(t["mask"][v]),
    "Solarize": lambda x, v, t: torch.where(x >= per_image(t["threshold"][v]), x.bitwise_not(), x),
    "AutoContrast": lambda x, v, t: autocontrast(x),
    "Equalize": lambda x, v, t: TF.equalize(x),  # batched already: a 256-bin histogram per image and channel
    "Invert": lambda x, v, t: x.bitwise_not(),
}
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class BatchAutoAugment:
    """torchvision's AutoAugment with the sub-policy drawn for each image, not once per batch. Per op slot one gather
    sorts the images by the kind of op they drew; each kind then runs once on its run of images, every image with its
    own magnitude, read on the device from per-variant tables that are copied there once."""

    def __init__(self, policy: str = "cifar10", size: int = IMAGE_SIZE, fill: int = AA_FILL):
        # The policy table and magnitude bins are torchvision's (private, pinned version).
        self.tv = v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=fill)
        self.size, self.fill = size, fill
        self.variants = []  # (op, magnitude) pairs
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
        kinds = ["affine" if op in GEOMETRIC_OPS else op for op, _ in self.variants]
        self.kind_of = torch.tensor([list(KIND_OPS).index(kind) for kind in kinds])
        self.values = variant_values(self.variants, size)
        self.on_device = {}

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

    def plan(self, variants: torch.Tensor):
        """The host side of __call__: per op slot, the gather that sorts the images by op kind (composed with the
        previous slot's sort), their variants in that order and where each kind's run ends (host ints); then the
        gather back to the images' order. Returns (rows for rows_to_device, ends)."""
        position = torch.arange(len(variants))  # where each image sits in the current order
        gathers, sorted_variants, ends = [], [], []
        for slot in variants.T:
            kind = torch.where(slot >= 0, self.kind_of[slot.clamp(min=0)], len(KIND_OPS))  # skipped ops sort last
            order = torch.argsort(kind, stable=True)
            gathers.append(position[order])
            sorted_variants.append(slot[order].clamp(min=0))
            ends.append(torch.bincount(kind, minlength=len(KIND_OPS)).cumsum(0)[: len(KIND_OPS)].tolist())
            position = torch.argsort(order)
        rows = {"aa_gather": torch.stack(gathers), "aa_variant": torch.stack(sorted_variants), "aa_back": position}
        return rows, ends

    def tables(self, device):
        """The per-variant parameters on `device`, copied there once: torchvision's sampling grid (made on the device
        one matrix at a time, as its affine makes it), blend factors, solarize thresholds, posterize masks."""
        if device not in self.on_device:
            values = to_device(self.values, device)
            theta = rearrange(values[:, :6], "v (row col) -> v row col", row=2)
            grids = [affine_grid(theta[v : v + 1].clone().transpose(1, 2), self.size, self.size)
                     for v in range(len(theta))]
            factor, alpha, threshold, mask = values[:, 6:].T
            a, b = 1.0 / 13.0, 5.0 / 13.0  # torchvision's sharpness blur
            blur = to_device(torch.tensor([[a, a, a], [a, b, a], [a, a, a]]), device)
            self.on_device[device] = {"grid": torch.cat(grids), "factor": factor, "alpha": alpha, "blur": blur,
                                      "threshold": threshold, "mask": mask.to(torch.uint8), "fill": self.fill}
        return self.on_device[device]

    def apply(self, images, rows, ends):
        """images: uint8 (n, C, H, W) on the device; rows: plan's rows on that device; ends: plan's host ints."""
        tables = self.tables(images.device)
        for gather, variant, slot_ends in zip(rows["aa_gather"], rows["aa_variant"], ends):
            images = images[gather]
            for kind, start, stop in zip(KIND_OPS, [0, *slot_ends], slot_ends):
                if start < stop:
                    images[start:stop] = KIND_OPS[kind](images[start:stop], variant[start:stop], tables)
        return images[rows["aa_back"]]

    def __call__(self, images, variants):
        """images: uint8 (B, C, H, W) on any device; variants: from draw(B)."""
        rows, ends = self.plan(variants)
        return self.apply(images, rows_to_device(rows, images.device), ends)


def flip_crop(images, flip, top, left, padding):
    """Per image: horizontal flip (where `flip`), then the HxW crop at (top, left) of the zero-padded image. The
    choices are tensors on the images' device, where the pixel index is made."""
    n, c, h, w = images.shape
    padded_w = w + 2 * padding
    rows = rearrange(top, "n -> n 1") + torch.arange(h, device=images.device)  # (n, h)
    cols = rearrange(left, "n -> n 1") + torch.arange(w, device=images.device)  # (n, w)
    # A crop of the flipped padded image reads the mirrored columns of the unflipped one.
    cols = torch.where(rearrange(flip, "n -> n 1"), padded_w - 1 - cols, cols)
    pixel = rearrange(rows, "n h -> n h 1") * padded_w + rearrange(cols, "n w -> n 1 w")
    padded = rearrange(F.pad(images, (padding,) * 4), "n c h w -> n c (h w)")
    crops = padded.gather(2, rearrange(pixel, "n h w -> n 1 (h w)").expand(n, c, h * w))
    return rearrange(crops, "n c (h w) -> n c h w", h=h)


class BatchAugment:
    """The pipeline of train_transform for a whole uint8 batch on its device (GPU or CPU), with every random choice
    made per image: flip, crop offsets, AutoAugment sub-policy and signs, erasing box. The choices are drawn on the
    CPU from `generator` (choose), so a batch's augmentation depends only on that generator, not on the device; they
    reach the device in one copy, and apply never reads anything back from it."""

    def __init__(self, mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25,
                 aa_fill=AA_FILL):
        check_augmentation(crop_padding, auto_augment, random_erase, aa_fill)
        self.mean, self.std = mean, std
        self.hflip, self.padding, self.random_erase = hflip, crop_padding, random_erase
        self.auto_augment = BatchAutoAugment(auto_augment, fill=aa_fill) if auto_augment != "none" else None
        self.on_device = {}

    def normalization(self, device):
        """The scale and shift of normalisation on `device`, copied there once."""
        if device not in self.on_device:
            self.on_device[device] = to_device(normalization(self.mean, self.std), device)
        return self.on_device[device]

    def choose(self, n, generator):
        """Every random choice for n images, drawn on the CPU: {name: (k, n) int64}, a column per image."""
        choices = {}
        if self.hflip or self.padding:
            flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
            offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
            choices["crop"] = torch.cat([rearrange(flip.long(), "n -> 1 n"), offsets])  # flip, top, left
        if self.auto_augment is not None:
            choices["aa"] = rearrange(self.auto_augment.draw(n, generator), "n slot -> slot n")
        if self.random_erase:
            choices["erase"] = rearrange(erasing_boxes(n, IMAGE_SIZE, IMAGE_SIZE, self.random_erase, generator),
                                         "n box -> box n")
        return choices

    def plan(self, choices):
        """choose's choices as (rows for rows_to_device, host ints for apply): AutoAugment's sort is planned here."""
        rows, ends = {name: c for name, c in choices.items() if name != "aa"}, []
        if "aa" in choices:
            aa_rows, ends = self.auto_augment.plan(rearrange(choices["aa"], "slot n -> n slot"))
            rows.update(aa_rows)
        return rows, ends

    def apply(self, images, rows, ends):
        """choose's choices, planned, with the rows on the images' device, applied to uint8 images (n, C, H, W):
        float32 out."""
        if "crop" in rows:
            flip, top, left = rows["crop"]
            images = flip_crop(images, flip.bool(), top, left, self.padding)
        if self.auto_augment is not None:
            images = self.auto_augment.apply(images, rows, ends)
        images = scale_shift(images, self.normalization(images.device))
        if self.random_erase:
            # The seed fills the box with the raw channel means, written after normalisation: its quirk, kept.
            images = erase(images, rows["erase"].T, self.mean)
        return images

    def __call__(self, images, generator):
        rows, ends = self.plan(self.choose(len(images), generator))
        return self.apply(images, rows_to_device(rows, images.device), ends)


class DeviceLoader:
    """The training set held once on `device` as uint8; every epoch (set on the sampler) the sampler's order for
    this rank is cut into batches, augmented on the device a chunk of batches at a time. A chunk's random choices
    are drawn for every rank's images, seeded by (seed, epoch, chunk), and each rank applies its part: a global batch
    is augmented alike on 1 or N processes. Chunks sit at fixed steps of the epoch, so a resume at any step replays
    the same batches."""

    def __init__(self, images, labels, sampler: RepeatedAugmentationSampler, augment: BatchAugment, device,
                 chunk_images: int = 4096):
        self.images, self.labels = images.to(device), labels.to(device)
        self.sampler, self.augment, self.device = sampler, augment, torch.device(device)
        self.batch = sampler.batch
        # Chunks count global batches, so that they cut an epoch at the same steps on any number of processes.
        self.batches_per_chunk = max(1, chunk_images // sampler.global_batch)

    def __len__(self):
        return self.sampler.steps_per_epoch - self.sampler.start_step

    def __iter__(self):
        s = self.sampler
        order = s.epoch_order().view(s.steps_per_epoch, self.batch)
        for first in range(s.start_step // self.batches_per_chunk * self.batches_per_chunk, s.steps_per_epoch,
                           self.batches_per_chunk):
            steps = range(first, min(first + self.batches_per_chunk, s.steps_per_epoch))
            generator = torch.Generator().manual_seed(derive_seed(s.seed, "augment", s.epoch, first))
            choices = self.augment.choose(len(steps) * s.global_batch, generator)  # in the global order
            mine = {name: rank_part(c, len(steps), s.world_size, s.rank) for name, c in choices.items()}
            rows, ends = self.augment.plan(mine)
            indices = order[steps.start : steps.stop].flatten()
            # The chunk's image indices and all its random choices reach the device in one copy.
            rows = rows_to_device({"index": indices, **rows}, self.device)
            images = self.augment.apply(self.images[rows["index"]], rows, ends)
            batches = zip(steps, images.split(self.batch), self.labels[rows["index"]].split(self.batch))
            yield from ((x, y) for step, x, y in batches if step >= s.start_step)


def check_mixing(mixup_alpha, cutmix_alpha, prob):
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0")
    if not 0 <= prob <= 1:
        raise ValueError(f"prob={prob} must be a probability in [0, 1]")


def mixup(images, partner, lam):
    """Mixup (Zhang et al. 2018): each image blended with its partner's, weight lam on its own."""
    return images * lam + images[partner] * (1 - lam), lam


def cutmix(images, partner, lam):
    """CutMix (Yun et al. 2019) as the seed's rand_bbox: a box of side sqrt(1 - lam) of the image's, centred on a
    uniform pixel and clipped, copied from the partner into every image; lam then becomes the uncovered fraction."""
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    images = images.clone()
    images[..., top:bottom, left:right] = images[partner, :, top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (h * w)


class BatchMix:
    """With probability `prob` a batch is mixed, by CutMix or Mixup with equal chance, as the seed's finetune.py; an
    alpha of 0 removes that mixer. Each image's partner comes from a random permutation of the batch, as the seed's:
    torchvision's MixUp/CutMix pair each image with its neighbour, which under in-batch repeats is mostly its own copy.
    Targets come back as (B, num_classes) probabilities; the draws use torch's default generators (seeded per step)
    and read nothing back from the device."""

    def __init__(self, num_classes, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5):
        check_mixing(mixup_alpha, cutmix_alpha, prob)
        self.num_classes, self.prob = num_classes, prob
        self.mixers = [(mix, alpha) for mix, alpha in ((mixup, mixup_alpha), (cutmix, cutmix_alpha)) if alpha]

    def __call__(self, images, labels):
        targets = F.one_hot(labels, self.num_classes).to(images.dtype)
        if not self.mixers or torch.rand(()).item() >= self.prob:
            return images, targets
        mix, alpha = self.mixers[torch.randint(len(self.mixers), ()).item()]
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
        partner = torch.randperm(len(images), device=images.device)
        images, lam = mix(images, partner, lam)
        return images, targets * lam + targets[partner] * (1 - lam)
