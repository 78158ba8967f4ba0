import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
from model import ViT, ViTConfig


def parse(*argv):
    return predict.get_args_parser().parse_args([str(a) for a in argv])


def logged_eval(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "eval"][-1]


def test_evaluate_agrees_with_train_py_evaluation(trained_run):
    result = predict.main(parse("evaluate", trained_run, "--device", "cpu"))
    logged = logged_eval(trained_run)
    assert result["acc"] == logged["acc"] == json.loads((trained_run / "summary.json").read_text())["final_acc"]
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    # Per class: the confusion matrix counts every test image once, and its diagonal gives the accuracies.
    dataset = data.load_digits()
    confusion = result["confusion"]
    assert confusion.sum() == len(dataset.test_labels)
    assert torch.equal(confusion.sum(1), torch.bincount(dataset.test_labels, minlength=10))
    assert 100 * confusion.diag().sum().item() / confusion.sum().item() == pytest.approx(result["acc"])
    model, _ = predict.load(trained_run, "cpu")
    normalize = data.Normalize(dataset.mean, dataset.std)
    predicted = predict.logits_of(model, dataset.test_images, normalize, "cpu").argmax(1)
    for c in range(10):
        mine = dataset.test_labels == c
        assert result["per_class"][c] == pytest.approx(100 * (predicted[mine] == c).float().mean().item())


def write_png(path, image_chw):
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(path)


def test_predict_writes_the_top_k_labels_and_probabilities_of_each_image_as_csv(trained_run, tmp_path):
    dataset = data.load_digits()
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):  # 32x32 PNGs are lossless and need no resize: the same pixels as the test set
        write_png(folder / f"{i}.png", dataset.test_images[i])
    big = np.asarray(Image.fromarray(dataset.test_images[5].permute(1, 2, 0).numpy()).resize((70, 50)))
    Image.fromarray(big).save(folder / "sub" / "wide.jpg")
    (folder / "notes.txt").write_text("not an image")
    # The run's checkpoint with class names that are not their indices' text (digits' are "0".."9").
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    ckpt["data"]["classes"] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    torch.save(ckpt, tmp_path / "named.pt")
    out = tmp_path / "predictions.csv"
    probs, indices = predict.main(parse("predict", tmp_path / "named.pt", folder, "--top-k", "3", "--out", out,
                                        "--device", "cpu"))
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["file", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    files = [folder / f"{i}.png" for i in range(5)] + [folder / "sub" / "wide.jpg"]
    assert [r["file"] for r in rows] == [str(f) for f in files]
    # The reference: the pixels as written (the JPEG decoded and resized to 32x32 by PIL's bilinear filter),
    # normalised the textbook way with the run's statistics, through the checkpoint's model.
    model = ViT(ViTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    wide = np.asarray(Image.open(files[5]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    pixels = torch.cat([dataset.test_images[:5], torch.from_numpy(wide.copy()).permute(2, 0, 1)[None]])
    mean, std = (torch.tensor(ckpt["data"][key]).view(3, 1, 1) for key in ("mean", "std"))
    with torch.no_grad():
        expected = model.eval()((pixels / 255 - mean) / std).softmax(1).topk(3)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(probs, expected.values, atol=1e-6, rtol=1e-5)
    for row, top_probs, top_classes in zip(rows, expected.values.tolist(), expected.indices.tolist()):
        assert [row[f"label_{i}"] for i in (1, 2, 3)] == [ckpt["data"]["classes"][c] for c in top_classes]
        assert [float(row[f"prob_{i}"]) for i in (1, 2, 3)] == pytest.approx(top_probs, abs=1e-6)
    assert len({tuple(top) for top in expected.indices.tolist()}) > 1  # not one row repeated


@pytest.mark.parametrize("content, message", [
    (lambda path: path.write_bytes(b"\x00garbage" * 10), "not a readable checkpoint"),
    (lambda path: torch.save({"weights": torch.zeros(2)}, path), "not a checkpoint written by train.py"),
    (lambda path: torch.save({"model": {}, "config": {"dim": 32, "colour": 1}, "args": {}, "step": 0, "data": {}},
                             path),
     "not a model this code can build"),
])
def test_a_damaged_or_foreign_checkpoint_is_a_one_line_error(tmp_path, capsys, content, message):
    content(tmp_path / "bad.pt")
    for argv in (["evaluate", tmp_path / "bad.pt"], ["predict", tmp_path / "bad.pt", tmp_path]):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(parse(*argv, "--device", "cpu"))
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
        assert lines[0].startswith(f"predict.py: error: checkpoint {tmp_path / 'bad.pt'}")


def test_predict_refuses_a_folder_without_images(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict.main(parse("predict", trained_run, tmp_path, "--device", "cpu"))
    assert "no image files" in capsys.readouterr().err


def test_predict_takes_a_single_image_file_and_says_not_found_for_a_missing_path(trained_run, tmp_path, capsys):
    dataset = data.load_digits()
    for i in range(3):
        write_png(tmp_path / f"{i}.png", dataset.test_images[i])
    predict.main(parse("predict", trained_run, tmp_path, "--out", tmp_path / "all.csv", "--device", "cpu"))
    predict.main(parse("predict", trained_run, tmp_path / "1.png", "--out", tmp_path / "one.csv", "--device", "cpu"))
    (one,) = list(csv.DictReader((tmp_path / "one.csv").open()))
    assert one == list(csv.DictReader((tmp_path / "all.csv").open()))[1]  # the folder's row of the same file
    missing_run = f"predict.py: error: checkpoint {tmp_path / 'norun'}: not found"
    for argv, message in ((["predict", trained_run, tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: not found"),
                          (["predict", tmp_path / "norun", tmp_path], missing_run),
                          (["evaluate", tmp_path / "norun"], missing_run),
                          (["evaluate", tmp_path], f"checkpoint {tmp_path / 'checkpoint.pt'}: not found")):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(parse(*argv, "--device", "cpu"))
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_evaluate_calls_an_image_folders_held_out_images_val(trained_run, tmp_path, capsys):
    dataset = data.load_digits()
    for split in ("train", "val"):
        for c in range(10):  # the checkpoint's model has 10 classes
            (tmp_path / split / str(c)).mkdir(parents=True)
            write_png(tmp_path / split / str(c) / "0.png", dataset.test_images[c])
    predict.main(parse("evaluate", trained_run, "--dataset", "imagefolder", "--data-dir", tmp_path, "--device", "cpu"))
    assert capsys.readouterr().out.startswith("10 val images: accuracy")


def test_evaluate_and_predict_read_images_at_the_checkpoints_size(tmp_path):
    import train

    # A model of 16 px images (digits resized from 32), patch 8: 4 tokens.
    run = tmp_path / "run"
    flags = ["--dataset", "digits", "--img-size", "16", "--patch-size", "8", "--dim", "32", "--depth", "1",
             "--heads", "4", "--batch-size", "64", "--epochs", "1", "--warmup-epochs", "0", "--ra-reps", "1",
             "--device", "cpu", "--output-dir", str(run)]
    summary = train.main(train.get_args_parser().parse_args(flags))
    assert summary["config"]["img_size"] == 16
    result = predict.main(parse("evaluate", run, "--device", "cpu"))
    assert result["acc"] == summary["final_acc"]
    # Files of any size are read at the model's 16 px (PIL's bilinear resize, as here).
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    probs, indices = predict.main(parse("predict", run, folder, "--top-k", "2", "--out", tmp_path / "p.csv",
                                        "--device", "cpu"))
    resized = [np.asarray(Image.open(folder / f"{i}.png").resize((16, 16), Image.Resampling.BILINEAR))
               for i in range(3)]
    images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    model, ckpt = predict.load(run, "cpu")
    expected = predict.logits_of(model, images, data.Normalize(*(ckpt["data"][k] for k in ("mean", "std"))), "cpu")
    top = expected.softmax(1).topk(2)
    assert torch.equal(indices, top.indices) and torch.allclose(probs, top.values, atol=1e-6)
