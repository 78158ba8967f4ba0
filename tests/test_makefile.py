"""The Makefile: one target per column of the paper's table, each reading of the seed one command away, and a PY
that runs everything in an environment as it is (no venv, no pip)."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
# Under `make test` the parent make's MAKELEVEL/MAKEFLAGS would make ours print "make[1]: Entering directory".
TOP_LEVEL = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def dry_run(*argv):
    """The commands `make -n` prints, each split into words."""
    out = subprocess.run(["make", "-n", *argv], cwd=ROOT, env=TOP_LEVEL, capture_output=True, text=True,
                         check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def train_command(*argv):
    """The one train.py command of `make -n` (before it, the venv's set-up where .venv is missing)."""
    (command,) = [c for c in dry_run(*argv) if "train.py" in c]
    return command


def train_flags(command):
    return vars(train.get_args_parser().parse_args(command[command.index("train.py") + 1:]))


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
    "ddp-bs256": {"ra_mode": "in-batch"},
    "ddp-bs1024": {"batch_size": 1024, "ra_mode": "in-batch"},
    "lion-bs1024": {"batch_size": 1024, "ra_mode": "in-batch", "opt": "lion", "lr": 1e-4, "weight_decay": 0.5},
    "cls-2": {"num_cls": 2},
    "cls-4": {"num_cls": 4},
}


@pytest.mark.parametrize("target", COLUMNS)
def test_each_make_target_changes_only_its_columns_flags(target):
    command = train_command(target, "EPOCHS=7", "SEED=3", "NPROC=2", "DATA=/d", "OUT=/o")
    assert ("--nproc_per_node=2" in command) == target.startswith(("ddp", "lion"))
    args = train_flags(command)
    defaults = vars(train.get_args_parser().parse_args([]))
    base = {"epochs": 7, "seed": 3, "data_dir": "/d", "download": True, "amp": True, "output_dir": f"/o/{target}-seed3",
            "tag": target, "resume": "auto"}
    assert {k: v for k, v in args.items() if v != defaults[k]} == {**base, **COLUMNS[target]}


def test_makefile_has_a_target_for_every_column():
    dry = subprocess.run(["make", "-pn"], cwd=ROOT, env=TOP_LEVEL, capture_output=True, text=True).stdout
    (columns,) = [line for line in dry.splitlines() if line.startswith("COLUMNS :=")]
    assert set(columns.split(":=")[1].split()) == set(COLUMNS)


@pytest.mark.parametrize("target", ["test", "demo", "gpu-check", "bench", "table", "demo-base", *COLUMNS])
def test_with_py_set_a_target_uses_that_python_and_no_venv_or_pip(target):
    commands = dry_run(target, "PY=python3")
    assert commands and all(c[0] in ("python3", "for", "@for") or "python3" in c for c in commands), commands
    text = " ".join(" ".join(c) for c in commands)
    assert ".venv" not in text and "pip" not in text and "venv" not in text


def test_no_test_depends_on_a_venv():
    """The suite runs with a plain `python -m pytest` in any environment that has the packages: no test names the
    .venv folder that `make` builds (this test's own file excepted)."""
    tests = [p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name]
    assert tests and not [p.name for p in tests if re.search(r"\.venv\b|/bin/python", p.read_text())]


def test_extra_comes_last_so_it_overrides_any_targets_flag():
    command = train_command("lion-bs1024", 'EXTRA=--lr 1e-3 --weight-decay 0.05')
    assert command[-4:] == ["--lr", "1e-3", "--weight-decay", "0.05"]
    assert (train_flags(command)["lr"], train_flags(command)["weight_decay"]) == (1e-3, 0.05)


# The commands for the other readings of the seed, as README.md and docs/faithfulness.md give them.
READINGS = sorted({m for doc in ("README.md", "docs/faithfulness.md")
                   for m in re.findall(r'`make ([\w-]+ (?:EXTRA="[^"]*"|AMP=))`', (ROOT / doc).read_text())})


def test_the_docs_give_a_command_for_each_other_reading_of_the_seed():
    named = " ".join(READINGS)
    for flag in ("--depth 12", "--ra-mode in-batch", "--same-seed-on-ranks", "--eval-every 1", "--lr 1e-3", "AMP="):
        assert flag in named, flag


@pytest.mark.parametrize("reading", READINGS)
def test_each_other_reading_of_the_seed_is_one_command(reading):
    target, assignment = reading.split(" ", 1)
    command = train_command(target, assignment.replace('"', ""))
    parser = train.get_args_parser()
    if assignment.startswith("EXTRA="):
        extra = assignment.removeprefix("EXTRA=").strip("\"").split()
        assert command[-len(extra):] == extra  # the flags it names, last: they win
        named = [parser._option_string_actions[word].dest for word in extra if word.startswith("--")]
        wanted = {k: vars(parser.parse_args(extra))[k] for k in named}
        assert named and {k: train_flags(command)[k] for k in named} == wanted
    else:
        assert "--amp" not in command and train_flags(command)["amp"] is False


def test_gpu_check_installs_nothing_and_runs_the_venvs_python_where_built_else_python3(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    built = dry_run("gpu-check", f"VENV={tmp_path}", "DIR=/collected")
    absent = dry_run("gpu-check", f"VENV={tmp_path / 'absent'}", "OUT=/o")
    assert [command[0] for command in built] == [f"{tmp_path}/bin/python"] * 2
    assert [command[0] for command in absent] == ["python3"] * 2
    # First a check that it has torch >= 2.11; then the check itself, its files into DIR (default OUT/gpu-check).
    assert built[-1][1:] == ["bench.py", "--gpu-check", "--output-dir", "/collected"]
    assert absent[-1][1:] == ["bench.py", "--gpu-check", "--output-dir", "/o/gpu-check"]
    assert "pip" not in str(built + absent) and not (tmp_path / "installed").exists()


def test_gpu_check_without_torch_2_11_is_one_line():
    result = subprocess.run(["make", "gpu-check", "PY=false"], cwd=ROOT, env=TOP_LEVEL, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "make gpu-check: error: false lacks torch >= 2.11 (PY=...)"
