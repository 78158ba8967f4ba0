"""Use a trained PoorViT: evaluate a checkpoint on a dataset's test split (what train.py's evaluation computes), or
write the top-k labels of an image file, or of every image file under a folder, as CSV. A run folder stands for its
checkpoint.pt.

    python predict.py evaluate runs/demo --device cpu              # the run's own dataset: accuracy, loss, per class
    python predict.py predict runs/demo my_images/ --top-k 3 --out predictions.csv   # or one image file
"""
import argparse
import contextlib
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import run


@contextlib.contextmanager
def user_errors(script: str):
    """Inside: bad input (a ValueError or FileNotFoundError) ends the script with one line, `script: error: ...`, and
    exit code 2, as every script of PoorViTs says it."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)


def checkpoint_path(path) -> Path:
    """A run folder's checkpoint.pt, an export.py folder's poorvit.safetensors, or the file itself."""
    path = Path(path)
    if path.is_dir():
        exported = path / "poorvit.safetensors"
        path = exported if exported.is_file() and not (path / "checkpoint.pt").exists() else path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: not found (give a run folder or its checkpoint file)")
    return path


def load(path, device):
    """(the checkpoint's model on `device`, in eval mode; the checkpoint) from a run folder or a checkpoint file."""
    model, ckpt = run.load_model(checkpoint_path(path), "checkpoint")
    return model.to(device).eval(), ckpt


def test_data(ckpt, dataset=None, data_dir=None) -> data.ImageData:
    """The dataset to evaluate on (by default the one the checkpoint's run trained on), at the model's image size."""
    name = dataset or ckpt["args"]["dataset"]
    images = data.load_dataset(name, data_dir or ckpt["args"]["data_dir"], ckpt["config"]["img_size"])
    if len(images.classes) != ckpt["config"]["num_classes"]:
        raise ValueError(f"--dataset {name} has {len(images.classes)} classes; the checkpoint's model has "
                         f"{ckpt['config']['num_classes']}")
    return images


@torch.no_grad()
def logits_of(model, images, normalize: data.Normalize, device):
    """float32 logits of uint8 images, normalised and chunked as train.py's evaluation does."""
    model.eval()
    chunks = images.split(data.EVAL_CHUNK)
    return torch.cat([model(normalize(x.to(device))).float().cpu() for x in chunks])


def scores(logits, labels, num_classes) -> dict:
    """Accuracy (%), mean cross-entropy, per-class accuracy (%) and the confusion matrix (rows: true class)."""
    predicted = logits.argmax(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = 100 * confusion.diag() / confusion.sum(1).clamp(min=1)
    return {"acc": 100 * (predicted == labels).sum().item() / len(labels),
            "loss": F.cross_entropy(logits, labels).item(), "per_class": per_class.tolist(), "confusion": confusion,
            "predicted": predicted}


def evaluate(model, dataset: data.ImageData, device) -> dict:
    logits = logits_of(model, dataset.test_images, data.Normalize(dataset.mean, dataset.std), device)
    return scores(logits, dataset.test_labels, len(dataset.classes))


def write_predictions(path, files, classes, probs, indices):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file"] + [col for i in range(1, probs.shape[1] + 1) for col in (f"label_{i}", f"prob_{i}")])
        for file, row_probs, row_indices in zip(files, probs.tolist(), indices.tolist()):
            writer.writerow([file] + [v for p, c in zip(row_probs, row_indices) for v in (classes[c], f"{p:.6f}")])


def add_source_arguments(parser, dataset=True):
    """The checkpoint and device flags (and which test split: dataset=True) that predict.py and analyze.py share."""
    parser.add_argument("checkpoint", type=str, help="a run folder (its checkpoint.pt) or a checkpoint file")
    parser.add_argument("--device", default=None, type=str,
                        help="cuda, cuda:N or cpu (unset: cuda on a CUDA build of torch, which must then start)")
    if dataset:
        parser.add_argument("--dataset", default=None, type=str, choices=data.DATASETS,
                            help="default: the dataset the checkpoint's run trained on")
        parser.add_argument("--data-dir", default=None, type=str, help="default: the run's --data-dir")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate a trained PoorViT, or predict labels for images.")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate_parser = commands.add_parser("evaluate", help="accuracy, loss and per-class accuracy on a test split")
    predict_parser = commands.add_parser("predict", help="top-k labels of an image, or of every image under a folder")
    add_source_arguments(evaluate_parser)
    add_source_arguments(predict_parser, dataset=False)
    predict_parser.add_argument("images", type=str, help="an image file, or a folder of them (searched recursively)")
    predict_parser.add_argument("--top-k", default=5, type=int, help="labels per image, most probable first")
    predict_parser.add_argument("--out", default="predictions.csv", type=str, help="the CSV file to write")
    return parser


def run_evaluate(args, model, ckpt, device):
    dataset = test_data(ckpt, args.dataset, args.data_dir)
    result = evaluate(model, dataset, device)
    print(f"{len(dataset.test_labels)} {dataset.test_split} images: accuracy {result['acc']:.2f}%, loss "
          f"{result['loss']:.4f}")
    print("| class | images | accuracy % |\n|---|---|---|")
    for name, count, acc in zip(dataset.classes, result["confusion"].sum(1).tolist(), result["per_class"]):
        print(f"| {name} | {count} | {acc:.2f} |")
    return result


def run_predict(args, model, ckpt, device):
    if args.top_k <= 0:
        raise ValueError(f"--top-k {args.top_k} must be positive")
    path = Path(args.images)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (an image file or a folder of them)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{args.images}: no image files ({', '.join(data.IMAGE_SUFFIXES)})")
    stats = ckpt["data"]
    images = torch.stack([data.read_image(p, ckpt["config"]["img_size"]) for p in files])
    logits = logits_of(model, images, data.Normalize(stats["mean"], stats["std"]), device)
    probs, indices = logits.softmax(1).topk(min(args.top_k, logits.shape[1]), dim=1)  # best first
    write_predictions(args.out, files, stats["classes"], probs, indices)
    print(f"{len(files)} images: top-{probs.shape[1]} labels written to {args.out}")
    return probs, indices


def main(args):
    with user_errors("predict.py"):
        device = run.device_of(args.device)
        model, ckpt = load(args.checkpoint, device)
        return (run_evaluate if args.command == "evaluate" else run_predict)(args, model, ckpt, device)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
