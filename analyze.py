"""What a trained PoorViT holds (arXiv 2501.06220's "redundancy among ViTs", measured): singular-value spectra and
effective ranks of every block's q, k, v, o, fc1, fc2 (a low-rank layer as up @ down), accuracy after post-hoc rank
truncation of each family, CLS attention, per-class accuracy (docs/analysis.md).

    python analyze.py runs/demo --device cpu           # -> runs/demo/analysis/report.md and PNGs
"""
import argparse
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
import predict
import run
from attention import svd_factors
from model import ViT, transfer_weights
from report import save

MATRICES = ("q", "k", "v", "o", "fc1", "fc2")
FAMILIES = {"q": ("q",), "k": ("k",), "v": ("v",), "qk": ("q", "k"), "kv": ("k", "v"), "qkv": ("q", "k", "v"),
            "o": ("o",), "mlp": ("fc1", "fc2")}
ENERGIES = (0.90, 0.95, 0.99)
PLOTS = ("spectra", "truncation", "cls_attention", "confusion")  # the figures written, each <name>.png


def full_rank_copy(model: ViT) -> ViT:
    """The same function as a model whose every projection is one full matrix (a low-rank one: up @ down)."""
    dense = ViT(replace(model.cfg, latent="", mlp_latent_dim=0))
    transfer_weights(model, dense)
    return dense.to(next(model.parameters()).device).eval()


@torch.no_grad()
def spectra(model: ViT) -> dict:
    """{(block, matrix): singular values, largest first} for q, k, v, o, fc1, fc2 of every block."""
    return {(i, name): torch.linalg.svdvals(weight.detach().double().cpu())
            for i, block in enumerate(model.blocks) for name, (weight, _) in block.dense().items()}


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the sum of all squares."""
    cumulative = singular_values.square().cumsum(0)
    return int((cumulative < energy * cumulative[-1]).sum()) + 1


def low_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of `weight` (the weight itself at or above full rank)."""
    return weight if rank >= min(weight.shape) else torch.matmul(*svd_factors(weight, rank))


@contextmanager
def truncated(model: ViT, names, rank: int):
    """Inside: every block's matrices `names` (of q, k, v, o, fc1, fc2) replaced by their best rank-`rank`
    approximations, biases kept; restored on exit."""
    originals = [{name: (w.detach().clone(), b.detach().clone()) for name, (w, b) in block.dense().items()}
                 for block in model.blocks]
    for block, original in zip(model.blocks, originals):
        block.load_dense({**original, **{n: (low_rank(original[n][0], rank), original[n][1]) for n in names}})
    try:
        yield model
    finally:
        for block, original in zip(model.blocks, originals):
            block.load_dense(original)


def truncation_ranks(width: int, steps: int, smallest: int = 4) -> list[int]:
    """About `steps` ranks from `smallest` to `width`, evenly spaced on a log scale, `width` included."""
    if width <= smallest or steps < 2:
        return [width]
    return sorted({round(smallest * (width / smallest) ** (i / (steps - 1))) for i in range(steps)})


def accuracy(model, images, labels, normalize, device) -> float:
    logits = predict.logits_of(model, images, normalize, device)
    return predict.scores(logits, labels, model.cfg.num_classes)["acc"]


def truncation_curves(model, images, labels, normalize, device, ranks, full_acc, progress) -> dict:
    """{family: [test accuracy % at each rank]}; at full width the model is untruncated: `full_acc`."""
    curves = {}
    for family, names in FAMILIES.items():
        curves[family] = []
        for rank in ranks:
            if rank >= model.cfg.dim:
                curves[family].append(full_acc)
            else:
                with truncated(model, names, rank):
                    curves[family].append(accuracy(model, images, labels, normalize, device))
            progress.update()
    return curves


@torch.no_grad()
def cls_attention(model: ViT, images) -> torch.Tensor:
    """The last block's attention of each CLS token over all tokens, mean over heads: (b, k, tokens), rows sum
    to 1. Tokens are the k CLS tokens, then the patches row by row."""
    x, _ = model.tokens(images)
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1]
    return last.attn.attention_probs(last.norm1(x)).mean(1)[:, : model.cfg.num_cls]


def plot_spectra(spectrum, depth, out: Path):
    """One panel per matrix family, a curve per block."""
    fig, axes = plt.subplots(2, 3, figsize=(9, 5.2))
    shades = plt.cm.viridis(torch.linspace(0, 0.9, depth).tolist())
    for ax, name in zip(axes.flat, MATRICES):
        for i in range(depth):
            s = spectrum[i, name]
            ax.semilogy(range(1, len(s) + 1), s / s[0], color=shades[i], label=f"block {i}")
        ax.set(title=name, xlabel="index", ylabel="σ / σ_max")
    axes[0, 0].legend(fontsize=7)
    save(fig, out / "spectra.png")


def plot_truncation(curves, ranks, full_acc, chance, out: Path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for family, accs in curves.items():
        ax.plot(ranks, accs, marker="o", markersize=3, label=family, linestyle="--" if len(family) > 1 else "-")
    ax.axhline(full_acc, color="black", linewidth=0.8, label="no truncation")
    # The axis spans the curves; chance level is drawn only where a curve comes near it.
    low = min(min(accs) for accs in curves.values())
    if low < chance + 10:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=0.8, label="chance")
        low = min(low, chance)
    ax.set_ylim(low - 2, max(full_acc, *map(max, curves.values())) + 1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank kept in every block", ylabel="test accuracy %", title="post-hoc rank truncation")
    ax.legend(fontsize=7, ncol=2)
    save(fig, out / "truncation.png")


def plot_cls_attention(maps, images, captions, grid, out: Path):
    """One row per image: the image, then each CLS token's attention over the patches drawn on it."""
    n, k = maps.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(2.2 * (k + 1), 2.2 * n), squeeze=False)
    for row, (image, image_maps) in enumerate(zip(images, maps)):
        picture = rearrange(image, "c h w -> h w c").numpy()
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(captions[row], fontsize=7)
        for j, probs in enumerate(image_maps):
            patches = rearrange(probs[k:], "(h w) -> h w", h=grid)
            ax = axes[row, j + 1]
            ax.imshow(picture.mean(-1), cmap="gray")
            ax.imshow(patches.numpy(), cmap="inferno", alpha=0.6, extent=(-0.5, picture.shape[1] - 0.5,
                                                                          picture.shape[0] - 0.5, -0.5))
            ax.set_title(f"CLS {j}: {probs[k:].sum():.0%} on patches", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    save(fig, out / "cls_attention.png")


def plot_confusion(confusion, classes, out: Path):
    """The confusion matrix as a heat map (rows: the true class), named by class where there are at most 20."""
    size = max(3.5, 0.45 * len(classes) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(confusion.numpy(), cmap="Blues", vmin=0)
    if len(classes) <= 20:
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(title="confusion matrix (test set)", xlabel="predicted", ylabel="true")
    save(fig, out / "confusion.png")


def analyse(model, dataset, device, args) -> SimpleNamespace:
    """Every number the report and plots show, with a progress bar, by name: `result` (predict.evaluate on the
    whole test set: accuracy, loss, per-class accuracy, confusion matrix); `spectrum` ({(block, matrix): singular
    values}); `effective` ({(block, matrix): {energy: effective rank}}); `width` (the widest projection's side: the
    truncation curves' full rank); `ranks` (the ranks of the truncation curves); `curves` ({family: [test accuracy %
    at each rank]}); `subset_acc` (untruncated accuracy on the images of the curves) and `subset` (how many test
    images they use); `shown` (the images shown with their CLS attention: the first test image of each class),
    `shown_index` (their places in the test set), `shown_labels`; `maps` (their CLS attention, (images, k,
    tokens))."""
    dense = full_rank_copy(model)
    normalize = data.Normalize(dataset.mean, dataset.std)
    count = args.images or len(dataset.test_labels)
    images = dataset.test_images[:count]
    labels = dataset.test_labels[:count]
    width = dense.cfg.dim  # q's side: no projection is wider
    ranks = truncation_ranks(width, args.rank_steps, args.min_rank)
    with tqdm(total=3 + len(FAMILIES) * len(ranks), desc="analyze", dynamic_ncols=True) as progress:
        result = predict.evaluate(model, dataset, device)
        progress.update()
        spectrum = spectra(dense)
        effective = {key: {e: effective_rank(s, e) for e in ENERGIES} for key, s in spectrum.items()}
        progress.update()
        labels_in_order = dataset.test_labels.tolist()
        shown_index = torch.tensor([labels_in_order.index(c) for c in sorted(set(labels_in_order))][: args.cls_images])
        shown = dataset.test_images[shown_index]
        maps = cls_attention(dense, normalize(shown.to(device))).cpu()
        progress.update()
        subset_acc = accuracy(dense, images, labels, normalize, device)
        curves = truncation_curves(dense, images, labels, normalize, device, ranks, subset_acc, progress)
    return SimpleNamespace(result=result, spectrum=spectrum, effective=effective, width=width, ranks=ranks,
                           curves=curves, subset_acc=subset_acc, subset=len(labels), maps=maps, shown=shown,
                           shown_index=shown_index, shown_labels=dataset.test_labels[shown_index])


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def report(path, cfg, dataset_name, classes, analysis) -> str:
    depth = cfg.depth
    result = analysis.result
    effective = analysis.effective
    effective_rows = [[i] + [" / ".join(str(effective[i, n][e]) for e in ENERGIES) for n in MATRICES]
                      for i in range(depth)]
    curve_rows = [[family] + [f"{acc:.2f}" for acc in accs] for family, accs in analysis.curves.items()]
    k = cfg.num_cls
    on_patches = analysis.maps[:, :, k:].sum(-1).mean(0).tolist()
    per_class = zip(classes, result["confusion"].sum(1).tolist(), result["per_class"])
    sections = [
        f"# Analysis of {path}\n\nModel: {cfg}. Test set: {dataset_name}, {len(result['confusion'].sum(1))} "
        f"classes, {result['confusion'].sum().item()} images: accuracy {result['acc']:.2f}%, loss "
        f"{result['loss']:.4f}.",
        f"## Effective rank\n\nThe fewest singular values holding 90 / 95 / 99% of each matrix's squared-singular-"
        f"value energy (full width {analysis.width}); a low-rank layer is measured as up @ down.\n\n"
        + markdown_table(["block", *MATRICES], effective_rows),
        f"## Post-hoc rank truncation\n\nTest accuracy % on {analysis.subset} test images ({analysis.subset_acc:.2f}% "
        f"untruncated) when every matrix of the family, in every block, is replaced by its best rank-r approximation "
        f"(truncated SVD, biases kept, no retraining).\n\n"
        + markdown_table(["family", *map(str, analysis.ranks)], curve_rows),
        f"## CLS tokens\n\nLast block, mean over heads, on {len(analysis.maps)} test images (one per class): the "
        f"share of each CLS token's attention on the patches (the rest is on the CLS tokens): "
        + ", ".join(f"CLS {j} {share:.0%}" for j, share in enumerate(on_patches)) + ".",
        "## Per-class accuracy\n\n" + markdown_table(["class", "images", "accuracy %"],
                                                     [[c, n, f"{acc:.2f}"] for c, n, acc in per_class]),
        "## Plots\n\n" + "\n".join(f"![{name}]({name}.png)" for name in PLOTS),
    ]
    return "\n\n".join(sections) + "\n"


def write_plots(analysis, cfg, classes, out: Path):
    plot_spectra(analysis.spectrum, cfg.depth, out)
    plot_truncation(analysis.curves, analysis.ranks, analysis.subset_acc, 100 / len(classes), out)
    predicted = analysis.result["predicted"][analysis.shown_index].tolist()
    labels = analysis.shown_labels.tolist()
    captions = [f"label {classes[t]}, predicted {classes[p]}" for t, p in zip(labels, predicted)]
    plot_cls_attention(analysis.maps, analysis.shown, captions, cfg.grid, out)
    plot_confusion(analysis.result["confusion"], classes, out)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Spectra, rank truncation and CLS attention of a trained PoorViT.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    predict.add_source_arguments(parser)
    add = parser.add_argument
    add("--out", help="output folder (unset: <run folder>/analysis)")
    add("--images", default=0, type=int, help="test images for the truncation curves (0: all)")
    add("--min-rank", default=4, type=int, help="smallest rank of the truncation curves")
    add("--rank-steps", default=10, type=int, help="ranks per truncation curve, --min-rank to full width, log scale")
    add("--cls-images", default=4, type=int, help="test images in cls_attention.png, each of another class")
    return parser


def main(args):
    with predict.user_errors("analyze.py"):
        if args.images < 0 or min(args.min_rank, args.rank_steps, args.cls_images) <= 0:
            raise ValueError("--images must be >= 0; --min-rank, --rank-steps and --cls-images positive")
        device = run.device_of(args.device)
        path = predict.checkpoint_path(args.checkpoint)
        model, ckpt = predict.load(path, device)
        dataset = predict.test_data(ckpt, args.dataset, args.data_dir)
    out = Path(args.out) if args.out else path.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(model, dataset, device, args)
    dataset_name = args.dataset or ckpt["args"]["dataset"]
    (out / "report.md").write_text(report(path, model.cfg, dataset_name, dataset.classes, analysis))
    write_plots(analysis, model.cfg, dataset.classes, out)
    print(f"analysis written to {out}", file=sys.stderr)
    return analysis


if __name__ == "__main__":
    main(get_args_parser().parse_args())
