"""The training augmentation of PoorViTs on the training device, a chunk of batches at a time: flip, crop, AutoAugment,
normalisation and random erasing, each choice per image, each op bit for bit torchvision's (data.train_transform).
The choices are drawn on the CPU and reach the device in one copy with the chunk's image indices; nothing is read
back. Per AutoAugment op slot one gather sorts the images by op kind, and each kind runs once on its images.
"""
import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._geometry import _affine_grid, _get_inverse_affine_matrix

import data

GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def rows_to_device(rows: dict, device) -> dict:
    """Named int64 tensors whose first axis runs over the same n images, each (n,) or (n, k), moved to `device` in a
    single copy."""
    if not rows:
        return {}
    columns = [rearrange(row, "n ... -> n (...)") for row in rows.values()]
    packed = data.to_device(torch.cat(columns, dim=1), device)
    parts = packed.split([len(column.T) for column in columns], dim=1)
    return {name: part.reshape(row.shape) for (name, row), part in zip(rows.items(), parts)}


def geometry_matrix(op, magnitude, size):
    """The inverse affine matrix that torchvision's AutoAugment has affine or rotate build for a geometric op, by
    torchvision's own helper with the arguments those pass it."""
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        # AutoAugment shears about the top-left corner: center [0, 0], which affine moves to (-w/2, -h/2).
        corner = [-0.5 * size, -0.5 * size]
        shears = [shear, 0.0] if op == "ShearX" else [0.0, shear]
        return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, shears)
    if op in ("TranslateX", "TranslateY"):
        shift = [float(int(magnitude)), 0.0] if op == "TranslateX" else [0.0, float(int(magnitude))]
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, shift, 1.0, [0.0, 0.0])
    # rotate() brings the angle into [0, 360), then turns the other way round from affine().
    return _get_inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])


def sample_nearest(images, grid, fill):
    """torchvision's _apply_grid_transform (nearest, with a fill) for uint8 images, each with its own grid: a channel
    of ones, sampled alongside, marks the output pixels that come from outside the image."""
    n, c, h, w = images.shape
    ones = torch.ones(n, 1, h, w, dtype=torch.float32, device=images.device)
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


def affine(images, variant, tables):
    """Shear, translate or rotate: each image sampled along its variant's grid."""
    return sample_nearest(images, tables["grid"][variant], tables["fill"])


def brightness(images, variant, tables):
    return images.float().mul_(per_image(tables["factor"][variant])).clamp_(0, 255).to(torch.uint8)


def color(images, variant, tables):
    return blend(images, grey(images), variant, tables)


def contrast(images, variant, tables):
    return blend(images, grey(images).mean((-3, -2, -1), keepdim=True), variant, tables)


def posterize(images, variant, tables):
    return images & per_image(tables["mask"][variant])


def solarize(images, variant, tables):
    return torch.where(images >= per_image(tables["threshold"][variant]), images.bitwise_not(), images)


# The kinds of op, in the order that sorts an op slot's images (skipped ops come after them all). Each kind runs
# once per slot on its images, whatever their magnitudes: each image's variant indexes the tables. The ops without
# a magnitude are torchvision's own batched functions.
KINDS = (
    ("affine", affine),
    ("Brightness", brightness),
    ("Color", color),
    ("Contrast", contrast),
    ("Sharpness", sharpen),
    ("Posterize", posterize),
    ("Solarize", solarize),
    ("AutoContrast", lambda images, variant, tables: TF.autocontrast(images)),
    ("Equalize", lambda images, variant, tables: TF.equalize(images)),
    ("Invert", lambda images, variant, tables: images.bitwise_not()),
)
KIND_NAMES = [name for name, _ in KINDS]


class BatchAutoAugment:
    """torchvision's AutoAugment with the sub-policy drawn for each image, not once per batch."""

    def __init__(self, policy: str = "cifar10", size: int = data.IMAGE_SIZE, fill: int = data.AA_FILL):
        # The policy table and magnitude bins are torchvision's (private, pinned version).
        self.tv = v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=fill)
        self.size = size
        self.fill = fill
        # Each op slot of each sub-policy: its probability, and the (op, magnitude) it applies with either sign.
        probability = [[p for _, p, _ in sub_policy] for sub_policy in self.tv._policies]
        signed = [[self.signed_variants(op, bin_index) for op, _, bin_index in sub_policy]
                  for sub_policy in self.tv._policies]
        # The distinct (op, magnitude) variants, in the order first met: the tables hold a row for each.
        self.variants = list(dict.fromkeys(variant for sub in signed for slot in sub for variant in slot))
        index = {variant: i for i, variant in enumerate(self.variants)}
        self.probability = torch.tensor(probability)  # (sub-policies, 2 slots)
        self.variant_of = torch.tensor([[[index[v] for v in slot] for slot in sub] for sub in signed])  # (.., 2 signs)
        kinds = ["affine" if op in GEOMETRIC_OPS else op for op, _ in self.variants]
        self.kind_of = torch.tensor([KIND_NAMES.index(kind) for kind in kinds])

    def signed_variants(self, op, bin_index):
        """The (op, magnitude) that an op slot applies with a positive sign and with a negative one (the same where
        the op has no sign)."""
        bins_fn, signed = self.tv._AUGMENTATION_SPACE[op]
        bins = bins_fn(10, self.size, self.size)
        magnitude = 0.0 if bins is None else float(bins[bin_index])
        negative = -magnitude if signed else magnitude
        return (op, magnitude), (op, negative)

    def draw(self, n: int, generator) -> torch.Tensor:
        """The variant index of each image's two ops, (n, 2), and -1 where an op is skipped; drawn on the CPU."""
        sub_policy = torch.randint(len(self.probability), (n,), generator=generator)
        applied = torch.rand(n, 2, generator=generator) <= self.probability[sub_policy]
        negative = (torch.rand(n, 2, generator=generator) <= 0.5).long()
        variant = self.variant_of[sub_policy[:, None], torch.arange(2), negative]
        return torch.where(applied, variant, -1)

    def plan(self, variants: torch.Tensor):
        """The host's part of applying `variants` (n, 2). For each op slot: the gather that sorts the images by kind
        of op (composed with the previous slot's), their sorted variants, and where each kind's run of images ends;
        then the gather back to the images' order. Returns (rows, ends): rows (n, ...) for rows_to_device, ends as
        host ints."""
        position = torch.arange(len(variants))  # where each image sits in the current order
        gathers = []
        sorted_variants = []
        ends = []
        for slot in variants.unbind(dim=1):
            # Skipped ops sort last.
            kind = torch.where(slot >= 0, self.kind_of[slot.clamp(min=0)], len(KINDS))
            order = torch.argsort(kind, stable=True)
            gathers.append(position[order])
            sorted_variants.append(slot[order].clamp(min=0))
            ends.append(torch.bincount(kind, minlength=len(KINDS)).cumsum(0)[: len(KINDS)].tolist())
            position = torch.argsort(order)
        rows = {"aa_gather": torch.stack(gathers, dim=1), "aa_variant": torch.stack(sorted_variants, dim=1),
                "aa_back": position}
        return rows, ends

    @functools.cache
    def tables(self, device):
        """Each variant's parameters on `device`, made there once."""
        def on_device(values, dtype=torch.float32):
            return data.to_device(torch.tensor(values, dtype=dtype), device)

        identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        matrices = [geometry_matrix(op, m, self.size) if op in GEOMETRIC_OPS else identity for op, m in self.variants]
        grids = [_affine_grid(theta.view(1, 2, 3), self.size, self.size, self.size, self.size)
                 for theta in on_device(matrices)]
        magnitudes = [m for _, m in self.variants]
        bits = [int(m) if op == "Posterize" else 8 for op, m in self.variants]
        # torchvision's sharpness blur: 5/13 on the centre pixel, 1/13 on each neighbour.
        side = 1.0 / 13.0
        centre = 5.0 / 13.0
        return {
            # shear, translate, rotate: torchvision's sampling grid (the identity for the other ops)
            "grid": torch.cat(grids),
            # brightness, color, contrast, sharpness: the blend factor 1 + m, and 1 - factor as torchvision adds it
            "factor": on_device([1.0 + m for m in magnitudes]),
            "alpha": on_device([1.0 - (1.0 + m) for m in magnitudes]),
            "threshold": on_device([255 * m for m in magnitudes]),  # solarize
            "mask": on_device([((1 << b) - 1) << (8 - b) for b in bits], torch.uint8),  # posterize: the bits kept
            "blur": on_device([[side, side, side], [side, centre, side], [side, side, side]]),
            "fill": self.fill,
        }

    def apply(self, images, rows, ends):
        """Applies the planned ops to uint8 images (n, C, H, W) on the device: `rows` are plan's rows on that
        device, `ends` its host ints."""
        tables = self.tables(images.device)
        for slot, slot_ends in enumerate(ends):
            images = images[rows["aa_gather"][:, slot]]
            variant = rows["aa_variant"][:, slot]
            for (_, op), start, stop in zip(KINDS, [0, *slot_ends], slot_ends):
                if start < stop:
                    images[start:stop] = op(images[start:stop], variant[start:stop], tables)
        return images[rows["aa_back"]]


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
    """data.train_transform for a whole uint8 batch on its device, every random choice made per image: the flip, the
    crop's offsets, the AutoAugment sub-policy and signs, the erasing box. `choose` draws them on the CPU, `plan`
    prepares their use on the host, and `apply` runs them on the device."""

    def __init__(self, mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25,
                 aa_fill=data.AA_FILL, size=data.IMAGE_SIZE):
        data.check_augmentation(crop_padding, auto_augment, random_erase, aa_fill)
        self.size = size  # the images' side: AutoAugment's magnitudes and the erasing boxes depend on it
        self.mean = mean
        self.normalize = data.Normalize(mean, std)
        self.hflip = hflip
        self.padding = crop_padding
        self.random_erase = random_erase
        self.auto_augment = None
        if auto_augment != "none":
            self.auto_augment = BatchAutoAugment(auto_augment, size, aa_fill)

    def prepare(self, device):
        """Puts the constants on `device` once (normalisation, AutoAugment's tables), so that a chunk copies only its
        choices."""
        self.normalize.constants(device)
        if self.auto_augment is not None:
            self.auto_augment.tables(device)

    def choose(self, n, generator):
        """Every random choice for n images, drawn on the CPU: {name: (n, k) int64}, a row per image."""
        choices = {}
        if self.hflip or self.padding:
            flip = torch.zeros(n, dtype=torch.bool)
            if self.hflip:
                flip = torch.rand(n, generator=generator) < 0.5
            top, left = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
            choices["crop"] = torch.stack([flip.long(), top, left], dim=1)
        if self.auto_augment is not None:
            choices["aa"] = self.auto_augment.draw(n, generator)
        if self.random_erase:
            choices["erase"] = data.erasing_boxes(n, self.size, self.size, self.random_erase, generator)
        return choices

    def plan(self, choices):
        """choose's choices made ready for `apply`: (rows for rows_to_device, host ints). AutoAugment's sort by kind
        of op is planned here."""
        rows = {name: c for name, c in choices.items() if name != "aa"}
        ends = []
        if "aa" in choices:
            aa_rows, ends = self.auto_augment.plan(choices["aa"])
            rows.update(aa_rows)
        return rows, ends

    def apply(self, images, rows, ends):
        """Applies the planned choices, their rows on the device, to uint8 images (n, C, H, W); returns floats."""
        if "crop" in rows:
            flip, top, left = rows["crop"].unbind(dim=1)
            images = flip_crop(images, flip.bool(), top, left, self.padding)
        if self.auto_augment is not None:
            images = self.auto_augment.apply(images, rows, ends)
        images = self.normalize(images)
        if self.random_erase:
            # The seed fills the box with the raw channel means, written after normalisation: its quirk, kept.
            images = data.erase(images, rows["erase"], self.mean)
        return images

    def __call__(self, images, generator):
        rows, ends = self.plan(self.choose(len(images), generator))
        return self.apply(images, rows_to_device(rows, images.device), ends)


class DeviceLoader:
    """The training set held on `device` as uint8, batched in the sampler's order and augmented a chunk of batches at
    a time. A chunk's choices are drawn for every rank's images from (seed, epoch, chunk), so that the batches are
    the same on 1 or N processes and after a resume."""

    def __init__(self, images, labels, sampler: data.RepeatedAugmentationSampler, augment: BatchAugment, device,
                 chunk_images: int = 4096):
        if images.shape[-2:] != (augment.size, augment.size):
            raise ValueError(f"images of {tuple(images.shape[-2:])} but augment.size={augment.size}")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.sampler = sampler
        self.augment = augment
        self.device = torch.device(device)
        augment.prepare(self.device)
        self.batch = sampler.batch
        # Chunks count global batches, so that they cut an epoch at the same steps on any number of processes.
        self.batches_per_chunk = max(1, chunk_images // sampler.global_batch)

    def __iter__(self):
        sampler = self.sampler
        order = sampler.epoch_order().view(sampler.steps_per_epoch, self.batch)
        # From the chunk that holds the start step: a chunk's draws depend on its first step alone.
        first_chunk = sampler.start_step // self.batches_per_chunk * self.batches_per_chunk
        for first in range(first_chunk, sampler.steps_per_epoch, self.batches_per_chunk):
            steps = range(first, min(first + self.batches_per_chunk, sampler.steps_per_epoch))

            # Every rank draws the choices for the chunk's global batches, in the global order, and keeps its part.
            generator = torch.Generator().manual_seed(data.derive_seed(sampler.seed, "augment", sampler.epoch, first))
            choices = self.augment.choose(len(steps) * sampler.global_batch, generator)
            mine = {name: data.rank_part(choice, len(steps), sampler.world_size, sampler.rank)
                    for name, choice in choices.items()}
            rows, ends = self.augment.plan(mine)

            # The chunk's image indices and all its random choices reach the device in one copy.
            indices = order[steps.start : steps.stop].flatten()
            rows = rows_to_device({"index": indices, **rows}, self.device)
            images = self.augment.apply(self.images[rows["index"]], rows, ends)
            labels = self.labels[rows["index"]]
            for step, x, y in zip(steps, images.split(self.batch), labels.split(self.batch)):
                if step >= sampler.start_step:
                    yield x, y
