"""The training augmentation of PoorViTs on the training device, a chunk of batches at a time: flip, crop, AutoAugment,
normalisation and random erasing, each choice per image, each op bit for bit torchvision's (data.train_transform).
The choices are drawn on the CPU and reach the device in one copy with the chunk's image indices; nothing is read
back. Per AutoAugment op slot one gather sorts the images by op kind, and each kind runs once on its images.
"""
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
    """Named int64 tensors of one length n, each (n,) or (k, n), moved to `device` in a single copy."""
    if not rows:
        return {}
    flat = [rearrange(row, "... n -> (...) n") for row in rows.values()]
    packed = data.to_device(torch.cat(flat), device).split([len(f) for f in flat])
    return {name: part.view(row.shape) for (name, row), part in zip(rows.items(), packed)}


def geometry_matrix(op, magnitude, size):
    """The inverse affine matrix that torchvision's AutoAugment has affine or rotate build for a geometric op, by
    torchvision's own helper with the arguments those pass it."""
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        # AutoAugment shears about the top-left corner: center [0, 0], which affine moves to (-w/2, -h/2).
        return _get_inverse_affine_matrix([-0.5 * size] * 2, 0.0, [0.0, 0.0], 1.0,
                                          [shear, 0.0] if op == "ShearX" else [0.0, shear])
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


# One call per kind of op and slot, whatever the magnitudes: each image's variant (op, magnitude) indexes the tables.
# Ops without a magnitude are torchvision's own batched functions.
KIND_OPS = {
    "affine": lambda x, v, t: sample_nearest(x, t["grid"][v], t["fill"]),  # shear, translate, rotate
    "Brightness": lambda x, v, t: x.float().mul_(per_image(t["factor"][v])).clamp_(0, 255).to(torch.uint8),
    "Color": lambda x, v, t: blend(x, grey(x), v, t),
    "Contrast": lambda x, v, t: blend(x, grey(x).mean((-3, -2, -1), keepdim=True), v, t),
    "Sharpness": sharpen,
    "Posterize": lambda x, v, t: x & per_image(t["mask"][v]),
    "Solarize": lambda x, v, t: torch.where(x >= per_image(t["threshold"][v]), x.bitwise_not(), x),
    "AutoContrast": lambda x, v, t: TF.autocontrast(x),
    "Equalize": lambda x, v, t: TF.equalize(x),
    "Invert": lambda x, v, t: x.bitwise_not(),
}


class BatchAutoAugment:
    """torchvision's AutoAugment with the sub-policy drawn for each image, not once per batch."""

    def __init__(self, policy: str = "cifar10", size: int = data.IMAGE_SIZE, fill: int = data.AA_FILL):
        # The policy table and magnitude bins are torchvision's (private, pinned version).
        self.tv = v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=fill)
        self.size, self.fill = size, fill
        variants = {}  # (op, magnitude) -> its index
        table = []  # [sub-policy][slot] -> (probability, index of the variant if positive, if negative)
        for sub_policy in self.tv._policies:
            slots = []
            for op, probability, bin_index in sub_policy:
                bins_fn, signed = self.tv._AUGMENTATION_SPACE[op]
                bins = bins_fn(10, size, size)
                magnitude = 0.0 if bins is None else float(bins[bin_index])
                signs = (magnitude, -magnitude if signed else magnitude)
                slots.append((probability, *(variants.setdefault((op, m), len(variants)) for m in signs)))
            table.append(slots)
        self.variants = list(variants)
        self.probability = torch.tensor([[slot[0] for slot in sub] for sub in table])  # (policies, 2)
        self.variant_of = torch.tensor([[slot[1:] for slot in sub] for sub in table])  # (policies, 2, sign)
        kinds = ["affine" if op in GEOMETRIC_OPS else op for op, _ in self.variants]
        self.kind_of = torch.tensor([list(KIND_OPS).index(kind) for kind in kinds])
        self.on_device = {}

    def draw(self, n: int, generator) -> torch.Tensor:
        """(n, 2) variant index of each image's two ops, -1 where the op is skipped (drawn on the CPU)."""
        sub_policy = torch.randint(len(self.probability), (n,), generator=generator)
        applied = torch.rand(n, 2, generator=generator) <= self.probability[sub_policy]
        negative = (torch.rand(n, 2, generator=generator) <= 0.5).long()
        variant = self.variant_of[sub_policy[:, None], torch.arange(2), negative]
        return torch.where(applied, variant, -1)

    def plan(self, variants: torch.Tensor):
        """The host side: per op slot, the gather sorting the images by op kind (composed with the previous slot's),
        their variants and where each kind's run ends; then the gather back. Returns (rows, ends)."""
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
        """Each variant's parameters, made on `device` once: its sampling grid (torchvision's affine grid and matrix;
        identity if not geometric), blend factor 1 + m and 1 - it, solarize threshold, posterize bit mask."""
        if device not in self.on_device:
            identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            matrices = [geometry_matrix(op, m, self.size) if op in GEOMETRIC_OPS else identity
                        for op, m in self.variants]
            bits = [int(m) if op == "Posterize" else 8 for op, m in self.variants]
            params = [[1.0 + m, 1.0 - (1.0 + m), 255 * m, ((1 << b) - 1) << (8 - b)]
                      for (_, m), b in zip(self.variants, bits)]
            a, b = 1.0 / 13.0, 5.0 / 13.0  # torchvision's sharpness blur
            theta, params, blur = (data.to_device(torch.tensor(t, dtype=torch.float32), device)
                                   for t in (matrices, params, [[a, a, a], [a, b, a], [a, a, a]]))
            grids = [_affine_grid(t.view(1, 2, 3), self.size, self.size, self.size, self.size) for t in theta]
            factor, alpha, threshold, mask = params.T
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
    """data.train_transform for a whole uint8 batch on its device, every random choice per image: flip, crop
    offsets, AutoAugment sub-policy and signs, erasing box, drawn on the CPU from `generator` (choose)."""

    def __init__(self, mean, std, hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.25,
                 aa_fill=data.AA_FILL):
        data.check_augmentation(crop_padding, auto_augment, random_erase, aa_fill)
        self.mean, self.std = mean, std
        self.hflip, self.padding, self.random_erase = hflip, crop_padding, random_erase
        self.auto_augment = BatchAutoAugment(auto_augment, fill=aa_fill) if auto_augment != "none" else None
        self.on_device = {}

    def prepare(self, device):
        """Puts the constants on `device` once (normalisation, AutoAugment tables): a chunk copies its choices only."""
        if device not in self.on_device:
            self.on_device[device] = data.to_device(data.normalization(self.mean, self.std), device)
            if self.auto_augment is not None:
                self.auto_augment.tables(device)
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
            boxes = data.erasing_boxes(n, data.IMAGE_SIZE, data.IMAGE_SIZE, self.random_erase, generator)
            choices["erase"] = rearrange(boxes, "n box -> box n")
        return choices

    def plan(self, choices):
        """choose's choices as (rows for rows_to_device, host ints for apply): AutoAugment's sort is planned here."""
        rows, ends = {name: c for name, c in choices.items() if name != "aa"}, []
        if "aa" in choices:
            aa_rows, ends = self.auto_augment.plan(rearrange(choices["aa"], "slot n -> n slot"))
            rows.update(aa_rows)
        return rows, ends

    def apply(self, images, rows, ends):
        """choose's choices, planned, their rows on the device, applied to uint8 images (n, C, H, W): float out."""
        if "crop" in rows:
            flip, top, left = rows["crop"]
            images = flip_crop(images, flip.bool(), top, left, self.padding)
        if self.auto_augment is not None:
            images = self.auto_augment.apply(images, rows, ends)
        images = data.scale_shift(images, self.prepare(images.device))
        if self.random_erase:
            # The seed fills the box with the raw channel means, written after normalisation: its quirk, kept.
            images = data.erase(images, rows["erase"].T, self.mean)
        return images

    def __call__(self, images, generator):
        rows, ends = self.plan(self.choose(len(images), generator))
        return self.apply(images, rows_to_device(rows, images.device), ends)


class DeviceLoader:
    """The training set held on `device` as uint8, batched in the sampler's order and augmented a chunk at a time,
    its choices drawn for every rank's images from (seed, epoch, chunk): alike on 1 or N processes and on resume."""

    def __init__(self, images, labels, sampler: data.RepeatedAugmentationSampler, augment: BatchAugment, device,
                 chunk_images: int = 4096):
        self.images, self.labels = images.to(device), labels.to(device)
        self.sampler, self.augment, self.device = sampler, augment, torch.device(device)
        augment.prepare(self.device)
        self.batch = sampler.batch
        # Chunks count global batches, so that they cut an epoch at the same steps on any number of processes.
        self.batches_per_chunk = max(1, chunk_images // sampler.global_batch)

    def __iter__(self):
        s = self.sampler
        order = s.epoch_order().view(s.steps_per_epoch, self.batch)
        for first in range(s.start_step // self.batches_per_chunk * self.batches_per_chunk, s.steps_per_epoch,
                           self.batches_per_chunk):
            steps = range(first, min(first + self.batches_per_chunk, s.steps_per_epoch))
            generator = torch.Generator().manual_seed(data.derive_seed(s.seed, "augment", s.epoch, first))
            choices = self.augment.choose(len(steps) * s.global_batch, generator)  # in the global order
            mine = {name: data.rank_part(c, len(steps), s.world_size, s.rank) for name, c in choices.items()}
            rows, ends = self.augment.plan(mine)
            indices = order[steps.start : steps.stop].flatten()
            # The chunk's image indices and all its random choices reach the device in one copy.
            rows = rows_to_device({"index": indices, **rows}, self.device)
            images = self.augment.apply(self.images[rows["index"]], rows, ends)
            batches = zip(steps, images.split(self.batch), self.labels[rows["index"]].split(self.batch))
            yield from ((x, y) for step, x, y in batches if step >= s.start_step)
