import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import report


def write_run(root, name, column, seed, final, best, seconds=100.0, epochs=4, complete=True, device="Fake GPU",
              dataset="cifar10"):
    folder = root / name
    folder.mkdir(parents=True)
    summary = {"complete": complete, "final_acc": final if complete else None, "best_acc": best, "best_epoch": 3,
               "epochs": epochs, "epochs_done": epochs if complete else 2, "steps": epochs * 10,
               "train_seconds": seconds, "device_name": device,
               "args": {"seed": seed, "tag": column, "dataset": dataset}}
    (folder / "summary.json").write_text(json.dumps(summary))
    records = [{"kind": "run", "epoch": 0, "step": 0}]
    for epoch in range(1, epochs + 1):
        records.append({"kind": "train", "epoch": epoch, "step": 10 * epoch, "lr": 1e-3 / epoch, "loss": 2.0 / epoch})
        records.append({"kind": "eval", "epoch": epoch, "step": 10 * epoch, "acc": final - (epochs - epoch)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def runs(tmp_path):
    for seed, final in enumerate([93.0, 94.0, 95.0]):
        write_run(tmp_path, f"baseline-seed{seed}", "baseline", seed, final, final + 0.5, seconds=100 + seed)
    for seed, final in enumerate([92.0, 92.5, 93.5]):
        write_run(tmp_path, f"mla-q-seed{seed}", "mla-q", seed, final, final + 1)
    # sin: seed 2 is missing; one of its folders has no tag and is grouped by its folder name.
    write_run(tmp_path, "sin-seed0", "sin", 0, 93.4, 93.6)
    write_run(tmp_path, "sin-seed1", None, 1, 93.2, 93.8)
    corrupt = write_run(tmp_path, "no-aa-seed0", "no-aa", 0, 91.0, 92.0)
    (corrupt / "summary.json").write_text('{"complete": true, "final_acc": 9')
    write_run(tmp_path, "whiten-seed0", "whiten", 0, 90.0, 90.0, complete=False)
    (tmp_path / "cls-2-seed0").mkdir()
    (tmp_path / "cls-2-seed0" / "metrics.jsonl").write_text('{"kind": "run", "step": 0}\n')
    return tmp_path


def table_row(table, target):
    (line,) = [line for line in table.splitlines() if f"| `{target}` |" in line]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_has_mean_and_std_over_seeds_next_to_the_paper(runs):
    columns, problems = report.main(report.get_args_parser().parse_args([str(runs), "--seeds", "3"]))
    table = (runs / "report" / "table.md").read_text()
    group, name, target, final, best, seeds, seconds, device, paper, diff, paper_time, dataset = table_row(table,
                                                                                                         "baseline")
    assert (group, final, best, seeds) == ("Baseline", "94.00 ± 1.00", "94.50 ± 1.00", "3")
    assert (seconds, device, paper, paper_time, dataset) == ("101", "Fake GPU", "93.65", "4658", "cifar10")
    assert diff == f"{94.0 - 93.65:.2f}"
    mla = table_row(table, "mla-q")
    expected_std = math.sqrt(((92 - 92.667) ** 2 + (92.5 - 92.667) ** 2 + (93.5 - 92.667) ** 2) / 2)
    assert mla[3] == f"92.67 ± {expected_std:.2f}" and mla[8] == "93.32"
    assert table_row(table, "sin")[3:6] == ["93.30 ± 0.14", "93.70 ± 0.14", "2"]
    assert table_row(table, "mla-kv")[3] == "not run"
    assert "sin (2 of 3 seeds)" in table and "mla-kv" in table.split("not run or short of seeds:")[1]


def test_missing_corrupt_and_unfinished_runs_are_reported_not_fatal(runs):
    columns, problems = report.main(report.get_args_parser().parse_args([str(runs)]))
    assert {column.label for column in columns.values()} == {"baseline", "mla-q", "sin"}
    text = "\n".join(problems)
    assert "no-aa-seed0/summary.json: unreadable" in text
    assert "whiten-seed0: incomplete (2 of 4 epochs)" in text and "--resume" in text
    assert "cls-2-seed0: no summary.json" in text
    table = (runs / "report" / "table.md").read_text()
    assert table_row(table, "no-aa")[3] == "not run" and "unreadable" in table


def test_unknown_columns_get_their_own_rows(tmp_path):
    write_run(tmp_path, "demo-seed0", "demo", 0, 97.0, 97.5, dataset="digits")
    write_run(tmp_path, "demo-mla-q-seed0", "demo-mla-q", 0, 96.0, 96.0, dataset="digits")
    columns, _ = report.main(report.get_args_parser().parse_args([str(tmp_path), "--baseline", "demo [digits]"]))
    table = (tmp_path / "report" / "table.md").read_text()
    assert table_row(table, "demo [digits]")[:4] == ["Other", "demo [digits]", "`demo [digits]`", "97.00"]
    row = table_row(table, "demo-mla-q [digits]")
    assert row[9] == "—" and row[11] == "digits"


def test_without_runs_of_the_papers_columns_the_table_is_the_runs_there_are(tmp_path, capsys):
    # make demo's untagged runs (a folder each) and a run of your own images: no paper column among them.
    write_run(tmp_path, "demo-20261205-101010", None, 0, 97.0, 97.5, dataset="digits")
    write_run(tmp_path, "my_data-20261205-111111", None, 0, 80.0, 81.0, dataset="imagefolder")
    report.main(report.get_args_parser().parse_args([str(tmp_path), "--plots"]))
    table, notes = (tmp_path / "report" / "table.md").read_text().split("\n\n")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [row[:4] + row[11:] for row in rows] == [
        ["Run", "demo-20261205-101010 [digits]", "(a run without --tag)", "97.00", "digits"],
        ["Run", "my_data-20261205-111111 [imagefolder]", "(a run without --tag)", "80.00", "imagefolder"]]
    assert notes.startswith("- none of the paper's 16 columns has runs under") and notes.count("\n- ") == 0
    # differences.png needs a baseline: the message names the flag and the columns there are.
    err = capsys.readouterr().err
    assert "differences.png not written: it needs runs of --baseline 'baseline'" in err
    assert "(columns: demo-20261205-101010 [digits], my_data-20261205-111111 [imagefolder])" in err

    # A paper column's run on another dataset is not a run of the paper's column: the paper's rows stay out.
    write_run(tmp_path, "baseline-svhn-seed0", "baseline", 0, 95.0, 95.0, dataset="svhn")
    report.main(report.get_args_parser().parse_args([str(tmp_path)]))
    text = (tmp_path / "report" / "table.md").read_text()
    assert "none of the paper's" in text and "not run" not in text and table_row(text, "baseline [svhn]")[11] == "svhn"

    # With one run of a paper column, the paper's columns are back, and no note says they are left out.
    write_run(tmp_path, "baseline-seed0", "baseline", 0, 93.0, 93.0)
    report.main(report.get_args_parser().parse_args([str(tmp_path)]))
    text = (tmp_path / "report" / "table.md").read_text()
    assert table_row(text, "mla-q")[3:5] == ["not run", ""] and "none of the paper's" not in text


def test_differences_from_the_baseline_carry_standard_errors(runs):
    columns, _ = report.main(report.get_args_parser().parse_args([str(runs)]))
    diffs = report.differences(columns, ("baseline", ""))
    mean, error = diffs["mla-q"]
    assert mean == pytest.approx(92.6667 - 94.0, abs=1e-3)
    mla_std = report.statistics.stdev([92.0, 92.5, 93.5])
    assert error == pytest.approx(math.sqrt(mla_std**2 / 3 + 1.0**2 / 3))


def test_plots_are_written_as_png(runs):
    report.main(report.get_args_parser().parse_args([str(runs), "--plots"]))
    out = runs / "report"
    pngs = [out / "differences.png"] + [
        out / "curves" / f"{name}-seed{s}.png" for name in ("baseline", "mla-q") for s in range(3)]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not (out / "curves" / "whiten-seed0.png").exists()


def test_a_missing_runs_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(report.get_args_parser().parse_args([str(tmp_path / "nowhere")]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"report.py: error: {tmp_path / 'nowhere'} is not a folder of runs\n"


STUB = '''#!{python}
import json, sys
from pathlib import Path
argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[0] == "train.py":
    out = Path(argv[argv.index("--output-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    seed = int(argv[argv.index("--seed") + 1])
    (out / "summary.json").write_text(json.dumps({{"complete": True, "final_acc": 90.0 + seed, "best_acc": 91.0,
        "train_seconds": 1.0, "steps": 10, "epochs_done": 1, "epochs": 1, "args": {{"seed": seed,
        "tag": argv[argv.index("--tag") + 1]}}}}, indent=2))
'''


def test_table_runs_skips_finished_runs_and_runs_the_others_with_resume_auto(tmp_path):
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable, log=str(log)))
    stub.chmod(0o755)
    out = tmp_path / "runs"
    write_run(out, "baseline-seed0", "baseline", 0, 93.0, 93.0)  # finished: skipped
    stopped = write_run(out, "sin-seed0", "sin", 0, 90.0, 90.0, complete=False)
    (stopped / "checkpoint.pt").write_bytes(b"checkpoint")  # stopped: resumed
    (out / "baseline-seed1").mkdir()
    (out / "baseline-seed1" / "metrics.jsonl").write_text("{}\n")  # died before a checkpoint: train.py restarts it
    result = subprocess.run(["make", "table-runs", "SEEDS=2", f"OUT={out}",
                             "COLUMNS=baseline sin", f"PY={stub}", "EPOCHS=1"], cwd=Path(__file__).parents[1],
                            capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    trained = [(c[c.index("--output-dir") + 1].split("/")[-1], c[c.index("--resume") + 1]) for c in calls
               if c[0] == "train.py"]
    assert trained == [("sin-seed0", "auto"), ("baseline-seed1", "auto"), ("sin-seed1", "auto")]
    assert calls[-1][:2] == ["report.py", str(out)]


# A process that holds a run folder's lock as train.py does, until it is killed.
HOLDER = """
import contextlib, sys, time
from pathlib import Path
import run
run.lock_output_dir(Path(sys.argv[1]), contextlib.ExitStack())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_still_training_is_listed_as_running_and_never_counted(tmp_path):
    going = write_run(tmp_path, "whiten-seed0", "whiten", 0, 90.0, 90.0, complete=False)
    done = write_run(tmp_path, "baseline-seed0", "baseline", 0, 93.0, 93.5)
    (done / ".lock").write_text("pid 1 on gone\n")  # left by its run, which ended: nobody holds it
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(going)], cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        runs, problems = report.load_runs(tmp_path)
    finally:
        holder.kill()
        holder.communicate()
    assert [run.folder for run in runs] == [done]
    assert problems == [f"{going}: running (pid {holder.pid} on {platform.node()}): not counted until it ends"]
    # Its process ended: the run is what its files say.
    runs, problems = report.load_runs(tmp_path)
    assert [run.folder for run in runs] == [done] and problems[0].startswith(f"{going}: incomplete (2 of 4 epochs)")


def test_only_run_leaves_out_the_papers_empty_columns(runs):
    report.main(report.get_args_parser().parse_args([str(runs), "--only-run"]))
    table = (runs / "report" / "table.md").read_text()
    assert "| `baseline` |" in table and "| `mla-kv` |" not in table and "not run" not in table.split("\n\n")[0]


def test_runs_of_other_readings_of_the_seed_get_columns_of_their_own(tmp_path):
    # Our default reading: depth 9, the column's repeated-augmentation mode, bf16. Each other reading is kept apart.
    readings = {"baseline-seed0": {}, "baseline-seed1": {},
                "baseline-depth12-seed0": {"depth": 12}, "baseline-depth12-seed1": {"depth": 12},
                "baseline-inbatch-seed0": {"ra_mode": "in-batch"}, "baseline-fp32-seed0": {"amp": False},
                "ddp-bs256-seed0": {"ra_mode": "in-batch"}, "ddp-bs256-shuffles-seed0": {"ra_mode": "shuffles"}}
    for i, (name, args) in enumerate(readings.items()):
        folder = write_run(tmp_path, name, name.split("-")[0] if "ddp" not in name else "ddp-bs256", int(name[-1]),
                           90.0 + i, 91.0 + i)
        summary = json.loads((folder / "summary.json").read_text())
        summary["args"].update({"depth": 9, "ra_mode": "shuffles", "amp": True, **args})
        summary["precision"] = "bf16" if summary["args"]["amp"] else "fp32"
        (folder / "summary.json").write_text(json.dumps(summary))
    fp16 = write_run(tmp_path, "baseline-fp16-seed0", "baseline", 0, 99.0, 99.0)
    summary = json.loads((fp16 / "summary.json").read_text())
    (fp16 / "summary.json").write_text(json.dumps({**summary, "precision": "fp16"}))
    lion = {"ra_mode": "in-batch", "opt": "lion", "depth": 9, "amp": True}
    ours = {"lr": 1e-4, "weight_decay": 0.5}
    for name, args in {"lion-bs1024-seed0": ours, "lion-bs1024-adamw-lr-seed0": {"lr": 1e-3, "weight_decay": 0.05},
                       "lion-bs1024-same-seeds-seed0": {**ours, "same_seed_on_ranks": True}}.items():
        folder = write_run(tmp_path, name, "lion-bs1024", 0, 92.0, 92.0)
        summary = json.loads((folder / "summary.json").read_text())
        summary["args"].update({**lion, **args})
        (folder / "summary.json").write_text(json.dumps(summary))
    columns, _ = report.main(report.get_args_parser().parse_args([str(tmp_path)]))
    assert {column.label: len(column.runs) for column in columns.values()} == {
        "baseline": 2, "baseline [depth 12]": 2, "baseline [RA in-batch]": 1, "baseline [fp32]": 1,
        "baseline [fp16]": 1, "ddp-bs256": 1, "ddp-bs256 [RA shuffles]": 1, "lion-bs1024": 1,
        "lion-bs1024 [lr 0.001, wd 0.05]": 1, "lion-bs1024 [same seed on ranks]": 1}
    table = (tmp_path / "report" / "table.md").read_text()
    assert table_row(table, "baseline")[3] == "90.50 ± 0.71"  # seeds 0 and 1 of the default reading only
    row = table_row(table, "baseline [depth 12]")
    assert row[:4] == ["Baseline", "baseline [depth 12]", "`baseline [depth 12]`", "92.50 ± 0.71"]
    assert row[8] == "93.65"
    targets = [line.split("|")[3].strip() for line in table.splitlines()[2:7]]  # right under their column
    assert targets == ["`baseline`", "`baseline [RA in-batch]`", "`baseline [depth 12]`", "`baseline [fp16]`",
                       "`baseline [fp32]`"]


def test_a_run_on_another_dataset_sits_next_to_its_own_reference_never_the_papers(tmp_path):
    write_run(tmp_path, "baseline-seed0", "baseline", 0, 93.0, 93.5)
    for name, dataset, final, args in [("baseline-svhn-seed0", "svhn", 97.0, {}),
                                       ("no-hflip-svhn-seed0", "svhn", 97.5, {"hflip": False}),
                                       ("baseline-cifar100-seed0", "cifar100", 70.0, {}),
                                       ("baseline-tinyimagenet-seed0", "tinyimagenet", 50.0, {"depth": 12})]:
        folder = write_run(tmp_path, name, name.split("-")[0] if "hflip" not in name else "no-hflip", 0, final, final)
        summary = json.loads((folder / "summary.json").read_text())
        summary["args"].update({"dataset": dataset, **args})
        (folder / "summary.json").write_text(json.dumps(summary))
    columns, _ = report.main(report.get_args_parser().parse_args([str(tmp_path), "--only-run"]))
    assert {column.label for column in columns.values()} == {
        "baseline", "baseline [svhn]", "no-hflip [svhn]", "baseline [cifar100]", "baseline [tinyimagenet, depth 12]"}
    table = (tmp_path / "report" / "table.md").read_text()
    # The paper's CIFAR-10 baseline row holds the CIFAR-10 run alone, next to 93.65.
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")].count("Baseline") == 1
    assert table_row(table, "baseline")[3] == "93.00" and table_row(table, "baseline")[8] == "93.65"
    # Every other dataset's column: its SPT/LSA reference (paper acc column), no paper time.
    for label, reference, final in [("baseline [svhn]", "97.82", 97.0), ("no-hflip [svhn]", "97.82", 97.5),
                                    ("baseline [cifar100]", "73.81", 70.0),
                                    ("baseline [tinyimagenet, depth 12]", "57.07", 50.0)]:
        row = table_row(table, label)
        assert (row[0], row[8], row[9], row[10]) == ("Other", reference, f"{final - float(reference):.2f}", "—"), row
    assert "aanna0701/SPT_LSA_ViT" in table and "93.58" not in table


def test_table_runs_and_datasets_table_put_each_datasets_runs_in_folders_of_their_own(tmp_path):
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable, log=str(log)))
    stub.chmod(0o755)

    def make(*argv):
        result = subprocess.run(["make", *argv, f"PY={stub}", "EPOCHS=1", "SEEDS=1"], cwd=Path(__file__).parents[1],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        trained = [(c[c.index("--dataset") + 1], c[c.index("--output-dir") + 1], "--no-hflip" in c) for c in calls
                   if c[0] == "train.py"]
        return trained, [c for c in calls if c[0] == "report.py"]

    out = tmp_path / "runs"
    trained, reports = make("table-runs", "DATASET=svhn", f"OUT={out}", "COLUMNS=baseline mla-q")
    assert trained == [("svhn", f"{out}/baseline-svhn-seed0", False), ("svhn", f"{out}/mla-q-svhn-seed0", False)]
    assert reports == [["report.py", str(out), "--seeds", "1", "--plots", "--only-run", "--baseline",
                        "baseline [svhn]"]]
    trained, reports = make("datasets-table", f"OUT={out}")
    assert trained == [("cifar100", f"{out}/datasets/baseline-cifar100-seed0", False),
                       ("svhn", f"{out}/datasets/baseline-svhn-seed0", False),
                       ("svhn", f"{out}/datasets/no-hflip-svhn-seed0", True),
                       ("tinyimagenet", f"{out}/datasets/baseline-tinyimagenet-seed0", False)]
    assert reports == [["report.py", f"{out}/datasets", "--seeds", "1", "--only-run"]]
    # Run again: every run is finished, so none starts.
    trained, _ = make("datasets-table", f"OUT={out}")
    assert trained == []
    # The demo table's differences are from demo-base, by the label report.py gives its runs on digits.
    _, (demo_report,) = make("demo-table", f"OUT={out}")
    key = report.column_key(out / "demo-base-seed0", {"args": {"tag": "demo-base", "dataset": "digits"}})
    assert demo_report[demo_report.index("--baseline") + 1] == report.Column(*key, runs=[]).label


def test_docs_training_names_every_flag_of_report():
    docs = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    flags = re.findall(r"\[(--[a-z-]+)", report.get_args_parser().format_usage())
    assert "--only-run" in flags and [flag for flag in flags if f"`{flag}" not in docs] == []
