"""Host->device traffic of the training loop, counted on the `meta` device: its tensors hold no data, so reading a
device value raises, and every tensor the host hands to the device shows up as an op from a CPU tensor to a meta one
(or, for torch.tensor(data, device=...), which copies below the dispatcher, as that call)."""
import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import augment
import data
import run
import train
from model import ViT, ViTConfig

META = torch.device("meta")


def tensors(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class HostToDevice(TorchDispatchMode):
    """Counts the aten ops that read a CPU tensor and write a meta one: copies (_to_copy, copy_) and ops given host
    data (an index, a table, a scalar tensor)."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(t.device == META for t in tensors(out)) and any(t.device.type == "cpu" for t in tensors((args, kwargs))):
            self.counts[str(func)] += 1
        return out


class TensorsFromHostData(TorchFunctionMode):
    """Counts torch.tensor / torch.as_tensor calls that build a meta tensor from Python data."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]) == META:
                self.counts[func.__name__] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_to_device():
    counts = collections.Counter()
    with TensorsFromHostData(counts), HostToDevice(counts):
        yield counts


def loop_counts(chunk_images, batch=32, chunks=2):
    """Host->device counts of the first `chunks` augmentation chunks of the device loader (full recipe) and of every
    step on their batches: batch mixing, forward, backward, AdamW, scheduler and the loss bookkeeping."""
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sampler = data.RepeatedAugmentationSampler(len(images), batch, reps=1, seed=0)
    with host_to_device() as setup:  # the training set and the run's constants, once
        loader = augment.DeviceLoader(images, torch.arange(1024) % 10, sampler,
                                      augment.BatchAugment(*data.CIFAR10_STATS), META, chunk_images=chunk_images)
    model = ViT(ViTConfig(dim=32, depth=2, heads=2)).to(META)
    args = train.get_args_parser().parse_args([])
    optimizers = train.build_optimizers(args, model, META)
    schedulers = [train.build_scheduler(o, args, steps_per_epoch=sampler.steps_per_epoch) for o in optimizers]
    mix, state = data.BatchMix(10, prob=1.0), run.TrainingState(META, args.log_every)
    precision = train.build_precision(args, torch.device("cpu"))  # fp32: autocast and loss scaling off
    batches, chunk_counts, step_counts = iter(loader), [], []
    for step in range(chunks * loader.batches_per_chunk):
        with host_to_device() as counts:
            images, labels = next(batches)  # a chunk's first batch augments the whole chunk
        if step % loader.batches_per_chunk == 0:
            chunk_counts.append(counts)
        else:
            assert not counts, step
        with host_to_device() as counts:
            images, targets = mix(images, labels, train.seed_step(0, 0, step, META))
            state.add(train.train_step(model, optimizers, schedulers, images, targets, precision, 0.1))
        step_counts.append(counts)
    return setup, chunk_counts, step_counts


def test_a_step_copies_nothing_from_the_host_and_a_chunk_a_fixed_few():
    aa = augment.BatchAutoAugment()
    drawn = [aa.draw(n, torch.Generator().manual_seed(0)) for n in (64, 512)]
    groups = [sum(len(set(slot.tolist()) - {-1}) for slot in variants.T) for variants in drawn]
    assert groups[1] > 1.5 * groups[0]  # (op, magnitude) groups over both op slots: 32 and 56
    small, large = loop_counts(64), loop_counts(512)
    for setup, chunk_counts, step_counts in (small, large):
        assert all(not counts for counts in step_counts), step_counts
        # A chunk copies its image indices and all its random choices in one tensor.
        assert chunk_counts == [{"aten._to_copy.default": 1}] * 2, chunk_counts
    # The loader's setup copies the training set and the run's constants (normalisation, AutoAugment's tables) once,
    # whatever the chunk size.
    assert small[0] == large[0] and small[0]["aten._to_copy.default"] >= 2
