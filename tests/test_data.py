import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import data
from conftest import (RunsCode, accept_cifar, accept_svhn, images, md5, write_cifar, write_folder, write_svhn,
                      write_tiny_imagenet)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ---- CIFAR from its on-disk format, read by torchvision
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_the_real_file_format(tmp_path, monkeypatch, name):
    folder, written = write_cifar(tmp_path, name)
    accept_cifar(monkeypatch, folder, name)
    ds = data.load_dataset(name, tmp_path)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    assert ds.train_images.shape == (6 * len(train_files), 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (6, 3, 32, 32)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    assert ds.train_labels.tolist() == sum((written[f][label_key] for f in train_files), [])
    # Row layout: 1024 red values, then green, then blue, each row-major.
    row = written[train_files[0]]["data"][2]
    assert ds.train_images[2, 1, 3, 5] == row[1024 + 3 * 32 + 5]
    assert ds.classes == [f"class{i}" for i in range(10 if name == "cifar10" else 100)]
    assert (ds.mean, ds.std) == data.CIFAR[name][1]


# One process of the download test: torchvision's fetch of the archive (a file here) slowed down, half the archive,
# a pause, the rest, each fetch noted in fetches.txt; data.download starts when the test says go.
DOWNLOAD_AT_ONCE = """
import json, os, sys, time
from pathlib import Path
from torchvision.datasets import CIFAR10, utils
import data

archive, root, go = map(Path, sys.argv[1:4])
for key, value in json.loads(sys.argv[4]).items():
    setattr(CIFAR10, key, value)

def slow_fetch(url, filename, *args, **kwargs):
    with open(root.parent / "fetches.txt", "a") as f:
        f.write(f"{os.getpid()}\\n")
    content = archive.read_bytes()
    with open(filename, "wb") as f:
        f.write(content[: len(content) // 2])
        f.flush()
        time.sleep(1)
        f.write(content[len(content) // 2:])

utils._urlretrieve = slow_fetch
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
data.download("cifar10", root)
"""


def test_two_processes_that_download_into_one_folder_at_once_fetch_once(tmp_path):
    src, _ = write_cifar(tmp_path / "src", per_batch=64)
    archive = tmp_path / CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=CIFAR10.base_folder)
    files = {kind: [[name, md5(src / name)] for name, _ in getattr(CIFAR10, kind)]
             for kind in ("train_list", "test_list")}
    checks = {"url": archive.as_uri(), "tgz_md5": md5(archive), **files,
              "meta": {**CIFAR10.meta, "md5": md5(src / CIFAR10.meta["filename"])}}
    root = tmp_path / "data"
    go = tmp_path / "go"
    command = [sys.executable, "-c", DOWNLOAD_AT_ONCE, str(archive), str(root), str(go), json.dumps(checks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    try:
        assert [p.stdout.readline() for p in processes] == ["ready\n", "ready\n"]
        go.touch()
        codes = [p.wait(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
            p.communicate()
    assert codes == [0, 0]
    assert len((tmp_path / "fetches.txt").read_text().splitlines()) == 1  # the other found the files, whole
    assert (root / archive.name).read_bytes() == archive.read_bytes()
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        assert (root / CIFAR10.base_folder / name).read_bytes() == (src / name).read_bytes()


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10 not found in"):
        data.load_dataset("cifar10", tmp_path)


def test_missing_cifar_batch_is_named(cifar_root):
    os.remove(cifar_root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        data.load_dataset("cifar10", cifar_root)


def test_corrupt_cifar_batch_is_named(cifar_root):
    (cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02 not a pickle")
    with pytest.raises(ValueError, match="test_batch is damaged"):
        data.load_dataset("cifar10", cifar_root)


def test_cifar_pickle_that_would_run_code_is_refused(cifar_root, tmp_path, monkeypatch):
    # torchvision unpickles only files whose md5 is CIFAR's: this one is not, so it is never unpickled.
    monkeypatch.chdir(tmp_path)
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(), "labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_1 is damaged"):
        data.load_dataset("cifar10", cifar_root)
    assert not (tmp_path / "pwned").exists()


# ---- SVHN from its .mat files, Tiny-ImageNet from its tree, read in place
def test_svhn_loader_reads_the_real_file_format(tmp_path, monkeypatch):
    written = write_svhn(tmp_path, train=12, test=4)
    accept_svhn(monkeypatch, tmp_path)
    ds = data.load_dataset("svhn", tmp_path)
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    x, y = written["train"]
    # X is (row, column, channel, image); label 10 is the digit 0.
    assert ds.train_images[5, 2, 7, 3] == x[7, 3, 2, 5]
    assert torch.equal(ds.train_images, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert ds.train_labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2] == (y[:, 0] % 10).tolist()
    assert ds.classes == [str(c) for c in range(10)] and (ds.mean, ds.std) == data.SVHN_STATS


def test_missing_or_damaged_svhn_file_is_named(tmp_path, monkeypatch):
    write_svhn(tmp_path)
    accept_svhn(monkeypatch, tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes((tmp_path / "train_32x32.mat").read_bytes()[:-10])
    with pytest.raises(ValueError, match="train_32x32.mat is damaged"):
        data.load_dataset("svhn", tmp_path)
    write_svhn(tmp_path / "other")
    accept_svhn(monkeypatch, tmp_path / "other")
    (tmp_path / "other" / "test_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match="lacks test_32x32.mat"):
        data.load_dataset("svhn", tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="svhn not found in"):
        data.load_dataset("svhn", tmp_path / "nowhere")


def test_tinyimagenet_reads_its_tree_in_place(tmp_path):
    folder, val = write_tiny_imagenet(tmp_path, size=16)
    files = sorted(p for p in tmp_path.rglob("*"))
    for path in files:  # read-only: the loader writes nothing, converts nothing
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        ds = data.load_dataset("tinyimagenet", tmp_path)
    finally:
        for path in files:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert sorted(p for p in tmp_path.rglob("*")) == files
    assert ds.classes == ["goldfish, Carassius auratus", "European fire salamander", "test class"]
    assert ds.train_images.shape == (9, 3, 16, 16) and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (ds.mean, ds.std) == data.TINY_STATS
    # Each val image labelled by val_annotations.txt, its pixels the JPEG's as PIL decodes it.
    expected = {}
    for name, wnid in val.items():
        path = folder / "val" / "images" / name
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        expected[name] = (pixels, ["n01443537", "n01629819", "n09999999"].index(wnid))
    assert sorted(ds.test_labels.tolist()) == sorted(label for _, label in expected.values())
    for image, label in zip(ds.test_images, ds.test_labels):
        assert any(torch.equal(image, pixels) and label == want for pixels, want in expected.values())


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "words.txt").unlink(), "words.txt"),
    (lambda f: (f / "val" / "images" / "val_1.JPEG").write_bytes(b"not a jpeg"), "val_1.JPEG: cannot read image"),
    (lambda f: (f / "val" / "images" / "val_2.JPEG").unlink(), "val_2.JPEG"),
    (lambda f: (f / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000001\t0\t0\t1\t1\n"), "n00000001"),
    (lambda f: (f / "train" / "n01443537" / "images" / "n01443537_1.JPEG").write_bytes(b""), "n01443537_1.JPEG"),
])
def test_tinyimagenet_missing_or_damaged_file_is_named(tmp_path, damage, message):
    folder, _ = write_tiny_imagenet(tmp_path, size=8)
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.load_dataset("tinyimagenet", tmp_path)


@pytest.mark.parametrize("name", ["svhn", "tinyimagenet"])
def test_offline_download_names_the_file_to_place_and_a_file_placed_by_hand_is_used(tmp_path, monkeypatch, name):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    root = tmp_path / "data"
    url, filename, checksum = data.ARCHIVES[name][0]
    used = "checked" if name == "svhn" else "checked and extracted"
    with pytest.raises(data.DownloadError) as error:
        data.download(name, root)
    assert str(error.value) == (
        f"could not fetch {name} (URLError: [Errno -3] Temporary failure in name resolution): fetch {url} elsewhere "
        f"and place it as {root / filename} (md5 {checksum}), then run again: it is {used} instead of fetched")
    if name == "svhn":
        write_svhn(root)  # both files placed by hand, the network still off: checked, not fetched
        accept_svhn(monkeypatch, root)
        data.download(name, root)
        (root / "test_32x32.mat").write_bytes(b"cut short")  # damaged: fetched again, which names that file
        with pytest.raises(data.DownloadError, match=r"place it as .*test_32x32.mat \(md5 "):
            data.download(name, root)
        return
    folder, _ = write_tiny_imagenet(tmp_path / "elsewhere", size=8)
    archive = shutil.make_archive(str(root / "tiny-imagenet-200"), "zip", tmp_path / "elsewhere", folder.name)
    monkeypatch.setitem(data.ARCHIVES, "tinyimagenet", [(url, filename, md5(archive))])
    data.download(name, root)
    ours = data.load_dataset(name, root)
    theirs = data.load_dataset(name, tmp_path / "elsewhere")
    assert torch.equal(ours.train_images, theirs.train_images) and torch.equal(ours.test_labels, theirs.test_labels)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="cifar10, cifar100, digits, imagefolder, synthetic"):
        data.load_dataset("mnist")


# ---- digits, the offline demo set
def test_digits_are_real_images_split_deterministically():
    a, b = data.load_digits(), data.load_digits()
    assert len(a.train_images) + len(a.test_images) == 1797 and len(a.test_images) == 359
    assert a.train_images.shape[1:] == (3, 32, 32) and a.train_images.dtype == torch.uint8
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.train_labels, b.train_labels)
    assert set(a.test_labels.tolist()) == set(range(10))
    # Real digits: dark background, bright strokes.
    assert a.train_images.float().mean() < 100 and a.train_images.max() == 255
    flat = a.train_images.double().div(255)
    assert a.mean[0] == pytest.approx(flat.mean().item()) and a.std[0] == pytest.approx(flat.std().item())


# ---- imagefolder
def test_imagefolder_resizes_any_size_bilinearly_to_the_size_asked_rgb(tmp_path):
    write_folder(tmp_path, {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 2})
    # A greyscale image of another size, read as RGB.
    grey = np.random.default_rng(1).integers(0, 256, size=(45, 60), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "train/dog/grey.png")
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    ds = data.load_dataset("imagefolder", tmp_path, size=32)
    assert ds.classes == ["cat", "dog"]
    assert ds.train_images.shape == (6, 3, 32, 32) and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test_labels.tolist() == [0, 1, 1]
    # The reference: PIL's bilinear filter on each file (in ImageFolder's order); nearest or a crop would differ.
    for split, images in (("train", ds.train_images), ("val", ds.test_images)):
        files = sorted(tmp_path.glob(f"{split}/*/*.png"))
        expected = [np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)) for f in files]
        assert torch.equal(images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    assert ds.mean == pytest.approx(tuple(ds.train_images.double().div(255).mean((0, 2, 3)).tolist()))


def test_imagefolder_takes_its_files_own_square_size_or_asks_for_one(tmp_path, monkeypatch):
    write_folder(tmp_path / "square", {"train/cat": 2, "train/dog": 1, "val/cat": 1}, size=(24, 24))
    ds = data.load_dataset("imagefolder", tmp_path / "square")
    assert ds.train_images.shape == (3, 3, 24, 24) and ds.test_images.shape == (1, 3, 24, 24)
    write_folder(tmp_path / "square", {"val/dog": 1}, size=(20, 20))
    with pytest.raises(ValueError, match=r"not all of one square size \(24x24 .*20x20 .*--img-size"):
        data.load_dataset("imagefolder", tmp_path / "square")
    write_folder(tmp_path / "wide", {"train/cat": 1, "train/dog": 1, "val/cat": 1}, size=(40, 24))
    with pytest.raises(ValueError, match=r"\(40x24 .*--img-size"):
        data.load_dataset("imagefolder", tmp_path / "wide")
    # Too large for the device: said before any image is decoded. 3 images of 3x40x40 bytes = 14,400.
    monkeypatch.setattr(data, "read_image", lambda *args: pytest.fail("an image was read"))
    with pytest.raises(ValueError, match=r"3 images of 40x40 take 0.0 GiB .* choose a smaller --img-size"):
        data.load_dataset("imagefolder", tmp_path / "wide", size=40, max_bytes=14_399)


@pytest.mark.parametrize("name, size", [("cifar10", 24), ("digits", 48), ("synthetic", 64)])
def test_a_dataset_held_in_memory_is_resized_to_the_size_asked(tmp_path, monkeypatch, name, size):
    if name == "cifar10":
        folder, _ = write_cifar(tmp_path)
        accept_cifar(monkeypatch, folder)
    small = data.ImageData(images(4), torch.arange(4), images(4, seed=1), torch.arange(4), [], MEAN, STD)
    monkeypatch.setattr(data, "load_synthetic", lambda: small)  # 4 images, not 60,000
    native = data.load_dataset(name, tmp_path)
    ds = data.load_dataset(name, tmp_path, size=size)
    assert ds.train_images.shape[1:] == (3, size, size) and ds.test_images.shape[1:] == (3, size, size)
    expected = TF.resize(native.test_images, [size, size], antialias=True)  # torchvision's bilinear, antialiased
    assert (ds.test_images.int() - expected.int()).abs().max() <= 1
    assert torch.equal(ds.train_labels, native.train_labels)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"train/cat": 2, "val/cat": 1}, "1 class"),
        ({"train/cat": 0, "train/dog": 0, "val/cat": 0}, "no images"),
        ({"train/cat": 1, "train/dog": 1, "val/cow": 1}, "cow"),
        ({"train/cat": 1, "train/dog": 1}, "val"),
    ],
)
def test_imagefolder_bad_layouts_are_explained(tmp_path, spec, message):
    write_folder(tmp_path, spec)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize("spec, empty", [({"train/cat": 1, "train/dog": 0, "val/cat": 1}, "train/dog"),
                                         ({"train/cat": 1, "train/dog": 1, "val/cat": 1, "val/dog": 0}, "val/dog")])
def test_imagefolder_refuses_an_empty_class_folder_naming_it_and_the_layout(tmp_path, spec, empty):
    write_folder(tmp_path, spec)
    message = f"{tmp_path / empty} holds no images (.jpg"
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        data.load_dataset("imagefolder", tmp_path)
    assert str(refused.value).endswith(f"DIR/train/<class>/*, DIR/val/<class>/* (here DIR is {tmp_path})")


def test_imagefolder_unreadable_image_is_named(tmp_path):
    write_folder(tmp_path, {"train/cat": 1, "train/dog": 1, "val/cat": 1})
    (tmp_path / "train/dog/broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_dataset("imagefolder", tmp_path)


# ---- the per-image reference pipeline (torchvision's transforms)
def augment(transform, batch, seed=0):
    """Each image through `transform`, its random draws seeded by seed * 1000 + its index."""
    out = []
    for i, image in enumerate(batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            out.append(transform(image))
    return torch.stack(out)


OFF = dict(hflip=False, crop_padding=0, auto_augment="none", random_erase=0.0)


def test_without_augmentation_only_normalises():
    batch = images()
    out = augment(data.train_transform(MEAN, STD, **OFF), batch)
    torch.testing.assert_close(out, data.Normalize(MEAN, STD)(batch))


@pytest.mark.parametrize("flag, on", [("hflip", True), ("crop_padding", 4), ("auto_augment", "cifar10"),
                                      ("random_erase", 1.0)])
def test_each_augmentation_flag_changes_the_output(flag, on):
    batch = images()
    plain = augment(data.train_transform(MEAN, STD, **OFF), batch)
    augmented = augment(data.train_transform(MEAN, STD, **{**OFF, flag: on}), batch)
    changed = [not torch.equal(a, b) for a, b in zip(plain, augmented)]
    assert any(changed)
    if flag != "random_erase":  # the others leave some images untouched (flip p=0.5, zero shift, identity ops)
        assert not all(changed) or flag == "auto_augment"


def test_hflip_outputs_are_the_image_or_its_mirror():
    batch = images(32)
    out = augment(data.train_transform(MEAN, STD, **{**OFF, "hflip": True}), batch)
    plain = data.Normalize(MEAN, STD)(batch)
    flipped = [torch.allclose(o, p.flip(-1), atol=1e-5) for o, p in zip(out, plain)]
    assert all(f or torch.allclose(o, p, atol=1e-5) for f, o, p in zip(flipped, out, plain))
    assert 4 <= sum(flipped) <= 28


def test_crop_is_a_shift_of_the_zero_padded_image():
    batch = images(8)
    out = augment(data.train_transform((0, 0, 0), (1, 1, 1), **{**OFF, "crop_padding": 4}), batch)
    padded = torch.nn.functional.pad(batch.float() / 255, (4, 4, 4, 4))
    for o, p in zip(out, padded):
        assert any(torch.allclose(o, p[:, dy:dy + 32, dx:dx + 32], atol=1e-6) for dy in range(9) for dx in range(9))


def test_default_pipeline_is_the_seeds_recipe():
    steps = data.train_transform(MEAN, STD).transforms
    kinds = [type(t) for t in steps]
    assert kinds == [v2.RandomHorizontalFlip, v2.RandomCrop, v2.AutoAugment, v2.ToDtype, v2.Normalize,
                     v2.Lambda]
    assert steps[1].padding == [4, 4, 4, 4] and steps[2].policy == v2.AutoAugmentPolicy.CIFAR10
    assert steps[2].fill == 128  # the seed's grey

    assert data.train_transform(MEAN, STD, aa_fill=0).transforms[2].fill == 0


def test_erasing_draws_its_box_from_the_samples_seed_and_fills_the_raw_means():
    batch = images(8)
    out = augment(data.train_transform(MEAN, STD, **{**OFF, "random_erase": 1.0}), batch, seed=3)
    plain = data.Normalize(MEAN, STD)(batch)
    for i in range(len(batch)):
        # The box comes from the same draw as the device pipeline's, from torch's default generator.
        top, left, h, w = data.erasing_boxes(1, 32, 32, 1.0, torch.Generator().manual_seed(3000 + i))[0].tolist()
        assert h > 0
        expected = plain[i].clone()
        expected[:, top:top + h, left:left + w] = torch.tensor(MEAN)[:, None, None]
        torch.testing.assert_close(out[i], expected)
        assert torch.equal(out[i][:, top:top + h, left:left + w], expected[:, top:top + h, left:left + w])


@pytest.mark.parametrize("kwargs, flag", [(dict(auto_augment="randaug"), "auto_augment='randaug'"),
                                          (dict(random_erase=1.5), "random_erase=1.5"),
                                          (dict(crop_padding=-1), "crop_padding=-1"),
                                          (dict(aa_fill=256), "aa_fill=256"), (dict(aa_fill=0.5), "aa_fill=0.5")])
def test_bad_augmentation_settings_name_the_parameter(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        data.train_transform(MEAN, STD, **kwargs)


# ---- batch mixing
def test_mix_prob_zero_only_one_hot_encodes():
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    mixed, targets = data.BatchMix(10, prob=0.0)(x, y, random.Random(0))
    assert torch.equal(mixed, x) and torch.equal(targets, torch.nn.functional.one_hot(y, 10).float())


def classify_mixing(mix, trials=600):
    """Counts of batches left alone, cut-mixed (pixels copied) and mixed-up (pixels blended)."""
    torch.manual_seed(0)
    counts, rng = {"none": 0, "cutmix": 0, "mixup": 0}, random.Random(0)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    for _ in range(trials):
        out, targets = mix(x, y, rng)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        if torch.equal(targets, torch.nn.functional.one_hot(y, 10).float()):
            counts["none"] += 1
        elif torch.isin(out, x).all():
            counts["cutmix"] += 1
        else:
            counts["mixup"] += 1
    return counts


def test_half_the_batches_are_mixed_split_evenly_between_cutmix_and_mixup():
    counts = classify_mixing(data.BatchMix(10))
    # 600 trials: each expected count has a standard deviation below 15; allow 4 of them.
    assert abs(counts["none"] - 300) < 60
    assert abs(counts["cutmix"] - 150) < 60 and abs(counts["mixup"] - 150) < 60


@pytest.mark.parametrize("off, left", [("mixup_alpha", "cutmix"), ("cutmix_alpha", "mixup")])
def test_turning_one_mixer_off_leaves_the_other_on_half_the_batches(off, left):
    counts = classify_mixing(data.BatchMix(10, **{off: 0.0}))
    assert abs(counts[left] - 300) < 60 and counts["none"] + counts[left] == 600


def partners_and_lam(targets):
    """Each image's partner and its own weight, read from the mixed one-hot targets of labels 0..B-1."""
    own = targets.diagonal()
    partner = torch.where(own == 1, torch.arange(len(targets)), (targets - torch.diag(own)).argmax(1))
    return partner, own


def test_mixup_blends_each_image_with_its_partner_and_the_targets_alike():
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8)
    out, targets = data.BatchMix(8, cutmix_alpha=0.0, prob=1.0)(x, y, random.Random(1))
    partner, lam = partners_and_lam(targets)
    assert sorted(partner.tolist()) == list(range(8))  # a permutation of the batch
    torch.testing.assert_close(out, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner])


def test_partners_are_a_uniform_random_permutation_as_the_seeds():
    torch.manual_seed(2)
    pairs, rng = torch.zeros(4, 4), random.Random(2)
    for _ in range(2000):
        _, targets = data.BatchMix(4, cutmix_alpha=0.0, prob=1.0)(torch.rand(4, 3, 2, 2), torch.arange(4), rng)
        pairs[torch.arange(4), partners_and_lam(targets)[0]] += 1
    # Every (image, partner) pair has chance 1/4, self-pairs included (a roll by one, torchvision's, has none).
    assert (pairs - 500).abs().max() < 5 * math.sqrt(2000 * 0.25 * 0.75)


def test_cutmix_weights_the_partner_by_the_pixels_it_gave():
    torch.manual_seed(3)
    x, rng = torch.arange(8.0)[:, None, None, None].expand(8, 3, 32, 32), random.Random(3)  # image i: the constant i
    for _ in range(20):
        out, targets = data.BatchMix(8, mixup_alpha=0.0, prob=1.0)(x, torch.arange(8), rng)
        partner, lam = partners_and_lam(targets)
        for i in (partner != torch.arange(8)).nonzero()[:, 0]:
            from_partner = (out[i] == partner[i]).float().mean()
            assert from_partner == pytest.approx(1 - lam[i].item(), abs=1e-6)


# ---- repeated-augmentation sampler
def epoch_slots(num_images, batch, reps, world_size, epoch=0, mode="shuffles"):
    per_rank = []
    for rank in range(world_size):
        sampler = data.RepeatedAugmentationSampler(num_images, batch, reps, rank, world_size, seed=3, mode=mode)
        sampler.set_epoch(epoch)
        per_rank.append(sampler.epoch_order().tolist())
    return per_rank


def global_batches(per_rank, per_rank_batch):
    """Each step's global batch: the ranks' batches of that step, side by side."""
    steps = len(per_rank[0]) // per_rank_batch
    return [sum((r[s * per_rank_batch:(s + 1) * per_rank_batch] for r in per_rank), []) for s in range(steps)]


@pytest.mark.parametrize("mode", data.RA_MODES)
def test_every_image_is_seen_reps_times_per_epoch(mode):
    (single,) = epoch_slots(30, batch=10, reps=3, world_size=1, mode=mode)
    assert (np.bincount(single, minlength=30) == 3).all()


def test_shuffles_mode_is_reps_independent_shuffles_one_after_another():
    (single,) = epoch_slots(30, batch=10, reps=3, world_size=1)
    thirds = [single[k * 30:(k + 1) * 30] for k in range(3)]
    assert all(sorted(third) == list(range(30)) for third in thirds)  # each third is a permutation of the images
    assert thirds[0] != thirds[1] != thirds[2]


@pytest.mark.parametrize("world_size", [1, 2])
def test_in_batch_mode_puts_each_images_copies_in_one_per_rank_batch(world_size):
    # Per-rank batch 12, divisible by reps 3: every batch holds 4 images, each exactly 3 times.
    per_rank = epoch_slots(40, batch=12 * world_size, reps=3, world_size=world_size, mode="in-batch")
    for rank_slots in per_rank:
        for start in range(0, len(rank_slots), 12):
            counts = np.bincount(rank_slots[start:start + 12])
            assert set(counts[counts > 0]) == {3}


def test_in_batch_mode_cuts_copies_only_at_the_ends_of_a_batch():
    # Per-rank batch 64 = 21 * 3 + 1 (the DDP targets' 256 over 4 processes): a run of 3 copies may straddle a
    # batch boundary, so a batch has at most 2 images with fewer than 3 copies, its first and its last.
    (single,) = epoch_slots(120, batch=64, reps=3, world_size=1, mode="in-batch")
    for start in range(0, len(single), 64):
        batch = single[start:start + 64]
        counts = {i: batch.count(i) for i in batch}
        cut = [i for i, c in counts.items() if c < 3]
        assert set(cut) <= {batch[0], batch[-1]} and max(counts.values()) == 3


@pytest.mark.parametrize("mode", data.RA_MODES)
def test_ranks_split_each_global_batch_of_the_single_process_order(mode):
    (single,) = epoch_slots(50, batch=8, reps=3, world_size=1, mode=mode)
    ranks = epoch_slots(50, batch=8, reps=3, world_size=2, mode=mode)
    assert global_batches(ranks, 4) == global_batches([single], 8)  # the same samples at the same steps


def test_epochs_differ_and_the_order_is_the_whole_epochs_whatever_the_start_step():
    (e0,), (e1,) = epoch_slots(40, 8, 2, 1, epoch=0), epoch_slots(40, 8, 2, 1, epoch=1)
    assert e0 != e1
    # The sampler's order always starts at step 0; the loader skips the first start_step batches of it
    # (test_batch_augment.py::test_device_loader_resumes_mid_chunk_with_the_same_batches).
    sampler = data.RepeatedAugmentationSampler(40, 8, 2, seed=3)
    sampler.set_epoch(1, start_step=3)
    assert sampler.epoch_order().tolist() == e1


def test_incomplete_last_batch_is_dropped():
    (single,) = epoch_slots(25, batch=8, reps=1, world_size=1)
    assert len(single) == 24


@pytest.mark.parametrize("kwargs, message", [(dict(global_batch=9, world_size=2), "global_batch=9"),
                                             (dict(global_batch=100), "global_batch=100"),
                                             (dict(global_batch=8, reps=0), "reps=0"),
                                             (dict(global_batch=8, mode="random"), "mode='random'")])
def test_sampler_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.RepeatedAugmentationSampler(num_images=20, **kwargs)


def test_derive_seed_is_a_pure_function_of_its_parts():
    assert data.derive_seed(0, "step", 1, 5) == data.derive_seed(0, "step", 1, 5)
    assert len({data.derive_seed(0, "step", r, s) for r in range(4) for s in range(1000)}) == 4000
    assert 0 <= data.derive_seed("x") < 2**63


def test_normalize_matches_torchvision():
    batch = images(4)
    expected = TF.normalize(batch.float() / 255, MEAN, STD)
    torch.testing.assert_close(data.Normalize(MEAN, STD)(batch), expected)
