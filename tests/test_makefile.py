"""The Makefile: one target per column of the paper's table, each reading of the seed one command away, a PY that
runs everything in an environment as it is (no venv, no pip), the table's job lists with the recipes of
docs/parallel.md that run them, and the README's commands as a newcomer runs them."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("target", ["baseline", "mla-q", "no-hflip"])
@pytest.mark.parametrize("dataset", ["cifar100", "svhn", "tinyimagenet", "imagefolder"])
def test_dataset_runs_a_column_on_that_dataset_in_a_folder_of_its_own(target, dataset):
    args = train_flags(train_command(target, f"DATASET={dataset}", "SEED=3", "OUT=/o"))
    assert args["dataset"] == dataset and args["output_dir"] == f"/o/{target}-{dataset}-seed3"
    assert args["download"] == (dataset != "imagefolder")  # an image folder has nothing to fetch
    assert (args["latent"], args["hflip"]) == ({"mla-q": "q"}.get(target, ""), target != "no-hflip")


def test_makefile_has_a_target_for_every_column():
    dry = subprocess.run(["make", "-pn"], cwd=ROOT, env=TOP_LEVEL, capture_output=True, text=True).stdout
    (columns,) = [line for line in dry.splitlines() if line.startswith("COLUMNS :=")]
    assert set(columns.split(":=")[1].split()) == set(COLUMNS)


@pytest.mark.parametrize("target", ["test", "demo", "own-images", "gpu-check", "bench", "table", "demo-base",
                                    *COLUMNS])
def test_with_py_set_a_target_uses_that_python_and_no_venv_or_pip(target):
    commands = dry_run(target, "PY=python3")
    # echo: the commands that make demo and make own-images print for their run, which run nothing.
    assert commands and all(c[0] in ("python3", "for", "@for", "echo") or "python3" in c for c in commands), commands
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


# ---- README.md's commands, as a newcomer pastes them into a fresh shell after `make demo` and `make test`
README = (ROOT / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def readme_make_commands():
    """Every make command README.md shows, in a bash block or inline (a placeholder such as <target> aside)."""
    lines = [line.split("  #")[0].strip() for block in BASH_BLOCKS for line in block.splitlines()]
    inline = [" ".join(command.split()) for command in re.findall(r"`(make [^`<]+)`", README)]
    return sorted({command for command in lines + inline if command.startswith("make ")})


def test_the_readme_shows_the_set_up_own_images_and_reading_commands():
    assert {"make demo", "make test", "make own-images DATA=my_data", "make baseline PY=python3"} <= set(
        readme_make_commands())
    # A script run by a bare python: a fresh shell's python has no torch.
    assert re.findall(r"(?:^|`)python3? \w+\.py", README, re.M) == []


@pytest.mark.parametrize("command", readme_make_commands())
def test_each_make_command_of_the_readme_names_a_target_that_runs(command):
    """A dry run (make -n): the target exists and its recipe expands; a mistyped target or variable would fail."""
    result = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT, env=TOP_LEVEL, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def fresh_clone(folder):
    """The project's files in `folder`, as after `git clone` and `make test` (its .venv: this Python, installed)."""
    for path in ROOT.iterdir():  # the top-level files a clone has (paper_table.csv, ...), no .git or .venv
        if path.is_file() and not path.name.startswith("."):
            shutil.copy(path, folder)
    shutil.copytree(ROOT / "docs", folder / "docs")
    python = folder / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (folder / ".venv" / "installed").touch()  # after requirements.txt: make installs nothing
    return folder


def fresh_shell(script, clone):
    """`script` run by bash in `clone` as in a new terminal: no venv activated, only the system's PATH."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(clone), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", script], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def next_steps(stdout):
    """The commands that `make demo` and `make own-images` print after training, each split into words."""
    lines = stdout[stdout.index("next: "):].splitlines()
    return [shlex.split(line.removeprefix("next: ")) for line in lines if line.strip()]


TINY_MODEL = 'EXTRA=--dim 32 --depth 2 --heads 4 --epochs 1 --warmup-epochs 0'


def test_the_readme_commands_work_in_a_fresh_shell_and_make_demo_prints_them_for_its_run(tmp_path):
    clone = fresh_clone(tmp_path)
    # make demo (a tiny model: EXTRA comes last) ends by printing the README's commands for the run it wrote.
    printed = next_steps(fresh_shell(f"make demo '{TINY_MODEL}'", clone))
    (run,) = [path for path in (clone / "runs").iterdir() if path.name.startswith("demo-2")]
    assert json.loads((run / "summary.json").read_text())["complete"]
    (block,) = [block for block in BASH_BLOCKS if ".venv/bin/python" in block]
    readme = [shlex.split(line.split("  #")[0].replace("$run", f"runs/{run.name}")) for line in block.splitlines()]
    assert printed == readme[1:] and len(printed) == 3  # evaluate, predict, analyze

    # The README's block, pasted as it is (it finds the newest demo run itself), then the commands its text names
    # (train.py -h, export.py; bench.py aside: minutes on a CPU).
    inline = [command for command in re.findall(r"`(\.venv/bin/python [^`]+)`", README) if "bench.py" not in command]
    fresh_shell(block + "\n".join(inline), clone)
    assert len((run / "predictions.csv").read_text().splitlines()) == 1 + 10  # docs/example/digits: ten images
    assert "## Post-hoc rank truncation" in (run / "analysis" / "report.md").read_text()
    assert len(inline) == 2 and (clone / "exported" / "poorvit.safetensors").is_file()


def test_make_own_images_trains_on_an_image_folder_on_the_cpu_and_prints_the_commands_for_its_run(tmp_path):
    from PIL import Image

    clone = fresh_clone(tmp_path)
    for split, count in (("train", 20), ("val", 2)):
        for shade, name in ((40, "dark"), (220, "light")):
            folder = clone / "my_data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):  # photos of any size, none square
                Image.new("RGB", (48 + i, 40), (shade, shade + i, shade)).save(folder / f"{i}.png")
    stdout = fresh_shell(f"make own-images DATA=my_data '{TINY_MODEL}' 2>&1", clone)
    assert "train.py: start: imagefolder (my_data): 2 classes (dark, light), 40 train / 4 val images" in stdout
    printed = next_steps(stdout)
    (run,) = list((clone / "runs").iterdir())
    assert run.name.startswith("my_data-2") and all(f"runs/{run.name}" in command for command in printed)
    assert "4 val images: accuracy" in fresh_shell(shlex.join(printed[0]), clone)
    fresh_shell(shlex.join(printed[1]), clone)
    assert len((run / "predictions.csv").read_text().splitlines()) == 1 + 4  # my_data/val


def test_train_help_ends_with_examples_that_parse_and_match_the_make_targets_they_name(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    parser = train.get_args_parser()
    text = parser.format_help()
    assert text.rstrip().endswith(parser.epilog.rstrip())  # as written: shell line continuations kept
    assert text.index("--device DEVICE") < text.index("--dataset {")  # the first flag a CPU user needs, first
    lines = parser.epilog.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if line.lstrip().startswith(("python ", "torchrun "))]
    assert len(commands) == 6

    def flags(command):  # every flag exists and every value parses; where a run goes aside
        return {k: v for k, v in train_flags(command).items() if k not in ("output_dir", "seed", "tag", "resume")}

    demo, own_images, baseline, resume, longer, ddp = commands
    assert flags(demo) == flags(train_command("demo"))
    assert flags(own_images) == flags(train_command("own-images", "DATA=my_data"))
    assert flags(baseline) == flags(resume) == flags(train_command("baseline"))
    assert train_flags(resume)["resume"] == "auto" and train_flags(longer)["init_from"].endswith("checkpoint.pt")
    assert flags(ddp) == flags(train_command("ddp-bs1024"))


# ---- the job lists of docs/parallel.md: one command per unfinished run, for GNU parallel, SLURM arrays, xargs
DDP_COLUMNS = ("ddp-bs256", "ddp-bs1024", "lion-bs1024")
DEMO_COLUMNS = ("demo-base", "demo-mla-qkv", "demo-cls-4")
RECIPES = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "parallel.md").read_text(), re.DOTALL)
# A python that records each call (the GPUs it was given, then its arguments) instead of training.
RECORDER = '#!/bin/sh\necho "${CUDA_VISIBLE_DEVICES-none}|$*" >> "$(dirname "$0")/calls.txt"\n'


def job_list(target, *argv, cwd=ROOT, env=TOP_LEVEL):
    """The lines `make <target>` prints on standard output, and what it says on standard error."""
    result = subprocess.run(["make", target, *argv], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return result.stdout.splitlines(), result.stderr


def finished(folder, complete=True):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"complete": complete}, indent=2))


def recipe(containing):
    (block,) = [block for block in RECIPES if containing in block]
    return block


def recorder_setup(tmp_path):
    """A folder with the Makefile (the lists need nothing else) and the recording python as PY: the recipes' calls
    are recorded in calls.txt."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "bin").mkdir()
    python = tmp_path / "bin" / "python"
    python.write_text(RECORDER)
    python.chmod(0o755)
    return {**TOP_LEVEL, "PY": str(python), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}


def recorded_calls(tmp_path):
    """(GPUs, the command after PY) of each recorded call."""
    return [tuple(line.split("|", 1)) for line in (tmp_path / "bin" / "calls.txt").read_text().splitlines()]


def after_python(line):
    return " ".join(shlex.split(line)[1:])


def test_the_job_lists_are_what_make_runs_for_each_unfinished_run_seed_by_seed(tmp_path):
    settings = ["SEEDS=2", f"OUT={tmp_path}", "EPOCHS=7", "NPROC=2", "DATASET=cifar100", "PY=python3",
                "EXTRA=--lr '2e-3'"]
    single, _ = job_list("table-jobs", *settings)
    ddp, _ = job_list("table-jobs-ddp", *settings)
    expected = [train_command(column, f"SEED={seed}", *settings) for seed in (0, 1) for column in COLUMNS]
    assert [shlex.split(line) for line in single] == [c for c in expected if train_flags(c)["tag"] not in DDP_COLUMNS]
    assert [shlex.split(line) for line in ddp] == [c for c in expected if train_flags(c)["tag"] in DDP_COLUMNS]
    assert all("--nproc_per_node=2" in line for line in ddp) and not any("nproc" in line for line in single)
    assert {(train_flags(c)["dataset"], train_flags(c)["epochs"], train_flags(c)["lr"]) for c in expected} == {
        ("cifar100", 7, 2e-3)}

    # A finished run is left out (and named on stderr); one that stopped before its end is listed, to continue. A run
    # on CIFAR-100 lives in OUT/<column>-cifar100-seed<N>.
    finished(tmp_path / "baseline-cifar100-seed1")
    finished(tmp_path / "sin-cifar100-seed0", complete=False)
    again, said = job_list("table-jobs", *settings)
    assert again == [line for line in single if f"{tmp_path}/baseline-cifar100-seed1 " not in line]
    assert len(again) == len(single) - 1 and said.splitlines() == [f"done: {tmp_path}/baseline-cifar100-seed1"]


def test_the_demo_job_list_has_one_line_per_run_and_leaves_out_a_finished_one(tmp_path):
    lines, _ = job_list("demo-table-jobs", "SEEDS=2", f"OUT={tmp_path}", "PY=python3")
    runs = [(flags["tag"], flags["seed"], flags["output_dir"]) for flags in map(train_flags, map(shlex.split, lines))]
    assert runs == [(column, seed, f"{tmp_path}/demo-table/{column}-seed{seed}") for seed in (0, 1)
                    for column in DEMO_COLUMNS]
    finished(tmp_path / "demo-table" / "demo-cls-4-seed0")
    again, _ = job_list("demo-table-jobs", "SEEDS=2", f"OUT={tmp_path}", "PY=python3")
    assert again == lines[:2] + lines[3:]


def test_the_demo_jobs_run_side_by_side_by_xargs_give_the_summaries_of_runs_one_after_another(tmp_path):
    tiny = "--epochs 1 --warmup-epochs 0 --dim 64 --depth 1 --heads 2 --eval-every 1 --log-every 5"
    settings = ["SEEDS=2", "DEMO_COLUMNS=demo-base demo-cls-4", f"OUT={tmp_path}", f"PY={sys.executable}",
                f"EXTRA={tiny}"]
    lines, _ = job_list("demo-table-jobs", *settings)
    (xargs,) = [line.split("| ")[1].split("#")[0] for line in recipe("xargs").splitlines() if "-P 2 sh -c" in line]
    # One thread in every process: CPU kernels may sum in another order with another thread count, and two
    # threads per process spin against each other on a busy machine.
    env = {**TOP_LEVEL, "OMP_NUM_THREADS": "1"}
    subprocess.run(xargs, shell=True, input="\n".join(lines) + "\n", cwd=ROOT, env=env, capture_output=True, text=True,
                   check=True, timeout=600)
    assert len(lines) == 4 and job_list("demo-table-jobs", *settings)[0] == []  # every run finished

    # Each run again, alone, in this process: the same steps, losses and accuracies.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line in lines:
            args = train.get_args_parser().parse_args(shlex.split(line)[2:])
            side_by_side = Path(args.output_dir)
            args.output_dir = str(tmp_path / "alone" / side_by_side.name)
            alone = train.main(args)
            summary = json.loads((side_by_side / "summary.json").read_text())
            assert (summary["steps"], summary["final_acc"], summary["best_acc"]) == (
                alone["steps"], alone["final_acc"], alone["best_acc"])
            losses = [[json.loads(r).get("loss") for r in (folder / "metrics.jsonl").read_text().splitlines()]
                      for folder in (side_by_side, Path(args.output_dir))]
            assert losses[0] == losses[1] and len(losses[0]) > 3
    finally:
        torch.set_num_threads(threads)


def test_a_slurm_array_runs_each_line_of_the_job_lists_once(tmp_path):
    env = recorder_setup(tmp_path)
    (tmp_path / "table.sbatch").write_text(recipe("#SBATCH"))
    # A fake sbatch: the script once per task id of --array=FIRST-LAST[%K], one after another.
    (tmp_path / "bin" / "sbatch").write_text(
        '#!/bin/bash\nfor arg in "$@"; do case $arg in --array=*) range=${arg#--array=}; range=${range%%%*};; '
        '--*) ;; *) break;; esac; shift; done\n'
        'for id in $(seq ${range%-*} ${range#*-}); do SLURM_ARRAY_TASK_ID=$id bash "$@" || exit; done\n')
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    subprocess.run(["bash", "-e", "-c", recipe("sbatch --array")], cwd=tmp_path, env=env, check=True, timeout=300)
    lines = [after_python(line) for name in ("jobs.txt", "ddp-jobs.txt")
             for line in (tmp_path / name).read_text().splitlines()]
    assert len(lines) == 16 * 3 and [call for _, call in recorded_calls(tmp_path)] == lines

    # A task id picks its line (from 1); past the end, one line says so.
    (tmp_path / "bin" / "calls.txt").unlink()
    task = subprocess.run(["bash", "table.sbatch", "jobs.txt"], cwd=tmp_path, env={**env, "SLURM_ARRAY_TASK_ID": "2"},
                          check=True)
    assert recorded_calls(tmp_path) == [("none", lines[1])]
    past = subprocess.run(["bash", "table.sbatch", "jobs.txt"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "SLURM_ARRAY_TASK_ID": "40"})
    assert past.returncode == 2 and past.stderr == "table.sbatch: error: jobs.txt has no line 40\n"


def test_xargs_gives_each_run_at_once_a_gpu_of_its_own(tmp_path):
    env = recorder_setup(tmp_path)
    (line,) = [line for line in recipe("xargs").splitlines() if "process-slot-var" in line]
    subprocess.run(["bash", "-e", "-c", line], cwd=tmp_path, env=env, check=True, timeout=300)
    jobs, _ = job_list("table-jobs", "SEEDS=3", cwd=tmp_path, env=env)
    calls = recorded_calls(tmp_path)
    assert sorted(call for _, call in calls) == sorted(map(after_python, jobs)) and len(jobs) == 13 * 3
    assert {gpus for gpus, _ in calls} <= {str(gpu) for gpu in range(8)}


@pytest.mark.skipif(shutil.which("parallel") is None, reason="GNU parallel is not installed")
def test_gnu_parallel_runs_the_table_on_a_nodes_gpus_then_the_ddp_runs_then_the_report(tmp_path):
    env = recorder_setup(tmp_path)
    node = recipe("parallel -j").replace("export GPUS=8 RUNS=1 NPROC=8", "export GPUS=4 RUNS=2 NPROC=2")
    subprocess.run(["bash", "-e", "-c", node], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    calls = recorded_calls(tmp_path)
    jobs = [after_python(line) for line in (tmp_path / "jobs.txt").read_text().splitlines()]
    ddp_jobs = [after_python(line) for line in (tmp_path / "ddp-jobs.txt").read_text().splitlines()]
    single_calls = calls[: len(jobs)]
    ddp_calls = calls[len(jobs): len(jobs) + len(ddp_jobs)]
    assert sorted(job for _, job in single_calls) == sorted(jobs) and len(jobs) == 13 * 3
    assert {gpus for gpus, _ in single_calls} == {"0", "1", "2", "3"}
    assert sorted(job for _, job in ddp_calls) == sorted(ddp_jobs) and all("--nproc_per_node=2" in j for j in ddp_jobs)
    assert {gpus for gpus, _ in ddp_calls} == {"0,1", "2,3"}
    assert calls[-1][1].startswith("report.py runs --seeds 3") and len(calls) == len(jobs) + len(ddp_jobs) + 1


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
