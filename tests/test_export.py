"""export.py: each file loads back as its users load it (this repo, timm, onnxruntime) and gives the checkpoint's
logits; every refusal is one line that writes nothing; files get the modes the umask asks for."""
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from einops.layers.torch import Rearrange
from safetensors import safe_open

import analyze
import data
import export
import predict
import run as machinery
import train
from model import ViT, ViTConfig

TINY = dict(dim=32, depth=2, heads=4, patch_size=8, latent_dim=8)
DATA = {"classes": [f"class {i}" for i in range(7)], "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def export_main(*argv):
    return export.main(export.get_args_parser().parse_args([str(a) for a in argv]))


def one_line_error(capsys, *argv):
    """The stderr line of an export that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        export_main(*argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("export.py: error: "), lines
    return lines[0]


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tiny_checkpoint(path, **config):
    """A checkpoint as train.py writes one, of a tiny ViT with 7 classes whose weights are far from their init (every
    parameter moved by N(0, 0.1)), so that a wrong mapping shows in the logits."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(**{**TINY, "num_classes": 7, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "config": asdict(model.cfg), "args": {"dataset": "digits"}, "step": 3,
                "last_acc": 50.0, "data": DATA}, path)
    return model.eval()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """trained_run (two CLS tokens) exported with every format it can take."""
    out = tmp_path_factory.mktemp("exported")
    export_main(trained_run, out, "--force")
    return out


def test_native_file_holds_the_checkpoint_and_gives_bitwise_its_logits(trained_run, exported):
    model, ckpt = machinery.load_model(trained_run / "checkpoint.pt", "checkpoint")
    native, native_ckpt = machinery.load_model(exported / "poorvit.safetensors", "checkpoint")
    assert native_ckpt["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(native_ckpt["model"][k], v) for k, v in ckpt["model"].items())
    for key in ("config", "args", "step", "last_acc", "best_acc", "run"):
        assert native_ckpt[key] == ckpt[key], key
    assert native_ckpt["data"] == {key: list(value) for key, value in ckpt["data"].items()}
    with safe_open(exported / "poorvit.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt" and json.loads(f.metadata()["classes"]) == ckpt["data"]["classes"]
    # predict.py takes the file, and the export folder, as it takes the checkpoint: the same logits, bit for bit.
    digits = data.load_digits()
    expected = predict.logits_of(model, digits.test_images, data.Normalize(digits.mean, digits.std), "cpu")
    for source in (exported, exported / "poorvit.safetensors"):
        loaded, _ = predict.load(source, "cpu")
        normalize = data.Normalize(digits.mean, digits.std)
        assert torch.equal(predict.logits_of(loaded, digits.test_images, normalize, "cpu"), expected)
    result = predict.main(predict.get_args_parser().parse_args(["evaluate", str(exported), "--device", "cpu"]))
    assert result["acc"] == json.loads((trained_run / "summary.json").read_text())["final_acc"]


def test_analyze_reads_the_native_file(trained_run, exported, tmp_path):
    args = analyze.get_args_parser().parse_args([str(exported / "poorvit.safetensors"), "--out", str(tmp_path),
                                                 "--device", "cpu", "--images", "60", "--rank-steps", "2",
                                                 "--cls-images", "1"])
    result = analyze.main(args)
    assert result.result["acc"] == json.loads((trained_run / "summary.json").read_text())["final_acc"]
    assert (tmp_path / "report.md").is_file()


# An lr of 1e-30 moves no float32 weight: the run's checkpoint holds the model --init-from built.
STILL = ["--dataset", "digits", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "4", "--num-cls", "2",
         "--batch-size", "256", "--epochs", "1", "--ra-reps", "1", "--lr", "1e-30", "--warmup-epochs", "0",
         "--min-lr", "0", "--drop-path", "0", "--no-hflip", "--auto-augment", "none", "--random-erase", "0",
         "--device", "cpu"]


def test_init_from_takes_the_native_file(trained_run, exported, tmp_path):
    train.main(train.get_args_parser().parse_args([*STILL, "--output-dir", str(tmp_path),
                                                   "--init-from", str(exported / "poorvit.safetensors")]))
    started = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    source = torch.load(trained_run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(started[k], v) for k, v in source.items())


def test_onnx_file_gives_the_checkpoints_logits_at_any_batch(trained_run, exported):
    model, ckpt = machinery.load_model(trained_run / "checkpoint.pt", "checkpoint")
    assert isinstance(model.to_patch_embedding[0], Rearrange)  # einops in the traced path (einops#355)
    check_onnx(exported / "model.onnx", model.eval(), ckpt["data"])


def check_onnx(path, model, stats):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images_input,) = session.get_inputs()
    assert images_input.name == "images" and isinstance(images_input.shape[0], str) and images_input.shape[1:] == [
        3, 32, 32]
    assert [output.name for output in session.get_outputs()] == ["logits"]
    metadata = session.get_modelmeta().custom_metadata_map
    assert {key: json.loads(metadata[key]) for key in stats} == {key: list(value) for key, value in stats.items()}
    for n in (1, 5):
        x = images(n, seed=n)
        with torch.no_grad():
            expected = model(x).numpy()
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        assert logits.shape == expected.shape and np.abs(logits - expected).max() <= 1e-4


def test_onnx_of_a_low_rank_sincos_model(tmp_path):
    model = tiny_checkpoint(tmp_path / "ckpt.pt", latent="qkvo", latent_dim=8, mlp_latent_dim=8,
                            pos_embed="sincos", num_cls=3, cls_pool="mean")
    export_main(tmp_path / "ckpt.pt", tmp_path / "out", "--format", "onnx")
    check_onnx(tmp_path / "out" / "model.onnx", model, DATA)


TIMM_CONFIGS = [dict(), dict(pos_embed="sincos"), dict(latent="q"), dict(latent="k"), dict(latent="v"),
                dict(latent="o"), dict(latent="kv"), dict(mlp_latent_dim=6),
                dict(cls_pool="mean"),
                dict(latent="qkvo", latent_dim=5, mlp_latent_dim=7, pos_embed="sincos")]


@pytest.mark.parametrize("config", TIMM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "base")
def test_timm_loads_the_folder_and_computes_the_same_logits(tmp_path, capsys, config):
    model = tiny_checkpoint(tmp_path / "ckpt.pt", **config)
    export_main(tmp_path / "ckpt.pt", tmp_path / "out", "--format", "timm")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = images(5)
    with torch.no_grad():
        ours_logits = model(x)
        assert ours_logits.std() > 0.1  # far from zero: a wrong mapping cannot hide in rounding
        torch.testing.assert_close(theirs(x), ours_logits, atol=1e-5, rtol=0)
    cfg = theirs.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["mean"] == DATA["mean"] and cfg["std"] == DATA["std"]
    assert cfg["label_names"] == DATA["classes"] and cfg["num_classes"] == 7
    # The note gives timm's parameter count, counted by timm.
    count = sum(p.numel() for p in theirs.parameters())
    assert f"timm: {count:,} parameters" in capsys.readouterr().err


def test_timm_merges_low_rank_maps_in_float64(tmp_path):
    model = tiny_checkpoint(tmp_path / "ckpt.pt", latent="qkvo", latent_dim=5, mlp_latent_dim=7)
    export_main(tmp_path / "ckpt.pt", tmp_path / "out", "--format", "timm")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        qkv, fc1 = f.get_tensor("blocks.1.attn.qkv.weight"), f.get_tensor("blocks.1.mlp.fc1.weight")
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    by_hand = [(p.up.weight.double() @ p.down.weight.double()).float() for p in (attn.to_q, attn.to_k, attn.to_v)]
    assert torch.equal(qkv, torch.cat(by_hand))
    assert torch.equal(fc1, (mlp.fc1.up.weight.double() @ mlp.fc1.down.weight.double()).float())


def test_model_card_says_how_the_model_was_trained(trained_run, exported):
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    card = (exported / "README.md").read_text()
    assert "arXiv 2501.06220" in card and f"{ckpt['last_acc']:.2f}%" in card and "digits" in card
    assert "`poorvit.safetensors`" in card and "`model.onnx`" in card and "no timm form" in card
    # Its command line parses back, through train.py's own parser, into the run's every flag.
    command = card.split("trained by: `")[1].split("`")[0]
    assert vars(train.get_args_parser().parse_args(shlex.split(command)[2:])) == ckpt["args"]


def test_multi_cls_has_no_timm_form(trained_run, tmp_path, capsys):
    line = one_line_error(capsys, trained_run, tmp_path / "out", "--format", "native,timm")
    assert "2 CLS tokens has no timm form" in line and "native and onnx keep it" in line
    assert not (tmp_path / "out").exists()


def test_onnx_without_its_packages(tmp_path, capsys, monkeypatch):
    tiny_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: find_spec None, import fails
    line = one_line_error(capsys, tmp_path / "ckpt.pt", tmp_path / "out", "--format", "onnx")
    assert "needs the package onnxscript" in line and not (tmp_path / "out").exists()
    # Unasked, it is skipped with a note and the rest is written.
    export_main(tmp_path / "ckpt.pt", tmp_path / "out")
    assert "skipped --format onnx" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "model.safetensors",
                                                     "poorvit.safetensors"]


def test_existing_files_are_kept_without_force(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine")
    line = one_line_error(capsys, tmp_path / "ckpt.pt", tmp_path / "out", "--format", "native")
    assert "README.md" in line and "--force" in line
    assert os.listdir(tmp_path / "out") == ["README.md"] and (tmp_path / "out" / "README.md").read_text() == "mine"
    export_main(tmp_path / "ckpt.pt", tmp_path / "out", "--format", "native", "--force")
    assert "PoorViT" in (tmp_path / "out" / "README.md").read_text()


def without_data(path):
    """A checkpoint written before train.py stored class names and normalisation."""
    tiny_checkpoint(path)
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "data"}, path)


def write_safetensors(path, metadata):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, path, metadata)


@pytest.mark.parametrize("name, content, message", [
    ("bad.pt", lambda path: path.write_bytes(b"\x00garbage" * 10), "not a readable checkpoint"),
    ("bad.pt", lambda path: torch.save({"weights": torch.zeros(2)}, path), "not a checkpoint written by train.py"),
    ("bad.pt", lambda path: torch.save({"model": {}, "config": {"dim": 32, "colour": 1}, "args": {}, "step": 0,
                                        "data": {}}, path),
     "not a model this code can build"),
    ("bad.pt", lambda path: without_data(path), "not a checkpoint written by train.py"),
    ("bad.safetensors", lambda path: path.write_bytes(b"\x00garbage" * 10), "not a readable safetensors file"),
    ("bad.safetensors", lambda path: write_safetensors(path, {"format": "pt"}), "not a model written by export.py"),
])
def test_a_damaged_or_foreign_source_is_a_one_line_error(tmp_path, capsys, name, content, message):
    content(tmp_path / name)
    line = one_line_error(capsys, tmp_path / name, tmp_path / "out")
    assert message in line and f"checkpoint {tmp_path / name}" in line, line
    assert not (tmp_path / "out").exists()


def test_bad_flags_and_outputs_are_one_line_errors(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pt")
    assert "--format: tflite" in one_line_error(capsys, tmp_path / "ckpt.pt", tmp_path / "out", "--format", "tflite")
    (tmp_path / "file").write_text("")
    assert "file is not a folder" in one_line_error(capsys, tmp_path / "ckpt.pt", tmp_path / "file")
    line = one_line_error(capsys, tmp_path / "ckpt.pt", tmp_path / "file" / "out", "--format", "native")
    assert "not a writable folder" in line


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_mode_the_umask_asks_for(tmp_path, umask):
    tiny_checkpoint(tmp_path / "ckpt.pt")
    old = os.umask(umask)
    try:
        export_main(tmp_path / "ckpt.pt", tmp_path / "out", "--format", "native,timm")
    finally:
        os.umask(old)
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["README.md", "config.json", "model.safetensors", "poorvit.safetensors"]  # no temporary file left
    for name in names:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_no_script_imports_the_export_packages_until_it_reads_or_writes_such_a_file():
    code = ("import sys, analyze, export, predict, train; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'safetensors', 'onnx', 'onnxscript', 'onnx_ir'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"
