import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import RunsCode, write_cifar
from model import ViT, ViTConfig, transfer_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "4",
        "--batch-size", "64", "--warmup-epochs", "1", "--eval-every", "1", "--log-every", "5", "--workers", "0"]
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
                "device_name", "git_commit"):
        assert key in saved, key
    assert saved["complete"] and saved["final_acc"] == summary["final_acc"] and saved["epochs"] == 2
    assert saved["params"] == sum(p.numel() for p in final_weights(tmp_path).values())
    evals = records(tmp_path, "eval")
    assert [r["epoch"] for r in evals] == [1, 2] and evals[-1]["acc"] == saved["final_acc"]
    assert saved["best_acc"] == max(r["acc"] for r in evals)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "args", "config"} <= ckpt.keys()
    assert ckpt["step"] == saved["steps"] == 2 * (3 * 1438 // 64)  # two epochs of --ra-reps 3
    assert not list(tmp_path.glob(".*.tmp"))


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


@pytest.mark.parametrize("loader", [["--data-loader", "device"], ["--data-loader", "workers"]],
                         ids=["device", "workers"])
def test_resume_after_stopping_equals_an_uninterrupted_run(tmp_path, loader):
    # Full recipe on: flip, crop, AutoAugment, erasing, Mixup/CutMix, stochastic depth, 3 repeats.
    full, split = tmp_path / "full", tmp_path / "split"
    run(full, "--epochs", "4", "--eval-every", "2", *loader)
    stopped = run(split, "--epochs", "4", "--eval-every", "2", "--stop-after-epochs", "2", *loader)
    assert not stopped["complete"] and stopped["final_acc"] is None
    # The worker loader resumes with a worker process: a sample's augmentation does not depend on who computes it.
    run(split, "--epochs", "4", "--eval-every", "2", "--resume", str(split / "checkpoint.pt"), "--workers", "1",
        *loader)
    assert_same_run(full, split)
    assert json.loads((split / "summary.json").read_text())["final_acc"] == records(full, "eval")[-1]["acc"]
    # Resuming a finished run trains nothing and reports the same result.
    again = run(split, "--epochs", "4", "--eval-every", "2", "--resume", str(split / "checkpoint.pt"), *loader)
    assert again["complete"] and again["final_acc"] == records(full, "eval")[-1]["acc"]
    assert_same_run(full, split)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run(tmp_path, "--epochs", "1")
    with pytest.raises(ValueError, match="depth"):
        run(tmp_path, "--epochs", "1", "--depth", "3", "--resume", str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match="--lr"):
        run(tmp_path, "--epochs", "1", "--lr", "0.01", "--resume", str(tmp_path / "checkpoint.pt"))


def torchrun(out, nproc, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           *TINY, "--output-dir", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "augment",
    [NO_AUGMENT,
     # The worker loader seeds each sample by its place in the epoch, so even its augmentations match; the device
     # loader draws them per rank's chunk, so it matches with augmentations off.
     [*NO_AUGMENT, "--hflip", "--crop-padding", "4", "--ra-reps", "2", "--data-loader", "workers"]],
    ids=["augmentations-off", "per-image-augmentations-on-worker-loader"],
)
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, augment):
    run(tmp_path / "one", "--epochs", "1", *augment)
    torchrun(tmp_path / "two", 2, "--epochs", "1", *augment)
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # Only the order of floating-point sums differs (gradients are averaged across ranks). Tolerance: 1e-4, a tenth
    # of what one AdamW step at lr 1e-3 moves a weight; measured here 2.5e-6 (off) and 5e-5 (on, 44 steps), with
    # relative L2 differences of 7e-7 and 6e-6.
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    flat_one, flat_two = (torch.cat([v.flatten() for v in w.values()]) for w in (one, two))
    assert (flat_one - flat_two).norm() < 1e-4 * flat_one.norm()
    assert not all(torch.equal(one[k], two[k]) for k in one)  # it really ran on two processes
    evals_one, evals_two = records(tmp_path / "one", "eval"), records(tmp_path / "two", "eval")
    assert [r["acc"] for r in evals_one] == [r["acc"] for r in evals_two]  # counts gathered from both ranks
    assert evals_one[-1]["loss"] == pytest.approx(evals_two[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "mnist"], "--dataset 'mnist'"),
        (["--epochs", "0"], "--epochs 0"),
        (["--lr", "-1"], "--lr -1.0"),
        (["--opt", "sgd"], "--opt 'sgd'"),
        (["--heads", "5"], "--heads 5"),
        (["--latent", "qx"], "--latent 'qx'"),
        (["--latent", "q", "--latent-dim", "0"], "--latent-dim 0"),
        (["--batch-size", "5000"], "--batch-size 5000"),
        (["--warmup-epochs", "20"], "--warmup-epochs 20"),
        (["--resume", "nowhere/checkpoint.pt"], "--resume nowhere"),
        (["--whiten", "--dim", "96"], "--whiten writes 3 * --patch-size**2 = 192 filters"),
        (["--dataset", "cifar10", "--data-dir", "nowhere", "--auto-augment", "rand"], "--auto-augment 'rand'"),
        (["--mix-prob", "2"], "--mix-prob 2.0"),
        (["--mlp-latent-dim", "33"], "--mlp-latent-dim 33 must be in 0..32"),
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
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    if "--batch-size 5000" not in message:  # the only check that needs the dataset's size
        assert not (tmp_path / "out").exists()  # refused before any work


def test_an_existing_run_is_never_overwritten(tmp_path):
    run(tmp_path, "--epochs", "1")
    before = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "checkpoint.pt").read_bytes()
    result = subprocess.run([sys.executable, "train.py", *TINY, "--epochs", "1", "--output-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert ((tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "checkpoint.pt").read_bytes()) == before


COLUMNS = {
    "baseline": {},
    "no-aa": {"auto_augment": "none"},
    "no-mixup": {"mixup_alpha": 0.0},
    "no-cutmix": {"cutmix_alpha": 0.0},
    "sin": {"pos_embed": "sincos"},
    "whiten": {"whiten": True},
    "mla-qkv": {"latent": "qkv"},
    "mla-kv": {"latent": "kv"},
    "mla-qk": {"latent": "qk"},
    "mla-q": {"latent": "q"},
    "mla-k": {"latent": "k"},
    "ddp-bs256": {},
    "ddp-bs1024": {"batch_size": 1024},
    "lion-bs1024": {"batch_size": 1024, "opt": "lion", "lr": 1e-4, "weight_decay": 0.5},
    "cls-2": {"num_cls": 2},
    "cls-4": {"num_cls": 4},
}


@pytest.mark.parametrize("target", COLUMNS)
def test_each_make_target_changes_only_its_columns_flags(target):
    dry = subprocess.run(["make", "-n", target, "EPOCHS=7", "SEED=3", "NPROC=2", "DATA=/d", "OUT=/o"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    (command,) = [line.split() for line in dry.splitlines() if "train.py" in line]
    assert ("--nproc_per_node=2" in command) == target.startswith(("ddp", "lion"))
    args = vars(train.get_args_parser().parse_args(command[command.index("train.py") + 1:]))
    defaults = vars(train.get_args_parser().parse_args([]))
    base = {"epochs": 7, "seed": 3, "data_dir": "/d", "download": True, "amp": True, "output_dir": f"/o/{target}-seed3",
            "tag": target, "resume": "auto"}
    assert {k: v for k, v in args.items() if v != defaults[k]} == {**base, **COLUMNS[target]}


def test_makefile_has_a_target_for_every_column():
    dry = subprocess.run(["make", "-pn"], cwd=ROOT, capture_output=True, text=True).stdout
    (columns,) = [line for line in dry.splitlines() if line.startswith("COLUMNS :=")]
    assert set(columns.split(":=")[1].split()) == set(COLUMNS)


def test_variant_flags_train_end_to_end(tmp_path):
    summary = run(tmp_path, "--epochs", "1", "--patch-size", "4", "--dim", "48", "--opt", "lion", "--lr", "1e-4",
                  "--weight-decay", "0.5", "--latent", "kv", "--latent-dim", "16", "--shared-kv-latent",
                  "--num-cls", "2",
                  "--cls-pool", "mean", "--pos-embed", "sincos", "--whiten", "--whiten-images", "200", "--ra-reps", "1")
    assert summary["complete"] and summary["config"]["latent"] == "kv"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state = next(iter(ckpt["optimizer"]["state"].values()))
    assert set(state) == {"exp_avg"}  # Lion keeps one moment; AdamW would add exp_avg_sq and step
    assert "blocks.0.attn.to_kv.down.weight" in ckpt["model"] and "pos_embedding" not in ckpt["model"]


# ---- faults: preemption, kills, untrusted files, bad input, failing ranks
def start(out, *flags):
    cmd = [sys.executable, "train.py", *TINY, "--output-dir", str(out), *flags]
    # Same thread count as the in-process reference runs: float sums then match bit for bit.
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})


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


LONG = ["--epochs", "5", "--eval-every", "2", "--log-every", "3"]


def test_sigterm_saves_at_the_next_step_and_resume_auto_finishes_the_same_run(tmp_path):
    run(tmp_path / "full", *LONG)
    out = tmp_path / "stopped"
    process = start(out, *LONG)
    wait_for_step(out, 30, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "--resume auto" in stdout
    summary = json.loads((out / "summary.json").read_text())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert summary["stopped_by_signal"] == signal.SIGTERM and not summary["complete"]
    assert ckpt["step"] == summary["steps"] > 30
    run(out, *LONG, "--resume", "auto")
    assert_same_run(tmp_path / "full", out)


def test_kill_9_at_random_moments_then_resume_auto_equals_an_uninterrupted_run(tmp_path):
    flags = [*LONG, "--save-every", "4"]
    run(tmp_path / "full", *flags)
    out, rng = tmp_path / "killed", random.Random(0)
    step = 0
    for _ in range(3):
        process = start(out, *flags, "--resume", "auto")
        step = wait_for_step(out, step + 8, process)
        time.sleep(rng.uniform(0, 0.3))
        process.kill()
        process.communicate()
        saved = torch.load(out / "checkpoint.pt", weights_only=True)  # never half-written
        assert saved["step"] % 4 == 0 or saved["step"] % (3 * 1438 // 64) == 0
    run(out, *flags, "--resume", "auto")
    assert_same_run(tmp_path / "full", out)


def test_resume_auto_without_a_checkpoint_starts_the_run(tmp_path):
    summary = run(tmp_path, "--epochs", "1", "--resume", "auto")
    assert summary["complete"]


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_names_the_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--output-dir", str(tmp_path), "--epochs", "3", "--warmup-epochs", "2", "--opt", "lion",
                   "--lr", "1e4", "--weight-decay", "0", "--save-every", "4"])
    assert exit_info.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    bad_step = int(message.split("at step ")[1].split()[0])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] <= bad_step and f"(step {ckpt['step']})" in message
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


def test_init_from_at_full_rank_reproduces_the_source_models_logits(trained_run, tmp_path):
    source, _ = train.load_model(trained_run / "checkpoint.pt", "source")
    summary = run(tmp_path, *STILL, "--init-from", str(trained_run / "checkpoint.pt"), "--latent", "qkvo",
                  "--latent-dim", "32", "--mlp-latent-dim", "32", "--shared-kv-latent")
    compressed, _ = train.load_model(tmp_path / "checkpoint.pt", "compressed")
    assert "blocks.1.attn.to_kv.up_v.weight" in compressed.state_dict()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (compressed.eval()(x) - source.eval()(x)).abs().max() <= 1e-5
    source_eval = records(trained_run, "eval")[-1]
    assert summary["final_acc"] == source_eval["acc"]
    assert records(tmp_path, "eval")[-1]["loss"] == pytest.approx(source_eval["loss"], rel=1e-5)


def test_init_from_at_rank_r_equals_the_truncated_svd(trained_run, tmp_path):
    source, _ = train.load_model(trained_run / "checkpoint.pt", "source")
    run(tmp_path, *STILL, "--init-from", str(trained_run / "checkpoint.pt"), "--latent", "qv", "--latent-dim", "4",
        "--mlp-latent-dim", "6")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    expected = ViT(ViTConfig(**ckpt["config"]))
    transfer_weights(source, expected)
    assert ckpt["config"]["mlp_latent_dim"] == 6 and ckpt["model"].keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], tensor, atol=1e-6, rtol=0, msg=name)


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
    (folder / "data_batch_2").write_bytes(b"broken")
    assert "data_batch_2" in error_of("--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"))
    (tmp_path / "one" / "train" / "cat").mkdir(parents=True)
    assert "class" in error_of("--dataset", "imagefolder", "--data-dir", str(tmp_path / "one"), "--epochs", "1")
    (tmp_path / "one" / "train" / "dog").mkdir()
    assert "no images" in error_of("--dataset", "imagefolder", "--data-dir", str(tmp_path / "one"))


def test_an_output_dir_that_cannot_be_written_is_an_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "file" / "run")])
    assert exit_info.value.code == 2 and "is not a writable folder" in capsys.readouterr().err


def test_ddp_batch_not_divisible_by_world_size_is_an_error_on_every_rank(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           "--batch-size", "63", "--epochs", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count("train.py: error: --batch-size 63 (global) must be divisible by the 2 processes") == 2


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
