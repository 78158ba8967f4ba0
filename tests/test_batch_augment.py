"""The device pipeline (augment.BatchAugment, augment.DeviceLoader) against torchvision's per-image ops."""
import math
import random

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import augment
import data
from conftest import images

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
OFF = dict(hflip=False, crop_padding=0, auto_augment="none", random_erase=0.0)


def test_flip_crop_equals_torchvision_flip_pad_crop():
    batch, g = images(24), torch.Generator().manual_seed(1)
    flip = torch.rand(24, generator=g) < 0.5
    top, left = torch.randint(0, 9, (2, 24), generator=g)
    out = augment.flip_crop(batch, flip, top, left, padding=4)
    for i in range(24):
        img = TF.horizontal_flip(batch[i]) if flip[i] else batch[i]
        expected = TF.crop(TF.pad(img, [4]), int(top[i]), int(left[i]), 32, 32)
        assert torch.equal(out[i], expected), i


def test_erase_equals_torchvision_erase():
    batch, value = torch.randn(6, 3, 32, 32), (0.4914, 0.4822, 0.4465)
    boxes = torch.tensor([[0, 0, 5, 7], [3, 10, 20, 4], [31, 31, 1, 1], [5, 5, 0, 0], [0, 0, 31, 31], [2, 9, 30, 1]])
    out = data.erase(batch.clone(), boxes, value)
    for img, o, (i, j, h, w) in zip(batch, out, boxes.tolist()):
        assert torch.equal(o, TF.erase(img, i, j, h, w, torch.tensor(value)[:, None, None]))


def seeds_erasing(rng, h, w, scale=(0.02, 0.4), r1=0.3):
    """The seed's RandomErasing loop for one image that is erased (Zhong et al.'s code): (height, width) or None."""
    for _ in range(100):
        target_area = rng.uniform(*scale) * h * w
        aspect_ratio = rng.uniform(r1, 1 / r1)
        bh, bw = int(round(math.sqrt(target_area * aspect_ratio))), int(round(math.sqrt(target_area / aspect_ratio)))
        if bw < w and bh < h:
            return bh, bw
    return None


@pytest.mark.parametrize("size", [32, 64])
def test_erasing_boxes_follow_the_seeds_rule(size):
    n = 20000
    # The boxes BatchAugment draws for images of `size`: inside the image, and over all of it.
    ours = augment.BatchAugment(MEAN, STD, **{**OFF, "random_erase": 0.25}, size=size).choose(
        n, torch.Generator().manual_seed(0))["erase"]
    erased = ours[:, 2] > 0
    assert ((ours[:, 0] + ours[:, 2]) <= size).all() and ((ours[:, 1] + ours[:, 3]) <= size).all()
    assert (ours[:, 0] + ours[:, 2]).max() == size and (ours[:, 1] + ours[:, 3]).max() == size
    assert (ours[erased, 2:] < size).all() and (ours[erased, 2:] >= 1).all()
    assert (ours[~erased][:, 2:] == 0).all()
    # p = 0.25 per image (5-sigma bound).
    assert abs(erased.float().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    rng = random.Random(0)
    theirs = torch.tensor([seeds_erasing(rng, size, size) for _ in range(8000)]).float()
    hw = ours[erased, 2:].float()
    # Height, width, area and aspect ratio of the boxes distributed as the seed's (5-sigma bounds on the means).
    for stat in (lambda b: b[:, 0], lambda b: b[:, 1], lambda b: b[:, 0] * b[:, 1], lambda b: b[:, 0] / b[:, 1]):
        a, b = stat(hw), stat(theirs)
        assert abs(a.mean() - b.mean()) < 5 * math.sqrt(a.var() / len(a) + b.var() / len(b))
    # Placement is uniform: a box's top is on average in the middle of its range 0..size-h.
    slack = (size - ours[erased, 2]).float()
    assert abs((ours[erased, 0] / slack.clamp(min=1)).mean() - 0.5) < 0.02


def test_erasing_aspect_ratio_is_uniform_on_a_linear_scale():
    # On a large image the first try always fits, so the box's h/w is the drawn ratio (up to rounding).
    n, size = 20000, 2000
    boxes = data.erasing_boxes(n, size, size, 1.0, torch.Generator().manual_seed(1), scale=(0.02, 0.2))
    ratio = boxes[:, 2].double() / boxes[:, 3]
    low, high = 0.3, 1 / 0.3
    assert ratio.min() > low - 0.01 and ratio.max() < high + 0.02
    # Uniform on [0.3, 1/0.3]: mean 1.817 and P(ratio < 1) = 0.231; log-uniform would give 1.263 and 0.5.
    assert abs(ratio.mean() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * n) + 0.005
    below = (ratio < 1).double().mean()
    assert abs(below - (1 - low) / (high - low)) < 5 * math.sqrt(0.25 / n)


def reference_op(img, op, magnitude, fill):
    """Each AutoAugment op written as the torchvision functional call with its parameters."""
    nearest = InterpolationMode.NEAREST
    shear = math.degrees(math.atan(magnitude))
    calls = {
        "ShearX": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                                    interpolation=nearest, fill=fill, center=[0, 0]),
        "ShearY": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear],
                                    interpolation=nearest, fill=fill, center=[0, 0]),
        "TranslateX": lambda: TF.affine(img, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                                        interpolation=nearest, fill=fill),
        "TranslateY": lambda: TF.affine(img, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                                        interpolation=nearest, fill=fill),
        "Rotate": lambda: TF.rotate(img, angle=magnitude, interpolation=nearest, fill=fill),
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(img, int(magnitude)),
        "Solarize": lambda: TF.solarize(img, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
        "Invert": lambda: TF.invert(img),
    }
    return calls[op]()


def test_the_reference_is_what_torchvision_autoaugment_runs_with_its_fill():
    img = images(1)[0]
    for fill in (0, 128):
        tv = augment.BatchAutoAugment(fill=fill).tv
        for op, m in augment.BatchAutoAugment().variants + [("ShearX", 0.2), ("ShearX", -0.1)]:
            expected = tv._apply_image_or_video_transform(img, op, m, tv.interpolation, tv._fill)
            assert torch.equal(reference_op(img, op, m, fill), expected), (op, m, fill)
    assert not torch.equal(reference_op(img, "Rotate", 20.0, 0), reference_op(img, "Rotate", 20.0, 128))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def run_ops(aa, images, variants):
    """BatchAutoAugment's host plan and device apply on images (on any device), each with its (2,) variants."""
    rows, ends = aa.plan(variants)
    return aa.apply(images, augment.rows_to_device(rows, images.device), ends)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("fill, size", [(128, 32), (0, 32), (128, 64)])
def test_every_autoaugment_op_equals_torchvision_on_each_image_exactly(fill, size, device):
    batch, tested = images(3, size=size).to(device), set()
    # Every (op, magnitude) of the CIFAR-10 policy, and the geometric ones of SVHN's, which adds ShearX: at 64 px the
    # shear's centre, the grids and the translations are the image's.
    for policy, ops in (("cifar10", None), ("svhn", augment.GEOMETRIC_OPS)):
        aa = augment.BatchAutoAugment(policy, size, fill)
        for index, (op, magnitude) in enumerate(aa.variants):
            if ops is None or op in ops:
                out = run_ops(aa, batch, torch.tensor([[index, -1]] * len(batch)))
                for i in range(len(batch)):
                    assert torch.equal(out[i], reference_op(batch[i], op, magnitude, fill)), (op, magnitude, i)
                tested.add(op)
    assert tested == {"Invert", "Contrast", "Rotate", "TranslateX", "Sharpness", "ShearY", "TranslateY",
                      "AutoContrast", "Equalize", "Solarize", "Posterize", "Color", "Brightness", "ShearX"}


def test_signed_ops_come_in_both_signs_with_the_policy_magnitudes():
    aa = augment.BatchAutoAugment("cifar10")
    rotations = [m for op, m in aa.variants if op == "Rotate"]
    assert pytest.approx(30 * 2 / 9) in rotations and pytest.approx(-30 * 2 / 9) in rotations
    assert ("Solarize", pytest.approx(1 - 5 / 9)) in aa.variants  # unsigned: one sign only
    assert not any(op == "Solarize" and m < 0 for op, m in aa.variants)


def test_mixed_batch_equals_applying_each_images_ops_in_order():
    aa, batch = augment.BatchAutoAugment("cifar10"), images(40)
    variants = aa.draw(40, torch.Generator().manual_seed(3))
    out = run_ops(aa, batch, variants)
    for i in range(40):
        expected = batch[i]
        for v in variants[i].tolist():
            if v >= 0:
                expected = reference_op(expected, *aa.variants[v], 128)
        assert torch.equal(out[i], expected), i


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("policy", ["cifar10", "svhn", "imagenet"])
def test_batch_augment_equals_torchvision_per_image_with_the_same_draws(policy, size):
    n, batch = 24, images(24, size=size)
    aug = augment.BatchAugment(MEAN, STD, auto_augment=policy, random_erase=0.5, size=size)
    out = aug(batch, torch.Generator().manual_seed(4))
    # BatchAugment's draws, in its order: flips, crop offsets, AutoAugment, erasing boxes.
    g = torch.Generator().manual_seed(4)
    flip = torch.rand(n, generator=g) < 0.5
    top, left = torch.randint(0, 9, (2, n), generator=g)
    variants = aug.auto_augment.draw(n, g)
    boxes = data.erasing_boxes(n, size, size, 0.5, g)
    assert flip.any() and (variants >= 0).any() and (boxes[:, 2] > 0).any()
    for i in range(n):
        img = TF.crop(TF.pad(TF.horizontal_flip(batch[i]) if flip[i] else batch[i], [4]), top[i], left[i], size, size)
        for v in variants[i].tolist():
            if v >= 0:
                img = reference_op(img, *aug.auto_augment.variants[v], 128)
        img = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), MEAN, STD)
        img = TF.erase(img, *boxes[i].tolist(), torch.tensor(MEAN)[:, None, None])
        # Normalisation is one scale and shift here, two steps in torchvision: equal up to float rounding.
        torch.testing.assert_close(out[i], img)


@pytest.mark.parametrize("policy", ["cifar10", "svhn", "imagenet"])
@pytest.mark.parametrize("size", [32, 64])
def test_autoaugment_magnitudes_are_torchvisions_at_the_image_size(policy, size):
    # Translate is 150/331 of the image's width: 14.5 px at its largest at 32, 29 px at 64.
    aa = augment.BatchAugment(MEAN, STD, auto_augment=policy, size=size).auto_augment
    tv = v2.AutoAugment(v2.AutoAugmentPolicy(policy))
    expected = set()
    for sub_policy in tv._policies:
        for op, _, bin_index in sub_policy:
            bins = torch.linspace(0.0, 150.0 / 331.0 * size, 10) if op.startswith("Translate") else None
            if bins is None:
                bins = tv._AUGMENTATION_SPACE[op][0](10, size, size)
            magnitude = 0.0 if bins is None else float(bins[bin_index])
            signed = tv._AUGMENTATION_SPACE[op][1]
            expected |= {(op, magnitude), (op, -magnitude if signed else magnitude)}
    assert set(aa.variants) == expected


def test_augmentation_refuses_images_of_another_size_than_its_own():
    sampler = data.RepeatedAugmentationSampler(8, 4)
    with pytest.raises(ValueError, match="augment.size=32"):
        augment.DeviceLoader(images(8, size=64), torch.arange(8), sampler, augment.BatchAugment(MEAN, STD), "cpu")


def test_erased_boxes_hold_the_raw_channel_means():
    batch = images(64)
    out = augment.BatchAugment(MEAN, STD, **{**OFF, "random_erase": 1.0})(batch, torch.Generator().manual_seed(0))
    changed = out != data.Normalize(MEAN, STD)(batch)
    assert changed.any((1, 2, 3)).all()  # p = 1: every image has a box
    for c, mean in enumerate(MEAN):
        assert (out[:, c][changed[:, c]] == torch.tensor(mean)).all()


def expected_variant_frequencies(aa, slot):
    """P(variant) for one op slot, from torchvision's policy table: sub-policy 1/25, op probability, sign 1/2."""
    expected = torch.zeros(len(aa.variants) + 1)  # last entry: op skipped
    bins = {op: fn for op, (fn, _) in aa.tv._AUGMENTATION_SPACE.items()}
    for sub_policy in aa.tv._policies:
        op, probability, bin_index = sub_policy[slot]
        magnitudes = bins[op](10, 32, 32)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[bin_index])
        signed = aa.tv._AUGMENTATION_SPACE[op][1]
        for m in ((magnitude, -magnitude) if signed else (magnitude,)):
            expected[aa.variants.index((op, m))] += probability / len(aa.tv._policies) / (2 if signed else 1)
        expected[-1] += (1 - probability) / len(aa.tv._policies)
    return expected


@pytest.mark.parametrize("slot", [0, 1])
def test_sub_policy_and_ops_are_drawn_per_image(slot):
    aa, n = augment.BatchAutoAugment("cifar10"), 50000
    variants = aa.draw(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(variants[:, slot] + 1, minlength=len(aa.variants) + 1).roll(-1).float()
    expected = expected_variant_frequencies(aa, slot) * n
    # Each count within 5 sigma of its binomial expectation.
    assert ((counts - expected).abs() <= 5 * (expected * (1 - expected / n)).sqrt() + 1).all()
    # Within one batch of 128, many different sub-policies are used (a per-batch choice would give one).
    small = aa.draw(128, torch.Generator().manual_seed(1))
    assert len({tuple(v) for v in small.tolist()}) > 20


def test_without_augmentation_the_batch_is_only_normalised():
    batch = images()
    aug = augment.BatchAugment(MEAN, STD, hflip=False, crop_padding=0, auto_augment="none", random_erase=0.0)
    torch.testing.assert_close(aug(batch, torch.Generator()), data.Normalize(MEAN, STD)(batch))


@pytest.mark.parametrize("flag, on", [("hflip", True), ("crop_padding", 4), ("auto_augment", "cifar10"),
                                      ("random_erase", 1.0)])
def test_each_flag_changes_the_batch(flag, on):
    batch = images(32)
    plain = augment.BatchAugment(MEAN, STD, **OFF)(batch, torch.Generator().manual_seed(0))
    augmented = augment.BatchAugment(MEAN, STD, **{**OFF, flag: on})(batch, torch.Generator().manual_seed(0))
    changed = [not torch.equal(a, b) for a, b in zip(plain, augmented)]
    assert 0 < sum(changed) <= 32


def test_flip_rate_and_crop_offsets_are_per_image_and_uniform():
    n = 4000
    batch = torch.arange(32, dtype=torch.uint8).repeat(n, 3, 32, 1)  # each row 0..31: a flip reverses it
    out = augment.BatchAugment((0, 0, 0), (1, 1, 1), hflip=True, crop_padding=0, auto_augment="none",
                            random_erase=0.0)(batch, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, 1]
    assert abs(flipped.float().mean() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_a_batch_depends_only_on_its_generator():
    batch, aug = images(), augment.BatchAugment(MEAN, STD)
    a = aug(batch, torch.Generator().manual_seed(5))
    torch.manual_seed(99)
    assert torch.equal(aug(batch, torch.Generator().manual_seed(5)), a)
    assert not torch.equal(aug(batch, torch.Generator().manual_seed(6)), a)


def loader(num_images=100, batch=8, reps=2, rank=0, world_size=1, chunk_images=24, **recipe):
    imgs, labels = images(num_images), torch.arange(num_images)
    sampler = data.RepeatedAugmentationSampler(num_images, batch * world_size, reps, rank, world_size, seed=7)
    aug = augment.BatchAugment(MEAN, STD, **(recipe or OFF))
    return augment.DeviceLoader(imgs, labels, sampler, aug, torch.device("cpu"), chunk_images=chunk_images), imgs


def test_device_loader_yields_the_samplers_order_in_batches():
    dl, imgs = loader()
    dl.sampler.set_epoch(1)
    batches = list(dl)
    assert len(batches) == 200 // 8
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, dl.sampler.epoch_order())
    assert torch.equal(torch.cat([x for x, _ in batches]), data.Normalize(MEAN, STD)(imgs[labels]))


def test_device_loader_resumes_mid_chunk_with_the_same_batches():
    dl, _ = loader(hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.5)
    dl.sampler.set_epoch(2)
    full = list(dl)
    dl.sampler.set_epoch(2, start_step=7)  # chunks hold 3 batches: step 7 is inside the third
    resumed = list(dl)
    assert len(resumed) == len(full) - 7
    for (x, y), (x2, y2) in zip(full[7:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_device_loader_ranks_see_disjoint_samples():
    per_rank = []
    for rank in range(2):
        dl, _ = loader(rank=rank, world_size=2)
        per_rank.append(torch.cat([y for _, y in dl]))
    single, _ = loader(batch=16)
    # Together the two ranks see exactly the samples of the 1-process epoch (global batch 16 in both).
    assert sorted(torch.cat(per_rank).tolist()) == sorted(torch.cat([y for _, y in single]).tolist())
    assert len(per_rank[0]) == len(per_rank[1]) == 96


def test_device_loader_ranks_augment_their_parts_of_the_one_process_batches():
    recipe = dict(hflip=True, crop_padding=4, auto_augment="cifar10", random_erase=0.5)
    single, _ = loader(batch=16, chunk_images=48, **recipe)
    ranks = [loader(batch=8, rank=rank, world_size=2, chunk_images=48, **recipe)[0] for rank in range(2)]
    for dl in (single, *ranks):
        dl.sampler.set_epoch(1)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        # The same images, augmented the same way: rank r holds the r-th half of each global batch.
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)

