import contextlib
import errno
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

from contextlib import nullcontext

import einops
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from torchvision.datasets import CIFAR10

import data
import files
import run as machinery
import train
from conftest import (RunsCode, accept_cifar, accept_svhn, md5, write_cifar, write_folder, write_svhn,
                      write_tiny_imagenet)
from conftest import images as conftest_images
from model import ViT, ViTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "4",
        "--batch-size", "64", "--warmup-epochs", "1", "--eval-every", "1", "--log-every", "5", "--device", "cpu"]
NO_AUGMENT = ["--no-hflip", "--crop-padding", "0", "--auto-augment", "none", "--random-erase", "0",
              "--mixup-alpha", "0", "--cutmix-alpha", "0", "--drop-path", "0", "--ra-reps", "1"]


def run(out, *flags):
    args = train.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *flags])
    return train.main(args)


def records(out, kind):
    """metrics.jsonl records of one kind, without the wall-clock fields."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_s", "ms_per_step")} for r in lines if r["kind"] == kind]


def final_weights(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_run(a, b):
    """Bit-identical final weights and the same logged losses, learning rates and accuracies."""
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert records(a, "train") == records(b, "train")
    assert records(a, "eval") == records(b, "eval")


def test_a_run_writes_metrics_summary_and_a_safe_checkpoint(tmp_path):
    summary = run(tmp_path, "--epochs", "2")
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_acc", "best_acc", "best_epoch", "train_seconds", "params", "epochs", "args", "torch",
                "device_name", "git_commit", "cuda", "cudnn", "triton", "driver"):
        assert key in saved, key
    assert saved["complete"] and saved["final_acc"] == summary["final_acc"] and saved["epochs"] == 2
    assert saved["params"] == sum(p.numel() for p in final_weights(tmp_path).values())
    evals = records(tmp_path, "eval")
    assert [r["epoch"] for r in evals] == [1, 2] and evals[-1]["acc"] == saved["final_acc"]
    assert saved["best_acc"] == max(r["acc"] for r in evals)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizers", "schedulers", "step", "args", "config"} <= ckpt.keys()
    assert ckpt["step"] == saved["steps"] == 2 * (3 * 1438 // 64)  # two epochs of --ra-reps 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_records_name_the_gpus_driver_and_the_cuda_cudnn_and_triton_versions(monkeypatch):
    def nvidia_smi(command, **kwargs):  # one line per GPU
        assert command[:2] == ["nvidia-smi", "--query-gpu=driver_version"]
        return subprocess.CompletedProcess(command, 0, stdout="580.82.07\n580.82.07\n")

    monkeypatch.setattr(machinery.subprocess, "run", nvidia_smi)
    versions = machinery.library_versions(torch.device("cuda"))
    assert versions == {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                        "triton": importlib.metadata.version("triton"), "driver": "580.82.07"}
    assert machinery.library_versions(torch.device("cpu"))["driver"] is None  # no nvidia-smi asked

    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])
    monkeypatch.setattr(machinery.subprocess, "run", missing)
    assert machinery.library_versions(torch.device("cuda"))["driver"] is None


def test_last_epoch_is_evaluated_even_off_the_eval_interval(tmp_path):
    run(tmp_path, "--epochs", "3", "--eval-every", "2")
    assert [r["epoch"] for r in records(tmp_path, "eval")] == [2, 3]


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    args = train.get_args_parser().parse_args(["--epochs", "10", "--warmup-epochs", "2", "--lr", "1e-3"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train.build_scheduler(optimizer, args, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)
    cosine = 0.5 * (1 + math.cos(20 / 40 * math.pi))
    assert lrs[30] == pytest.approx(1e-6 + (1e-3 - 1e-6) * cosine)


@pytest.mark.parametrize("epochs, warmup_steps", [(10, 5), (5, 2), (1, 0)])  # round(steps_per_epoch * epochs / 10)
def test_warmup_defaults_to_a_tenth_of_the_epochs(epochs, warmup_steps):
    args = train.get_args_parser().parse_args(["--epochs", str(epochs), "--lr", "1e-3"])
    train.check_args(args)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train.build_scheduler(optimizer, args, steps_per_epoch=5)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(warmup_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(1e-3) and all(lr < 1e-3 for lr in lrs[:-1])


def recipe_lr(step, total, warmup, peak, start, end):
    """The recipe's schedule written out: linear from `start` to `peak` over `warmup` steps, then a half cosine from
    `peak` down to `end` at step `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    return end + (peak - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_every_logged_learning_rate_is_the_recipes_schedule_and_muons_is_scaled_to_its_peak(tmp_path, monkeypatch,
                                                                                            opt):
    real_step, lrs = train.train_step, []  # every optimizer's lr after each step

    def recording_step(model, optimizers, *args):
        loss = real_step(model, optimizers, *args)
        lrs.append([optimizer.param_groups[0]["lr"] for optimizer in optimizers])
        return loss

    monkeypatch.setattr(train, "train_step", recording_step)
    # 22 steps an epoch: 44 in all, 11 of warm-up, every step logged.
    run(tmp_path, "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "2e-3", "--warmup-lr", "1e-5", "--min-lr", "1e-4",
        "--opt", opt, "--muon-lr", "0.03", "--log-every", "1", *NO_AUGMENT)
    logged = {r["step"]: r["lr"] for r in records(tmp_path, "train")}
    assert sorted(logged) == list(range(1, 45))
    for step, lr in logged.items():
        assert lr == pytest.approx(recipe_lr(step, 44, 11, 2e-3, 1e-5, 1e-4), rel=1e-6), step
    # Muon (--opt muon's second optimizer) follows the same curve scaled to --muon-lr: 15 times every value.
    peaks = [2e-3] if opt == "adamw" else [2e-3, 0.03]
    assert len(lrs) == 44
    for step, step_lrs in enumerate(lrs, 1):
        for lr, peak in zip(step_lrs, peaks, strict=True):
            scale = peak / 2e-3
            assert lr == pytest.approx(recipe_lr(step, 44, 11, peak, 1e-5 * scale, 1e-4 * scale), rel=1e-6), step


def test_the_loss_is_cross_entropy_with_label_smoothing_01_on_the_mixed_targets(tmp_path, monkeypatch):
    real_step, steps = train.train_step, []

    def checking_step(model, optimizers, schedulers, images, targets, *args):
        with torch.no_grad():  # stochastic depth off: the forward the step takes, drawing nothing
            logits = model(images)
        loss = real_step(model, optimizers, schedulers, images, targets, *args)
        steps.append((logits, targets.clone(), loss))
        return loss

    monkeypatch.setattr(train, "train_step", checking_step)
    run(tmp_path, "--epochs", "1", *NO_AUGMENT, "--mixup-alpha", "1", "--cutmix-alpha", "1")
    # Written out: soft targets (1 - eps) * y + eps / K for y one-hot or mixed, eps 0.1, K 10 classes.
    for logits, targets, loss in steps:
        soft = 0.9 * targets + 0.1 / 10
        expected = -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    mixed = sum(not torch.equal(t, t.round()) for _, t, _ in steps)
    assert len(steps) == 22 and 0 < mixed < 22  # both kinds of batch met


def test_evaluation_is_deterministic_and_runs_without_stochastic_depth():
    torch.manual_seed(0)
    model = ViT(ViTConfig(patch_size=8, dim=32, depth=2, heads=4, drop_path=0.5))  # in training mode, as the loop
    images, labels = conftest_images(200), torch.arange(200) % 10
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    test_set = train.TestSet(images, labels, data.Normalize(mean, std))
    first, second = (train.evaluate(model, test_set, machinery.Ranks(0, 1, torch.device("cpu")), nullcontext())
                     for _ in range(2))
    assert first == second
    # The independent computation: the same weights without stochastic depth, normalised the textbook way.
    plain = ViT(ViTConfig(patch_size=8, dim=32, depth=2, heads=4, drop_path=0.0))
    plain.load_state_dict(model.state_dict())
    x = (images / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        logits = plain(x)
    assert first[0] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())
    assert first[1] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_a_short_run_on_digits_learns(tmp_path):
    """8 epochs on digits (22 steps each; augmentation, mixing and stochastic depth off) from chance (10%). Measured
    with --seed 0..5 on a 2-core AMD EPYC: 58.2, 47.1, 53.5, 52.6, 43.5, 46.2% (mean 50.2, standard deviation 5.4,
    range 43.5-58.2). The bound 30% lies 13.5 points (2.5 of those deviations) below the worst seed, which leaves room
    for another CPU's rounding, and 20 points above chance; a run whose learning rate never left the warm-up's 1e-6
    (scheduler.step() removed) ends at 11.1%, chance."""
    summary = run(tmp_path, "--epochs", "8", *NO_AUGMENT)
    assert summary["final_acc"] > 30


def test_resume_after_stopping_equals_an_uninterrupted_run(tmp_path):
    # Full recipe on: flip, crop, AutoAugment, erasing, Mixup/CutMix, stochastic depth, 3 repeats.
    full, split = tmp_path / "full", tmp_path / "split"
    run(full, "--epochs", "4", "--eval-every", "2")
    stopped = run(split, "--epochs", "4", "--eval-every", "2", "--stop-after-epochs", "2")
    assert not stopped["complete"] and stopped["final_acc"] is None
    run(split, "--epochs", "4", "--eval-every", "2", "--resume", str(split / "checkpoint.pt"))
    assert_same_run(full, split)
    assert json.loads((split / "summary.json").read_text())["final_acc"] == records(full, "eval")[-1]["acc"]
    # Resuming a finished run trains nothing and reports the same result.
    again = run(split, "--epochs", "4", "--eval-every", "2", "--resume", str(split / "checkpoint.pt"))
    assert again["complete"] and again["final_acc"] == records(full, "eval")[-1]["acc"]
    assert_same_run(full, split)


def test_compiled_training_compiles_once_and_evaluation_adds_no_graph(tmp_path, monkeypatch):
    # Backend aot_eager: the step-2 recompile was a Dynamo guard (on einops' backend table), the same whatever the
    # backend, and inductor's C++ build of these graphs takes about a minute on 2 cores. At 64 px, patch 8 (not the
    # CIFAR size): the graph built before training must be at the data's size, or step 1 compiles another. (Once per
    # process: a second compiled run here, with einops' caches warm, builds 2 graphs whatever its size.)
    real_compile, modes = torch.compile, []

    def compile_aot_eager(model, mode):
        modes.append(mode)
        return real_compile(model, backend="aot_eager")

    graphs, real_evaluate = [], train.evaluate  # Dynamo's graph count before and after each evaluation

    def evaluate(*args):
        before = counters["stats"]["unique_graphs"]
        result = real_evaluate(*args)
        graphs.append((before, counters["stats"]["unique_graphs"]))
        return result

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(data, "EVAL_CHUNK", 256)  # 359 test images: a full chunk and a partial one
    monkeypatch.setattr(einops._backends, "_type2backend", {})  # as in a fresh process: no tensor type seen yet
    torch._dynamo.reset()
    counters.clear()
    try:
        summary = run(tmp_path, "--epochs", "2", "--ra-reps", "1", "--compile", "--compile-mode", "max-autotune",
                      "--img-size", "64")
    finally:
        torch._dynamo.reset()
    assert modes == ["max-autotune"] and summary["compiled"]
    assert (summary["config"]["img_size"], summary["config"]["patch_size"]) == (64, 8)
    # One graph, built before training (forward and backward on zeros), serves the 22 steps of each epoch; the
    # evaluations (the uncompiled module, eval mode, no grad, a partial last chunk) add none.
    assert graphs == [(1, 1), (1, 1)], graphs


def test_compile_defaults_to_cuda_only_and_its_mode_needs_it(monkeypatch):
    parse = train.get_args_parser().parse_args
    for flags, device, compiled in (([], "cuda", True), ([], "cpu", False), (["--no-compile"], "cuda", False),
                                    (["--compile"], "cpu", True)):
        assert train.compiles(parse(flags), torch.device(device)) is compiled, (flags, device)
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs --compile"):
        train.setup_distributed(parse(["--compile-mode", "reduce-overhead", "--device", "cpu"]))


def failing_compile(model, mode):
    def fails(*args):
        raise RuntimeError("Cannot find a working triton installation\nmore lines")
    return fails


def test_a_compile_that_fails_falls_back_to_eager_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(train, "compiles", lambda args, device: True)  # compiling by default, as on CUDA
    summary = run(tmp_path / "fallback", "--epochs", "1", *NO_AUGMENT)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == ["train.py: note: torch.compile failed (RuntimeError: Cannot find a working triton installation): "
                     "training eager (--no-compile skips the attempt)"]
    assert summary["complete"] and not summary["compiled"]
    monkeypatch.undo()
    run(tmp_path / "eager", "--epochs", "1", *NO_AUGMENT)  # the attempt changed nothing: the same run as eager
    assert_same_run(tmp_path / "eager", tmp_path / "fallback")


def test_a_compile_asked_for_that_fails_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", failing_compile)
    code, line = error_line(capsys, tmp_path, "--epochs", "1", "--compile")
    assert code == 2 and line == ("train.py: error: --compile: torch.compile failed (RuntimeError: Cannot find a "
                                  "working triton installation); --no-compile trains eager")


def compile_failing_at(call):
    """A torch.compile whose model runs eager, except that its `call`-th call fails, as a CUDA graph capture can."""
    def fake_compile(model, mode):
        calls = []

        def compiled(*args):
            calls.append(mode)
            if len(calls) == call:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")
            return model(*args)
        return compiled
    return fake_compile


def test_a_capture_that_fails_in_the_warm_up_falls_back_to_eager_and_fails_a_mode_asked_for(tmp_path, monkeypatch,
                                                                                            capsys):
    # CUDA graphs warm up at the first call, record at the second, replay at the third: all before training starts.
    monkeypatch.setattr(torch, "compile", compile_failing_at(3))
    monkeypatch.setattr(train, "compiles", lambda args, device: True)  # compiling by default, as on CUDA
    summary = run(tmp_path / "fallback", "--epochs", "1", *NO_AUGMENT)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == ["train.py: note: torch.compile failed (RuntimeError: CUDA error: operation not permitted when "
                     "stream is capturing): training eager (--no-compile skips the attempt)"]
    assert summary["complete"] and not summary["compiled"]
    code, line = error_line(capsys, tmp_path / "asked", "--epochs", "1", "--compile-mode", "reduce-overhead")
    assert code == 2 and line == ("train.py: error: --compile-mode reduce-overhead: torch.compile failed "
                                  "(RuntimeError: CUDA error: operation not permitted when stream is capturing); "
                                  "--no-compile trains eager")
    assert not (tmp_path / "asked" / "checkpoint.pt").exists()
    monkeypatch.undo()
    run(tmp_path / "eager", "--epochs", "1", *NO_AUGMENT)  # the attempt changed nothing: the same run as eager
    assert_same_run(tmp_path / "eager", tmp_path / "fallback")


class HostTraffic(TorchFunctionMode):
    """Counts tensors built from host data (on a GPU: a copy to the device) and values read back to the host."""

    def __init__(self):
        super().__init__()
        self.built = self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.built += func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor)
        self.reads += func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__)
        return func(*args, **(kwargs or {}))


def test_evaluation_in_chunks_copies_nothing_per_chunk_and_reads_its_counts_once(monkeypatch):
    model = ViT(ViTConfig(patch_size=8, dim=32, depth=2, heads=4)).eval()
    images, labels = conftest_images(300), torch.arange(300) % 10
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    monkeypatch.setattr(data, "EVAL_CHUNK", 128)  # 3 chunks
    with HostTraffic() as traffic:
        test_set = train.TestSet(images, labels, data.Normalize(mean, std))
        acc, loss = train.evaluate(model, test_set, machinery.Ranks(0, 1, torch.device("cpu")), nullcontext())
    assert traffic.built == 2 and traffic.reads == 1  # mean and std once, not per chunk; the counts once
    # The independent computation: one forward over the whole set, normalised the textbook way.
    x = (images / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run(tmp_path, "--epochs", "1")
    with pytest.raises(ValueError, match="depth"):
        run(tmp_path, "--epochs", "1", "--depth", "3", "--resume", str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match="--lr") as refused:
        run(tmp_path, "--epochs", "1", "--lr", "0.01", "--resume", str(tmp_path / "checkpoint.pt"))
    assert "--init-from" not in str(refused.value)
    # A finished run trained longer: the refusal names the way on, a new run from its weights.
    with pytest.raises(ValueError, match="--epochs 1 -> 3") as refused:
        run(tmp_path, "--epochs", "3", "--resume", "auto")
    assert str(refused.value).endswith(f"--init-from {tmp_path / 'checkpoint.pt'} --output-dir NEW_DIR")


@contextlib.contextmanager
def float64():
    """Runs in float64, as tests/float64_train.py runs a torchrun job (see assert_same_run_on_two_processes)."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def torchrun(out, nproc, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "tests/float64_train.py", *TINY, "--output-dir", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "augment",
    [NO_AUGMENT,
     # The seed's DDP columns: each image's 3 copies side by side (per-rank batch 32 cuts some copies at its ends).
     [*NO_AUGMENT, "--ra-reps", "3", "--ra-mode", "in-batch"],
     # Every rank draws its chunk's augmentations with all ranks' (seeded by the chunk alone), so even the per-image
     # augmentations match; --whiten on 2 processes whitens on the 1-process stream's first batches.
     [*NO_AUGMENT, "--hflip", "--crop-padding", "4", "--random-erase", "0.5", "--auto-augment", "cifar10",
      "--ra-reps", "2", "--patch-size", "4", "--dim", "48", "--whiten", "--whiten-images", "100"]],
    ids=["augmentations-off", "in-batch-repeats", "per-image-augmentations-on"],
)
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, augment):
    with float64():
        run(tmp_path / "one", "--epochs", "1", *augment)
    torchrun(tmp_path / "two", 2, "--epochs", "1", *augment)
    assert_same_run_on_two_processes(tmp_path / "one", tmp_path / "two")


def assert_same_run_on_two_processes(one_dir, two_dir):
    """Only the order of floating-point sums differs (the ranks' gradients are averaged). Both runs are float64, where
    a sum's order moves it by about eps = 1.1e-16 of its size. Training amplifies such differences: the float32 runs
    of these tests differed by up to 2e-4 after 44 steps (on one CPU, 5e-5 on another), about 3,000 times float32's
    eps (6e-8). The same amplification in float64 gives about 4e-13; the bound 1e-9 leaves a factor of 2,000 for
    other CPUs, while a rank that trains on the wrong samples, or gradients that are summed instead of averaged,
    move weights by 1e-4 or more in one step. Measured on a 2-core AMD EPYC (family 26): 6e-15 to 1.9e-13."""
    one, two = final_weights(one_dir), final_weights(two_dir)
    assert all(w.dtype == torch.float64 for w in (*one.values(), *two.values()))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-9
    assert records(two_dir, "run")[-1]["world_size"] == 2 and records(one_dir, "run")[-1]["world_size"] == 1
    assert records(two_dir, "run")[-1]["compiled"] is False  # DDP wraps the model, which is not compiled on a CPU
    evals_one, evals_two = records(one_dir, "eval"), records(two_dir, "eval")
    assert [r["acc"] for r in evals_one] == [r["acc"] for r in evals_two]  # counts gathered from both ranks
    assert evals_one[-1]["loss"] == pytest.approx(evals_two[-1]["loss"], rel=1e-5)


def per_rank_draws_on_one_process(monkeypatch, world_size, same_seed_on_ranks):
    """Makes a 1-process run compute what a `world_size`-process run computes with batch mixing and stochastic depth
    on, by design: each step, part r of the global batch (rank r's) is mixed, with a permutation of its own images,
    and goes through the model with rank r's draws, seeded by (seed 0, rank r, step) (--same-seed-on-ranks: rank 0's
    for every part); the update follows the mean of the parts' losses (DDP averages the ranks' gradients). The step
    returns part 0's loss, which rank 0 logs. The draws are written out here, not read from train_one_epoch."""
    real_mix, steps = data.BatchMix.__call__, []
    monkeypatch.setattr(data.BatchMix, "__call__", lambda self, images, labels, rng: (images, labels))  # mixed below

    def step(model, optimizers, schedulers, images, labels, precision, label_smoothing):
        losses = []
        for rank, (x, y) in enumerate(zip(images.chunk(world_size), labels.chunk(world_size))):
            # Seeded as train.seed_step says it seeds (not by calling it): the CPU generator draws the permutation
            # and drop-path, the host generator the mixing choices.
            seed = data.derive_seed(0, "step", 0 if same_seed_on_ranks else rank, len(steps))
            torch.manual_seed(seed)
            rng = random.Random(seed)
            x, targets = real_mix(data.BatchMix(10), x, y, rng)
            losses.append(F.cross_entropy(model(x), targets, label_smoothing=label_smoothing))
        steps.append(len(steps))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        (sum(losses) / world_size).backward()
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
        return losses[0].detach()

    monkeypatch.setattr(train, "train_step", step)


def test_two_process_ddp_with_mixing_and_stochastic_depth_draws_per_rank_or_the_same_with_same_seed_on_ranks(
        tmp_path, monkeypatch):
    """The whole recipe on (flip, crop, AutoAugment, erasing, Mixup/CutMix, stochastic depth 0.1). A 1-process run
    is no reference here: it mixes and drops over the whole global batch with one draw. The 2-process runs equal
    the 1-process runs that draw per part as the design says (per_rank_draws_on_one_process), to the float64 bound
    of assert_same_run_on_two_processes; and the two readings differ by far more, so the ranks' draws matter: a
    run whose ranks all drew rank 0's (or each its own under --same-seed-on-ranks) would fail."""
    flags = ["--epochs", "1", "--ra-reps", "1"]
    for same in (False, True):
        seeding = ["--same-seed-on-ranks"] if same else []
        torchrun(tmp_path / f"two-{same}", 2, *flags, *seeding)
        with float64(), monkeypatch.context() as patch:
            per_rank_draws_on_one_process(patch, 2, same_seed_on_ranks=same)
            run(tmp_path / f"one-{same}", *flags, *seeding)
    for same in (False, True):
        assert_same_run_on_two_processes(tmp_path / f"one-{same}", tmp_path / f"two-{same}")
    per_rank, same_seed = final_weights(tmp_path / "two-False"), final_weights(tmp_path / "two-True")
    assert max((per_rank[k] - same_seed[k]).abs().max().item() for k in per_rank) > 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(node_dirs, *flags):
    """One job on two torchrun agents (nodes) of this machine, c10d rendezvous, gloo, each agent in its own folder as
    on a node's own disk; --output-dir run is relative, so each node has its own. The rendezvous ranks nodes by their
    address: node 0 (127.0.0.1) holds rank 0 at every launch, as the first host name would on a cluster."""
    endpoint = f"127.0.0.1:{free_port()}"
    processes = []
    for node, folder in enumerate(node_dirs):
        folder.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
               "--local-addr", f"127.0.0.{node + 1}", str(ROOT / "tests" / "float64_train.py"), *TINY,
               "--output-dir", "run", *flags]
        processes.append(subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]


def test_a_run_continued_as_a_two_node_torchrun_job_matches_one_process(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    with float64():
        run(nodes[0] / "run", "--epochs", "2", "--stop-after-epochs", "1", *NO_AUGMENT)
        # The 1-process reference continues a copy (a resume equals an uninterrupted run: tested above).
        shutil.copytree(nodes[0] / "run", tmp_path / "one")
        run(tmp_path / "one", "--epochs", "2", "--resume", "auto", *NO_AUGMENT)
    # Epoch 2 on two nodes; node 1 cannot see node 0's checkpoint: rank 0 reads it and sends it to rank 1.
    torchrun_two_nodes(nodes, "--epochs", "2", "--resume", "auto", *NO_AUGMENT)
    assert not (nodes[1] / "run").exists()  # only rank 0 writes
    assert records(nodes[0] / "run", "run")[-1]["world_size"] == 2
    assert_same_run_on_two_processes(tmp_path / "one", nodes[0] / "run")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist' (choose from 'cifar10', 'cifar100'"),
        (["--epochs", "0"], "argument --epochs: 0 is not in (0, inf)"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--lr", "-1"], "argument --lr: -1 is not in (0, inf)"),
        (["--opt", "sgd"], "argument --opt: invalid choice: 'sgd'"),
        (["--heads", "5"], "heads=5 must be a positive divisor of dim=32"),
        (["--latent", "qx"], "latent='qx'"),
        (["--latent", "q", "--latent-dim", "0"], "argument --latent-dim: 0 is not in (0, inf)"),
        (["--latent", "q", "--latent-dim", "200"], "latent_dim=200 must be in 1..32"),
        (["--batch-size", "5000"], "global_batch=5000 exceeds the 4314 samples of an epoch"),
        (["--warmup-epochs", "20"], "--warmup-epochs 20"),
        (["--resume", "nowhere/checkpoint.pt"], "--resume nowhere"),
        (["--whiten", "--dim", "96"], "whitening needs dim >= in_chans*patch_size**2 = 192, got dim=96"),
        (["--dataset", "cifar10", "--data-dir", "nowhere", "--auto-augment", "rand"], "argument --auto-augment"),
        (["--mix-prob", "2"], "argument --mix-prob: 2 is not in [0, 1]"),
        (["--aa-fill", "256"], "argument --aa-fill: 256 is not in [0, 255]"),
        (["--download"], "--download fetches cifar10, cifar100, svhn, tinyimagenet, not --dataset digits"),
        (["--img-size", "36"], "patch_size=8 must divide img_size=36"),
        (["--mlp-latent-dim", "33"], "mlp_latent_dim=33 must be in 0..32"),
        (["--init-from", "nowhere.pt"], "--init-from nowhere.pt: not a readable checkpoint"),
        (["--whiten", "--init-from", "nowhere.pt"], "--whiten and --init-from"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--epochs", "2", "--output-dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    # Refused before any work, or (global_batch, whitening: they need the dataset) leaving no folder behind.
    assert not (tmp_path / "out").exists()


def test_an_existing_run_is_never_overwritten(tmp_path):
    run(tmp_path, "--epochs", "1")
    before = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "checkpoint.pt").read_bytes()
    result = subprocess.run([sys.executable, "train.py", *TINY, "--epochs", "1", "--output-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert ((tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "checkpoint.pt").read_bytes()) == before


def test_variant_flags_train_end_to_end(tmp_path):
    summary = run(tmp_path, "--epochs", "1", "--patch-size", "4", "--dim", "48", "--opt", "lion", "--lr", "1e-4",
                  "--weight-decay", "0.5", "--latent", "kv", "--latent-dim", "16", "--num-cls", "2",
                  "--cls-pool", "mean", "--pos-embed", "sincos", "--whiten", "--whiten-images", "200", "--ra-reps", "1")
    assert summary["complete"] and summary["config"]["latent"] == "kv"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    (lion,) = ckpt["optimizers"]
    state = next(iter(lion["state"].values()))
    assert set(state) == {"exp_avg"}  # Lion keeps one moment; AdamW would add exp_avg_sq and step
    assert "blocks.0.attn.to_v.down.weight" in ckpt["model"] and "pos_embedding" not in ckpt["model"]


# ---- faults: preemption, kills, untrusted files, bad input, failing ranks
def start(out, *flags, script="train.py", env=None):
    cmd = [sys.executable, script, *TINY, "--output-dir", str(out), *flags]
    # Same thread count as the in-process reference runs: float sums then match bit for bit.
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                                 "PYTHONPATH": str(ROOT), **(env or {})})


def wait_for_step(out, at_least, process, timeout=120):
    """Waits until metrics.jsonl shows a train record at or past `at_least`; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        path = out / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        time.sleep(0.05)
    raise TimeoutError(f"no step {at_least} in {out}")


def main_thread_waits_for_a_thread():
    """Whether the main thread is blocked on another thread's work: in a Future's result or a thread's join."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        code = frame.f_code
        if (Path(code.co_filename).name, code.co_name) in {("_base.py", "result"), ("threading.py", "join")}:
            return True
        frame = frame.f_back
    return False


def wait_until(condition, timeout=60):
    """Polls `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


LONG = ["--epochs", "5", "--eval-every", "2", "--log-every", "3"]


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """The uninterrupted run that the runs stopped by a signal or killed must equal (--save-every writes no record)."""
    out = tmp_path_factory.mktemp("long")
    run(out, *LONG)
    return out


def test_sigterm_stops_after_the_step_it_arrives_in_and_resume_auto_finishes_the_same_run(tmp_path, long_run,
                                                                                           monkeypatch, capsys):
    real_step, calls = train.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == 7:  # SIGTERM to this process, handled before step 7 computes
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--output-dir", str(out), *LONG])
    assert exit_info.value.code == 128 + signal.SIGTERM
    # One process stops at the next step boundary: after step 7, which is neither a log point (every 3) nor a save.
    said = capsys.readouterr().out
    assert "stopped at step 7 of 335" in said and "--resume auto" in said and len(calls) == 7
    summary = json.loads((out / "summary.json").read_text())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert summary["stopped_by_signal"] == signal.SIGTERM and not summary["complete"]
    assert ckpt["step"] == summary["steps"] == 7
    monkeypatch.undo()
    run(out, *LONG, "--resume", "auto")
    assert_same_run(long_run, out)


def test_kill_9_inside_a_checkpoint_write_and_at_random_moments_then_resume_auto_equals_an_uninterrupted_run(
        tmp_path, long_run):
    flags = [*LONG, "--save-every", "4"]
    out, marker = tmp_path / "killed", tmp_path / "held"
    # First inside the second checkpoint write (step 8): tests/held_write_train.py writes part of it to the
    # temporary file, says how much in `marker`, and waits there for the kill.
    process = start(out, *flags, script="tests/held_write_train.py", env={"HELD_WRITE_MARKER": str(marker)})
    assert wait_until(lambda: marker.exists() or process.poll() is not None, timeout=300)
    assert marker.exists(), process.communicate()
    process.kill()
    process.communicate()
    written, size = (int(n) for n in marker.read_text().split())
    assert 0 < written < size and (out / ".checkpoint.pt.tmp").stat().st_size == written  # killed mid-write
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4  # the previous one, whole
    # Then at random moments.
    rng, step = random.Random(0), 0
    for _ in range(2):
        process = start(out, *flags, "--resume", "auto")
        step = wait_for_step(out, step + 8, process)
        time.sleep(rng.uniform(0, 0.3))
        process.kill()
        process.communicate()
        saved = torch.load(out / "checkpoint.pt", weights_only=True)  # never half-written
        assert saved["step"] % 4 == 0 or saved["step"] % (3 * 1438 // 64) == 0
    run(out, *flags, "--resume", "auto")
    assert_same_run(long_run, out)
    assert not (out / ".checkpoint.pt.tmp").exists()


def test_resume_auto_without_a_checkpoint_starts_the_run(tmp_path):
    summary = run(tmp_path, "--epochs", "1", "--resume", "auto")
    assert summary["complete"]


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_names_the_step(tmp_path, capsys, monkeypatch):
    # The forward pass of training step 27 (0-based) returns NaN logits: its update makes every weight NaN.
    forward, calls = train.ViT.forward, []

    def poisoned(self, images):
        calls.append(self.training)
        logits = forward(self, images)
        return logits * float("nan") if self.training and calls.count(True) == 28 else logits

    monkeypatch.setattr(train.ViT, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--output-dir", str(tmp_path), "--epochs", "3", "--save-every", "4"])
    assert exit_info.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at step 27 " in message  # found at the next save (step 28), named exactly
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 24 and "(step 24)" in message  # the last save before the bad step
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == message.removeprefix("train.py: error: ")


@pytest.mark.parametrize("flag", ["--resume", "--init-from"])
@pytest.mark.parametrize("content, message", [
    (lambda path: torch.save({"model": RunsCode()}, path), "refused: it holds objects that would run code"),
    (lambda path: path.write_bytes(b"\x00garbage" * 10), "not a readable checkpoint"),
    (lambda path: torch.save({"weights": torch.zeros(2)}, path), "not a checkpoint written by train.py"),
])
def test_untrusted_or_foreign_checkpoints_are_refused(tmp_path, monkeypatch, capsys, content, message, flag):
    monkeypatch.chdir(tmp_path)
    content(tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "out"), flag, str(tmp_path / "evil.pt")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and f"{flag} {tmp_path / 'evil.pt'}: {message}" in lines[0]
    assert not (tmp_path / "pwned").exists()
    if flag == "--init-from":  # read before any work; a --resume checkpoint is read into a prepared output dir
        assert not (tmp_path / "out").exists()


# An lr of 1e-30 moves no float32 weight: the run's checkpoint holds the model --init-from built.
STILL = ["--epochs", "1", "--num-cls", "2", *NO_AUGMENT, "--lr", "1e-30", "--warmup-epochs", "0", "--min-lr", "0"]


def test_a_checkpoint_with_retired_config_fields_loads_at_their_one_value_and_is_refused_at_another(trained_run,
                                                                                                   tmp_path):
    # Checkpoints of older versions hold patch_init and shared_kv_latent: at the values this code builds, they load.
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    ckpt["config"] |= {"patch_init": "pytorch", "shared_kv_latent": False}
    torch.save(ckpt, tmp_path / "old.pt")
    old, _ = machinery.load_model(tmp_path / "old.pt", "--init-from")
    new, _ = machinery.load_model(trained_run / "checkpoint.pt", "--init-from")
    assert old.cfg == new.cfg and all(torch.equal(a, b) for a, b in zip(old.state_dict().values(),
                                                                        new.state_dict().values()))
    ckpt["config"]["shared_kv_latent"] = True
    torch.save(ckpt, tmp_path / "shared.pt")
    with pytest.raises(ValueError, match="not a model this code can build .*shared_kv_latent"):
        machinery.load_model(tmp_path / "shared.pt", "--init-from")


def test_init_from_at_full_rank_reproduces_the_source_models_logits(trained_run, tmp_path):
    source, _ = machinery.load_model(trained_run / "checkpoint.pt", "source")
    summary = run(tmp_path, *STILL, "--init-from", str(trained_run / "checkpoint.pt"), "--latent", "qkvo",
                  "--latent-dim", "32", "--mlp-latent-dim", "32")
    compressed, _ = machinery.load_model(tmp_path / "checkpoint.pt", "compressed")
    assert "blocks.1.attn.to_k.up.weight" in compressed.state_dict()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (compressed.eval()(x) - source.eval()(x)).abs().max() <= 1e-5
    source_eval = records(trained_run, "eval")[-1]
    assert summary["final_acc"] == source_eval["acc"]
    assert records(tmp_path, "eval")[-1]["loss"] == pytest.approx(source_eval["loss"], rel=1e-5)


def test_init_from_at_rank_r_equals_the_truncated_svd(trained_run, tmp_path):
    source = torch.load(trained_run / "checkpoint.pt", weights_only=True)["model"]
    run(tmp_path, *STILL, "--init-from", str(trained_run / "checkpoint.pt"), "--latent", "qv", "--latent-dim", "4",
        "--mlp-latent-dim", "6")
    target = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    factored = {f"blocks.{b}.{name}": rank for b in range(2)
                for name, rank in (("attn.to_q", 4), ("attn.to_v", 4), ("mlp.fc1", 6), ("mlp.fc2", 6))}
    for name, rank in factored.items():
        # Written out: U_r S_r V_r^T of the source's weight, in float64.
        u, s, vh = torch.linalg.svd(source[f"{name}.weight"].double(), full_matrices=False)
        up, down = target[f"{name}.up.weight"].double(), target[f"{name}.down.weight"].double()
        assert up.shape[1] == down.shape[0] == rank
        torch.testing.assert_close(up @ down, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-6, rtol=1e-5, msg=name)
        # Split evenly: up and down both have the singular values sqrt(S_r).
        for factor in (up, down):
            torch.testing.assert_close(torch.linalg.svdvals(factor), s[:rank].sqrt(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(target[f"{name}.up.bias"], source[f"{name}.bias"], atol=1e-6, rtol=0)
    # Everything else is the source's: the full-rank k and out projections, norms, embeddings, head.
    copied = {k for k in source if k.rsplit(".", 1)[0] not in factored}
    assert copied == {k for k in target if ".up." not in k and ".down." not in k}
    for name in copied:
        torch.testing.assert_close(target[name], source[name], atol=1e-6, rtol=0, msg=name)


def test_init_from_a_model_of_another_shape_is_a_one_line_error(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, *STILL, "--dim", "48", "--output-dir", str(tmp_path / "out"),
                   "--init-from", str(trained_run / "checkpoint.pt")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "dim (32 vs 48)" in lines[0], lines


def test_bad_dataset_files_give_one_line_errors(tmp_path, capsys):
    def error_of(*flags):
        with pytest.raises(SystemExit) as exit_info:
            train.cli([*TINY[2:], "--epochs", "1", "--output-dir", str(tmp_path / f"out{len(flags)}"), *flags])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        return lines[0]

    assert "--download" in error_of("--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"))
    folder, _ = write_cifar(tmp_path / "cifar")
    with pytest.MonkeyPatch.context() as patch:
        accept_cifar(patch, folder)
        (folder / "data_batch_2").write_bytes(b"broken")
        assert "data_batch_2 is damaged" in error_of("--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"))
    # An image folder's errors name its layout, and never --download: there is nothing to download.
    layout = "DIR/train/<class>/*, DIR/val/<class>/*"
    (tmp_path / "one" / "train" / "cat").mkdir(parents=True)
    for folder, expected in (("my_dta", "my_dta/train is not a folder"), ("one", "1 class folder(s)")):
        line = error_of("--dataset", "imagefolder", "--data-dir", str(tmp_path / folder), "--epochs", "1")
        assert expected in line and layout in line and "--download" not in line, line
    (tmp_path / "one" / "train" / "dog").mkdir()
    assert "no images" in error_of("--dataset", "imagefolder", "--data-dir", str(tmp_path / "one"))
    # SVHN's .mat files, a Tiny-ImageNet tree: a missing or damaged file named in one line.
    assert "svhn not found in" in error_of("--dataset", "svhn", "--data-dir", str(tmp_path / "no-svhn"))
    write_svhn(tmp_path / "svhn")
    with pytest.MonkeyPatch.context() as patch:
        accept_svhn(patch, tmp_path / "svhn")
        (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"broken")
        assert "test_32x32.mat is damaged" in error_of("--dataset", "svhn", "--data-dir", str(tmp_path / "svhn"))
    folder, _ = write_tiny_imagenet(tmp_path / "tiny", size=8)
    (folder / "val" / "images" / "val_3.JPEG").write_bytes(b"cut")
    tiny = str(tmp_path / "tiny")
    assert "val_3.JPEG: cannot read image" in error_of("--dataset", "tinyimagenet", "--data-dir", tiny,
                                                       "--img-size", "8")
    (folder / "words.txt").unlink()
    assert "words.txt" in error_of("--dataset", "tinyimagenet", "--data-dir", tiny)
    # An image folder of several sizes needs --img-size; at a size its patch does not divide, it is refused.
    write_folder(tmp_path / "mixed", {"train/cat": 1, "train/dog": 1, "val/cat": 1}, size=(20, 20))
    write_folder(tmp_path / "mixed", {"val/dog": 1}, size=(16, 16))
    assert "--img-size" in error_of("--dataset", "imagefolder", "--data-dir", str(tmp_path / "mixed"))
    shutil.rmtree(tmp_path / "mixed" / "val" / "dog")
    assert "patch_size=8 must divide img_size=20" in error_of("--dataset", "imagefolder", "--data-dir",
                                                              str(tmp_path / "mixed"), "--batch-size", "2")
    assert not list(tmp_path.glob("out*"))  # no output folder left behind by a failed start


@pytest.mark.parametrize("dataset, own", [
    ("svhn", {"auto_augment": "svhn"}),
    ("tinyimagenet", {"img_size": 64, "patch_size": 8, "auto_augment": "imagenet"}),
])
def test_a_datasets_defaults_fill_only_unset_flags_are_said_once_and_recorded(tmp_path, monkeypatch, capsys, dataset,
                                                                              own):
    if dataset == "svhn":
        write_svhn(tmp_path / "data", train=16, test=4)
        accept_svhn(monkeypatch, tmp_path / "data")
    else:
        write_tiny_imagenet(tmp_path / "data", per_class=4)
    flags = ["--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--dim", "32", "--depth", "1", "--heads", "4",
             "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--ra-reps", "1", "--device", "cpu"]
    summary = train.main(train.get_args_parser().parse_args([*flags, "--output-dir", str(tmp_path / "a")]))
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in own.items())
    assert notes == [f"train.py: note: --dataset {dataset}: {said}"]
    assert summary["complete"] and summary["defaults"] == own
    assert summary["args"]["hflip"]  # SVHN keeps the reference's flips
    assert summary["config"]["img_size"] == own.get("img_size", 32)
    assert summary["config"]["patch_size"] == own.get("patch_size", 4)
    # A flag given stays as given, and is not among the defaults.
    summary = train.main(train.get_args_parser().parse_args([*flags, "--output-dir", str(tmp_path / "b"),
                                                             "--auto-augment", "cifar10", "--patch-size", "16"]))
    assert summary["args"]["auto_augment"] == "cifar10" and summary["config"]["patch_size"] == 16
    assert summary["defaults"] == {k: v for k, v in own.items() if k == "img_size"}


def test_an_output_dir_that_cannot_be_written_is_an_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "file" / "run")])
    assert exit_info.value.code == 2 and "is not a writable folder" in capsys.readouterr().err


def test_bad_flags_under_torchrun_are_said_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           "--batch-size", "63", "--epochs", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    # Every rank meets it; rank 0 alone says it.
    assert result.stderr.count("train.py: error: global_batch=63 must be divisible by world_size=2") == 1


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_an_argparse_error_is_said_by_rank_0_only(monkeypatch, capsys, rank, said):
    monkeypatch.setenv("RANK", rank)  # as torchrun sets it
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args(["--dataset", "mnist"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ("train.py: error: argument --dataset: invalid choice" in err) == said
    assert err.count("\n") == said  # one line, or nothing


def test_a_failing_rank_ends_the_whole_ddp_job_instead_of_hanging(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fail_on_rank1.py"), *TINY, "--epochs", "2", "--output-dir", str(tmp_path)]
    start_time = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0 and "injected failure on rank 1" in result.stderr
    assert time.monotonic() - start_time < 200


def test_resume_auto_needs_an_output_dir(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--epochs", "1", "--resume", "auto"])
    assert exit_info.value.code == 2 and "--resume auto needs --output-dir" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta"])
def test_an_unknown_device_is_one_line_and_exit_2_in_every_script(tmp_path, capsys, device):
    import analyze
    import bench
    import predict

    def parsed(module, *argv):
        return module.get_args_parser().parse_args(argv)

    calls = {"train.py": lambda: train.cli([*TINY[:-2], "--device", device, "--output-dir", str(tmp_path / "out")]),
             "predict.py": lambda: predict.main(parsed(predict, "evaluate", str(tmp_path), "--device", device)),
             "analyze.py": lambda: analyze.main(parsed(analyze, str(tmp_path), "--device", device)),
             "bench.py": lambda: bench.main(parsed(bench, "--device", device))}
    for script, call in calls.items():
        with pytest.raises(SystemExit) as exit_info:
            call()
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2, script
        assert lines == [f"{script}: error: --device {device}: choose cpu, cuda or cuda:N"]
    assert not (tmp_path / "out").exists()


def test_a_failed_start_removes_the_folders_it_created_and_only_those(tmp_path, capsys):
    kept = tmp_path / "kept"
    kept.mkdir()
    for out in (tmp_path / "new" / "deeper" / "run", kept, kept / "run"):
        code, line = error_line(capsys, out, "--epochs", "1", "--batch-size", "5000")
        assert code == 2 and "global_batch=5000" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]  # new/ and kept/run/ removed; kept/ stays


def test_every_run_says_once_before_its_first_step_what_it_does(tmp_path, monkeypatch, capsys):
    events = []
    monkeypatch.setattr(machinery, "note", lambda text, kind="note": events.append((kind, text)))
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: events.append(("step", "")) or step(*a))
    summary = run(tmp_path / "a", "--epochs", "1", *NO_AUGMENT, "--batch-size", "100")
    assert [kind for kind, _ in events[:2]] == ["start", "step"] and [k for k, _ in events].count("start") == 1
    dataset = data.load_digits()
    model = ViT(train.model_config(train.get_args_parser().parse_args(TINY), 10, 32))
    params = sum(p.numel() for p in model.parameters())
    steps = len(dataset.train_labels) // 100
    assert events[0][1] == (
        f"digits (built in): 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), {len(dataset.train_labels):,} train / "
        f"{len(dataset.test_labels)} test images; {params:,} parameters; global batch 100, {steps} steps per epoch x 1 "
        f"epochs; cpu ({machinery.device_name(torch.device('cpu'))}), fp32")
    assert summary["images"] == {"train": 1438, "test": 359} and summary["classes"] == [str(c) for c in range(10)]
    assert "warning" not in [kind for kind, _ in events]

    # A global batch larger than the training set: one warning (an epoch of a step or two).
    events.clear()
    run(tmp_path / "b", "--epochs", "1", *NO_AUGMENT, "--ra-reps", "2", "--batch-size", "2000")
    warnings = [text for kind, text in events if kind == "warning"]
    assert warnings == ["--batch-size 2000 exceeds the 1438 training images: an epoch is 1 step(s); a smaller "
                        "--batch-size takes more steps"]


# ---- faithful to the seed: whitening input, in-batch repeats, Muon
def test_whitening_sees_the_first_batches_the_model_trains_on(tmp_path, monkeypatch):
    whitened, trained = [], []
    original_whiten, original_step = train.ViT.whiten_patch_embedding, train.train_step
    monkeypatch.setattr(train.ViT, "whiten_patch_embedding",
                        lambda self, images: (whitened.append(images.clone()), original_whiten(self, images))[1])
    monkeypatch.setattr(train, "train_step",
                        lambda model, o, s, images, *rest: (trained.append(images.clone()),
                                                            original_step(model, o, s, images, *rest))[1])
    # Full per-image recipe on: the whitening images are flipped, cropped, AutoAugmented, normalised and erased;
    # batch mixing (later, in the loop) off, so that the steps see the batches as the loader gives them.
    run(tmp_path, "--epochs", "1", "--patch-size", "4", "--dim", "48", "--whiten", "--whiten-images", "100",
        "--random-erase", "0.5", "--mixup-alpha", "0", "--cutmix-alpha", "0")
    (images,) = whitened
    assert images.shape == (128, 3, 32, 32)  # whole batches of 64 until at least 100 images
    assert torch.equal(images, torch.cat(trained[:2]))


def test_muon_takes_exactly_the_blocks_matrices_and_adamw_the_rest():
    args = train.get_args_parser().parse_args(["--opt", "muon", "--lr", "3e-3"])
    model = train.ViT(train.ViTConfig(dim=32, depth=2, heads=4, num_cls=2))
    adamw, muon = train.build_optimizers(args, model, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for p in muon.param_groups[0]["params"])
    per_block = [f"attn.to_{x}.weight" for x in ("q", "k", "v", "out")] + ["mlp.fc1.weight", "mlp.fc2.weight"]
    assert in_muon == sorted(f"blocks.{b}.{n}" for b in range(2) for n in per_block)
    in_adamw = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    assert in_adamw == set(names.values()) - set(in_muon)
    assert {"head.weight", "cls_tokens", "pos_embedding", "to_patch_embedding.1.weight"} <= in_adamw
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert (muon.defaults["lr"], muon.defaults["momentum"], muon.defaults["weight_decay"]) == (0.02, 0.9, 0.0)
    assert (adamw.defaults["lr"], adamw.defaults["betas"]) == (3e-3, (0.95, 0.95))


def newton_schulz(g, steps=6):
    """Muon's orthogonalisation written out (Keller Jordan's quintic iteration), in float32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / g.norm()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_muon_and_adamw_steps_follow_their_recurrences_from_a_nonzero_state():
    args = train.get_args_parser().parse_args(["--opt", "muon", "--weight-decay", "0.05", "--muon-momentum", "0.8"])
    torch.manual_seed(0)
    model = train.ViT(train.ViTConfig(dim=32, depth=1, heads=4))
    params = dict(model.named_parameters())
    adamw, muon = train.build_optimizers(args, model, torch.device("cpu"))
    w, b = "blocks.0.mlp.fc1.weight", "blocks.0.norm1.bias"  # w: (64, 32), a tall matrix
    buffer, m, v = torch.zeros_like(params[w]), torch.zeros_like(params[b]), torch.zeros_like(params[b])
    # Four steps of independent Gaussian gradients (well conditioned: Newton-Schulz in bf16, torch.optim.Muon's,
    # stays near float32's). From the second on, the state is not zero: momentum and Nesterov both show.
    for t in range(1, 5):
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        for optimizer in (adamw, muon):
            optimizer.step()
        # Muon: buffer = 0.8 buffer + 0.2 g; Nesterov's update 0.2 g + 0.8 buffer, orthogonalised, times
        # lr * sqrt(max(1, rows / cols)); no weight decay.
        buffer = 0.8 * buffer + 0.2 * grads[w]
        expected = newton_schulz(0.2 * grads[w] + 0.8 * buffer)
        update = (before[w] - params[w].detach()) / (0.02 * math.sqrt(64 / 32))
        assert (update - expected).abs().max() < 0.05 * expected.abs().max(), t  # bf16 rounding
        torch.testing.assert_close(muon.state[params[w]]["momentum_buffer"], buffer)
        # AdamW with betas (0.95, 0.95): bias-corrected moments, decoupled decay.
        m, v = 0.95 * m + 0.05 * grads[b], 0.95 * v + 0.05 * grads[b] ** 2
        m_hat, v_hat = m / (1 - 0.95**t), v / (1 - 0.95**t)
        expected = before[b] * (1 - 1e-3 * 0.05) - 1e-3 * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(params[b].detach(), expected, atol=1e-7, rtol=1e-6)


def test_an_interrupted_muon_run_resumes_bit_exactly(tmp_path):
    flags = ["--epochs", "2", "--opt", "muon", "--ra-reps", "1"]
    run(tmp_path / "full", *flags)
    run(tmp_path / "split", *flags, "--stop-after-epochs", "1")
    run(tmp_path / "split", *flags, "--resume", "auto")
    assert_same_run(tmp_path / "full", tmp_path / "split")
    (adamw, muon) = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["optimizers"]
    assert all(set(s) == {"momentum_buffer"} for s in muon["state"].values())


# ---- the environment fails: offline download, full disk, cut writes, a second process, out of memory
FAULT_RUN = ["--epochs", "2", "--ra-reps", "1"]  # 22 steps per epoch, a log record every 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference every recovered run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, *FAULT_RUN)
    return out


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("first-epoch")
    run(out, *FAULT_RUN, "--stop-after-epochs", "1")
    return out


@pytest.fixture
def half_run(first_epoch, tmp_path):
    """A copy of a run stopped after its first epoch (checkpoint at step 22), to continue under a fault."""
    out = tmp_path / "run"
    shutil.copytree(first_epoch, out)
    return out


def error_line(capsys, out, *flags):
    """train.cli that must fail: its exit code and its one `train.py: error:` line (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--output-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert err.count("train.py: error:") == 1 and "Traceback" not in err, err[-3000:]
    return exit_info.value.code, err[err.index("train.py: error:"):].splitlines()[0]


def fill_disk_at(monkeypatch, name, at, partial=False):
    """Fault injection: the `at`-th os.write to a file called `name` finds the disk full. It raises ENOSPC, or with
    `partial` writes only half of its bytes first, as a nearly full disk does. Returns the bytes of every such write."""
    real_write, writes = os.write, []

    def write(fd, data):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == name:
            writes.append(bytes(data))
            if len(writes) == at:
                if partial:
                    return real_write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return writes


def disk_full_line(out, needed, step):
    return (f"train.py: error: disk full: writing {out / needed[0]} needs {needed[1]:,} bytes free; the last good "
            f"checkpoint is {out / 'checkpoint.pt'} (step {step}): free space, then --resume auto continues the run")


def summary_failed(out):
    return json.loads((out / "summary.json").read_text())["failed"]


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_leaves_no_temp_file(half_run, uninterrupted, monkeypatch,
                                                                              capsys):
    writes = fill_disk_at(monkeypatch, ".checkpoint.pt.tmp", at=2)
    # Resumed at step 22, saving every 8 steps: step 24 is saved, step 32 finds the disk full.
    code, line = error_line(capsys, half_run, *FAULT_RUN, "--resume", "auto", "--save-every", "8")
    assert code == 5 and line == disk_full_line(half_run, ("checkpoint.pt", len(writes[1])), 24)
    assert torch.load(half_run / "checkpoint.pt", weights_only=True)["step"] == 24
    assert not (half_run / ".checkpoint.pt.tmp").exists()
    assert summary_failed(half_run) == line.removeprefix("train.py: error: ")
    monkeypatch.undo()  # space freed
    run(half_run, *FAULT_RUN, "--resume", "auto")
    assert_same_run(uninterrupted, half_run)


def test_disk_full_at_a_metrics_record_leaves_whole_lines_only(half_run, uninterrupted, monkeypatch, capsys):
    before = (half_run / "metrics.jsonl").read_bytes()
    writes = fill_disk_at(monkeypatch, "metrics.jsonl", at=4, partial=True)
    # Records of the resumed run: its run record, steps 25, 30, then 35 finds the disk full half-way.
    code, line = error_line(capsys, half_run, *FAULT_RUN, "--resume", "auto", "--save-every", "8")
    assert code == 5 and line == disk_full_line(half_run, ("metrics.jsonl", len(writes[3])), 32)
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)  # each record: one write of one line
    assert (half_run / "metrics.jsonl").read_bytes() == before + b"".join(writes[:3])
    assert [r["step"] for r in records(half_run, "train")][-1] == 30
    assert summary_failed(half_run) == line.removeprefix("train.py: error: ")
    monkeypatch.undo()
    run(half_run, *FAULT_RUN, "--resume", "auto")
    assert_same_run(uninterrupted, half_run)


def test_disk_full_at_the_summary_keeps_the_previous_one_and_resume_writes_it(half_run, uninterrupted, monkeypatch,
                                                                             capsys):
    before = (half_run / "summary.json").read_bytes()
    writes = fill_disk_at(monkeypatch, ".summary.json.tmp", at=1)
    code, line = error_line(capsys, half_run, *FAULT_RUN, "--resume", "auto")
    assert code == 5 and line == disk_full_line(half_run, ("summary.json", len(writes[0])), 44)
    assert (half_run / "summary.json").read_bytes() == before and not (half_run / ".summary.json.tmp").exists()
    monkeypatch.undo()
    summary = run(half_run, *FAULT_RUN, "--resume", "auto")  # the run is finished: only its summary is written
    assert summary["complete"] and json.loads((half_run / "summary.json").read_text())["complete"]
    assert_same_run(uninterrupted, half_run)


def test_a_partial_last_metrics_line_is_dropped_at_resume_and_said_once(half_run, uninterrupted, capsys):
    torn = b'{"kind": "train", "epoch": 2, "step": 25, "lr": 0.00'  # what a kill in the middle of a log write leaves
    with open(half_run / "metrics.jsonl", "ab") as f:
        f.write(torn)
    train.cli([*TINY, "--output-dir", str(half_run), *FAULT_RUN, "--resume", "auto"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "train.py: note:" in line]
    assert notes == [f"train.py: note: dropped the partial last line of {half_run / 'metrics.jsonl'} ({len(torn)} "
                     f"bytes, a write cut short): its record is redone"]
    assert_same_run(uninterrupted, half_run)


def test_a_stale_temp_checkpoint_of_a_killed_run_is_removed_at_the_next_start(half_run, uninterrupted, monkeypatch):
    # A kill during a save leaves its temp file; on a full disk it holds the space the resumed run needs.
    stale = half_run / ".checkpoint.pt.tmp"
    stale.write_bytes(b"\0" * 2**20)
    real_atomic_write = files.atomic_write

    def write_on_a_disk_full_while_stale_exists(path, *args):
        if stale.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_atomic_write(path, *args)

    monkeypatch.setattr(files, "atomic_write", write_on_a_disk_full_while_stale_exists)
    run(half_run, *FAULT_RUN, "--resume", "auto")
    assert not stale.exists()
    assert_same_run(uninterrupted, half_run)


def test_out_of_memory_names_the_batch_and_the_flags_and_resume_continues(half_run, uninterrupted, monkeypatch,
                                                                          capsys):
    real_forward, calls = train.ViT.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # in step 34
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(train.ViT, "forward", forward)
    code, line = error_line(capsys, half_run, *FAULT_RUN, "--resume", "auto", "--save-every", "8")
    assert code == 7 and line == (
        f"train.py: error: out of memory after 33 steps at --batch-size 64 over 1 process(es); the last good "
        f"checkpoint is {half_run / 'checkpoint.pt'} (step 32): free the device's memory, then --resume auto "
        f"continues the run; or start a new run that needs less: a smaller --batch-size, more processes, --amp")
    assert torch.load(half_run / "checkpoint.pt", weights_only=True)["step"] == 32
    assert summary_failed(half_run) == line.removeprefix("train.py: error: ")
    monkeypatch.undo()  # memory freed
    run(half_run, *FAULT_RUN, "--resume", "auto")
    assert_same_run(uninterrupted, half_run)


def test_a_second_process_on_a_folder_in_use_is_refused_and_the_lock_ends_with_its_holder(tmp_path, uninterrupted):
    out = tmp_path / "run"
    holder = start(out, *FAULT_RUN)
    try:
        wait_for_step(out, 25, holder)  # past its first checkpoint
        holder.send_signal(signal.SIGSTOP)  # held mid-run
        second = subprocess.run([sys.executable, "train.py", *TINY, "--output-dir", str(out), *FAULT_RUN,
                                 "--resume", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()  # kill -9: the lock must go with it
        holder.communicate()
    assert second.returncode == 6 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines() == [
        f"train.py: error: --output-dir {out} is in use by pid {holder.pid} on {platform.node()}: wait for that run "
        f"to end (or stop it), or choose another --output-dir"]
    assert len(records(out, "run")) == 1  # the second process wrote nothing
    run(out, *FAULT_RUN, "--resume", "auto")
    assert_same_run(uninterrupted, out)


def fake_cifar_archive(folder):
    """A small CIFAR-10 archive in the real layout; torchvision's md5s are patched to accept it."""
    write_cifar(folder / "src", per_batch=64)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_offline_download_names_the_archive_and_an_archive_placed_by_hand_is_used(tmp_path, monkeypatch, capsys):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    data_dir, out = tmp_path / "data", tmp_path / "run"
    flags = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--download", *FAULT_RUN, "--resume", "auto"]
    code, line = error_line(capsys, out, *flags)
    assert code == 4 and line == (
        f"train.py: error: could not fetch cifar10 (URLError: [Errno -3] Temporary failure in name resolution): "
        f"fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz elsewhere and place it as "
        f"{data_dir / 'cifar-10-python.tar.gz'} (md5 c58f30108f718f92721af3b95e74349a), then run again: it is "
        f"checked and extracted instead of fetched")
    assert not out.exists()  # nothing of a run was written, and the folder that the failed start created is gone

    archive = fake_cifar_archive(tmp_path / "elsewhere")
    shutil.copy(archive, data_dir)  # placed by hand; the network is still off
    src = tmp_path / "elsewhere" / "src" / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive))
    for files in ("train_list", "test_list"):
        monkeypatch.setattr(CIFAR10, files, [[name, md5(src / name)] for name, _ in getattr(CIFAR10, files)])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(src / CIFAR10.meta["filename"])})
    train.cli([*TINY, "--output-dir", str(out), *flags])
    assert (data_dir / "cifar-10-batches-py" / "data_batch_5").read_bytes() == (src / "data_batch_5").read_bytes()
    run(tmp_path / "reference", "--dataset", "cifar10", "--data-dir", str(tmp_path / "elsewhere" / "src"), *FAULT_RUN)
    assert_same_run(tmp_path / "reference", out)


@pytest.mark.parametrize("fault", ["offline", "in-use"])
def test_a_failure_on_rank_0_stops_every_ddp_rank_and_is_said_once(tmp_path, fault):
    out = tmp_path / "run"
    # An unreachable proxy: urllib fails as it does offline.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           *FAULT_RUN, "--output-dir", str(out)]
    with contextlib.ExitStack() as held:
        if fault == "offline":
            cmd += ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--download"]
        else:
            out.mkdir()
            machinery.lock_output_dir(out, held)  # this process runs in the folder
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    expected = {"offline": "train.py: error: could not fetch cifar10 (URLError: ",
                "in-use": f"train.py: error: --output-dir {out} is in use by pid {os.getpid()} on"}[fault]
    ours = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert len(ours) == 1 and ours[0].startswith(expected), result.stderr[-3000:]
    # torchrun's report: each rank ended with the code of the failure, or by torchrun's SIGTERM once the other had.
    codes = set(re.findall(r"rank +: \d \(local_rank.*\n +exitcode +: (-?\d+)", result.stderr))
    code = {"offline": "4", "in-use": "6"}[fault]
    assert code in codes and codes <= {code, str(-signal.SIGTERM)}, result.stderr[-3000:]


# ---- checkpoints written in the background
def test_training_goes_on_while_a_checkpoint_is_written_and_the_file_holds_the_saved_step(tmp_path, monkeypatch):
    real_write, real_step = files.atomic_write, train.train_step
    weights = {}  # the model's, after each step
    held, first_payload = [], []

    def train_step(model, *args):
        loss = real_step(model, *args)
        weights[len(weights) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return loss

    def held_write(path, payload):
        if path.name == "checkpoint.pt" and not held:
            # The first write (step 2) is held, off the main thread, until the main thread waits for it.
            in_background = threading.current_thread() is not threading.main_thread()
            held.append((in_background and wait_until(main_thread_waits_for_a_thread), len(weights)))
            first_payload.append(bytes(payload))
        real_write(path, payload)

    monkeypatch.setattr(train, "train_step", train_step)
    monkeypatch.setattr(files, "atomic_write", held_write)
    run(tmp_path, "--epochs", "1", "--ra-reps", "1", "--save-every", "2")
    # Steps 3 and 4 ran while step 2's checkpoint was being written; the save at step 4 waited for it: one write in
    # flight at a time. (A save that did not wait would leave the main thread free until the end of the run.)
    assert held == [(True, 4)]
    # The snapshot is step 2's state, though training changed it while the write was held; the file on disk is whole.
    first = torch.load(io.BytesIO(first_payload[0]), weights_only=True)
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for ckpt, step in ((first, 2), (last, 22)):
        assert ckpt["step"] == step and ckpt["model"].keys() == weights[step].keys()
        assert all(torch.equal(ckpt["model"][k], weights[step][k]) for k in ckpt["model"])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("at, steps, last_good", [(2, 40, 24), (4, 44, 40)], ids=["next-save", "end-of-run"])
def test_disk_full_in_the_background_write_stops_the_run_at_the_next_save_or_at_its_end(half_run, monkeypatch, capsys,
                                                                                      at, steps, last_good):
    real_write, writers = files.atomic_write, []

    def atomic_write(path, payload):
        writers.append((path.name, threading.current_thread()))
        real_write(path, payload)

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    writes = fill_disk_at(monkeypatch, ".checkpoint.pt.tmp", at=at)
    # Resumed at step 22, saving every 8 steps: 24, 32, 40 and 44 (the end); the failed write is said at the next
    # save, or at the end of the run.
    code, line = error_line(capsys, half_run, *FAULT_RUN, "--resume", "auto", "--save-every", "8")
    assert code == 5 and line == disk_full_line(half_run, ("checkpoint.pt", len(writes[at - 1])), last_good)
    assert all(thread is not threading.main_thread() for name, thread in writers if name == "checkpoint.pt")
    summary = json.loads((half_run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["failed"] == line.removeprefix("train.py: error: ")
    assert torch.load(half_run / "checkpoint.pt", weights_only=True)["step"] == last_good
    assert not (half_run / ".checkpoint.pt.tmp").exists()


def test_a_run_ending_by_an_error_finishes_the_write_in_flight_before_it_releases_its_folder(tmp_path, monkeypatch):
    real_write, real_close, real_forward = files.atomic_write, os.close, train.ViT.forward
    calls, events, failed, unlocked = [], [], threading.Event(), threading.Event()

    def held_write(path, payload):
        if path.name == "checkpoint.pt":
            # Step 8's checkpoint is held until step 9 has failed, then until the main thread either waits for it
            # or releases the folder without waiting (which the order of events below would show).
            released = failed.wait(timeout=60) and wait_until(lambda: main_thread_waits_for_a_thread()
                                                              or unlocked.is_set())
            events.append(("held until the failure", released))
        real_write(path, payload)
        if path.name == "checkpoint.pt":
            events.append("checkpoint written")

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # step 9, while step 8's checkpoint is written
            failed.set()
            raise RuntimeError("an unexpected error")
        return real_forward(self, *args, **kwargs)

    def close(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == ".lock":
            events.append("folder released")
            unlocked.set()
        real_close(fd)

    monkeypatch.setattr(files, "atomic_write", held_write)
    monkeypatch.setattr(train.ViT, "forward", forward)
    monkeypatch.setattr(os, "close", close)
    with pytest.raises(RuntimeError, match="an unexpected error"):
        run(tmp_path, "--epochs", "1", "--ra-reps", "1", "--save-every", "8")
    assert events == [("held until the failure", True), "checkpoint written", "folder released"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 8
    assert not list(tmp_path.glob(".*.tmp"))


# ---- the machine: CUDA expected, precision, compiling, processes
def test_a_missing_cuda_stops_a_run_that_expects_it_with_one_line(tmp_path, monkeypatch, capsys):
    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nPlease update it")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build of torch, as pip installs on Linux
    monkeypatch.setattr(torch.cuda, "init", init)
    for device, asked in (([], "--device unset means cuda on a CUDA build of torch"), (["--device", "cuda"],
                                                                                       "--device cuda")):
        code, line = error_line(capsys, tmp_path / "out", "--epochs", "1", "--device", "cuda", *device)
        assert code == 2 and line == (
            f"train.py: error: --device cuda, but CUDA cannot start (torch {torch.__version__}, CUDA 13.0): "
            f"RuntimeError: The NVIDIA driver on your system is too old (found version 11040).; --device cpu runs "
            f"on the CPU")
        args = train.get_args_parser().parse_args(TINY[:-2] + device)
        with pytest.raises(ValueError, match=re.escape(f"{asked}, but CUDA cannot start")):
            train.setup_distributed(args)
    assert not (tmp_path / "out").exists()
    assert run(tmp_path / "cpu", "--epochs", "1", *NO_AUGMENT)["complete"]  # TINY has --device cpu


def test_amp_picks_bf16_where_the_device_has_it_else_fp16_with_a_scaler(monkeypatch):
    parse, cpu, cuda = train.get_args_parser().parse_args, torch.device("cpu"), torch.device("cuda")
    assert train.build_precision(parse([]), cpu).name == "fp32"
    assert not train.build_precision(parse([]), cpu).autocast._enabled
    assert train.build_precision(parse(["--amp"]), cpu).name == "bf16"
    fp16 = train.build_precision(parse(["--amp", "--amp-dtype", "fp16"]), cpu)
    assert fp16.autocast.fast_dtype == torch.float16 and fp16.scaler.is_enabled()
    for has_bf16, name in ((True, "bf16"), (False, "fp16")):  # a V100 or T4 has no bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
        with pytest.warns(UserWarning):  # no CUDA here: torch disables the autocast and the scaler it builds
            precision = train.build_precision(parse(["--amp"]), cuda)
        assert precision.name == name
        assert precision.autocast.fast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def test_an_fp16_step_scales_the_loss_and_steps_with_the_unscaled_gradients():
    args = train.get_args_parser().parse_args(["--amp", "--amp-dtype", "fp16"])
    precision = train.build_precision(args, torch.device("cpu"))
    unscaled = train.Precision("fp16", precision.autocast, torch.amp.GradScaler("cpu", enabled=False))
    torch.manual_seed(0)
    models = [ViT(ViTConfig(patch_size=8, dim=32, depth=2, heads=4, drop_path=0.0)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, targets = torch.randn(8, 3, 32, 32), F.one_hot(torch.arange(8), 10).float()
    for model, amp in zip(models, (precision, unscaled)):
        # SGD moves a weight by lr times its gradient: a gradient left scaled by 65536 would show.
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        train.train_step(model, [sgd], [torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)], x, targets, amp,
                         0.0)
    scaled, plain = (dict(m.named_parameters()) for m in models)
    assert all(torch.allclose(scaled[k], plain[k], atol=1e-4) for k in scaled)
    assert precision.scaler.get_scale() == 65536.0 and precision.scaler.state_dict()["_growth_tracker"] == 1


def test_a_step_releases_the_last_steps_gradients_before_its_forward():
    # Under CUDA graphs the gradients live in the graphs' memory, which the next forward's replay overwrites.
    model = ViT(ViTConfig(patch_size=8, dim=32, depth=2, heads=4))
    precision = train.build_precision(train.get_args_parser().parse_args([]), torch.device("cpu"))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)]
    released = []  # at each forward: whether every gradient is gone

    def before_forward(module, args):
        released.append(all(p.grad is None for p in module.parameters()))
    model.register_forward_pre_hook(before_forward)
    for _ in range(2):
        train.train_step(model, [sgd], schedulers, torch.randn(4, 3, 32, 32), torch.eye(10)[:4], precision, 0.0)
    assert released == [True, True] and all(p.grad is not None for p in model.parameters())


def test_fp16_with_a_gradient_scaler_resumes_bit_exactly_with_the_scalers_state(tmp_path):
    flags = ["--epochs", "2", "--ra-reps", "1", "--amp", "--amp-dtype", "fp16"]
    summary = run(tmp_path / "full", *flags)
    run(tmp_path / "split", *flags, "--stop-after-epochs", "1")
    run(tmp_path / "split", *flags, "--resume", "auto")
    assert_same_run(tmp_path / "full", tmp_path / "split")
    full, split = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("full", "split"))
    # 44 steps without an overflow: a resume that had lost the scaler's state would have counted 22.
    assert summary["precision"] == "fp16" and full["scaler"] == split["scaler"]
    assert full["scaler"]["_growth_tracker"] == 44


def test_processes_wait_dist_timeout_minutes_at_a_collective_call(monkeypatch):
    calls = []
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    ranks = train.setup_distributed(train.get_args_parser().parse_args(["--device", "cpu"]))
    assert (ranks.rank, ranks.world_size) == (0, 2)
    train.setup_distributed(train.get_args_parser().parse_args(["--device", "cpu", "--dist-timeout", "90"]))
    assert calls == [("gloo", {"timeout": timedelta(minutes=30), "device_id": None}),
                     ("gloo", {"timeout": timedelta(minutes=90), "device_id": None})]


def test_help_shows_every_flags_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a flag's help
    parser = train.get_args_parser()
    # Each flag's entry: its line, and the next one when argparse moves a long flag's help there.
    entries = {e.split()[0].rstrip(","): e for e in re.split(r"\n(?=  -)", parser.format_help()) if e.startswith("  -")}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            entry = entries[action.option_strings[0]]
            assert f"(default: {action.default})" in entry, entry
