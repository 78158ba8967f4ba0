"""Export a trained PoorViT (arXiv 2501.06220) for use outside this repo (docs/export.md): the same weights as
safetensors with their config (native), a timm VisionTransformer folder in the Hugging Face Hub layout (timm), an ONNX
file (onnx), and a model card, README.md. SOURCE is what predict.py takes: a run folder, a checkpoint, an export.

    python export.py runs/demo exported/                     # every format the model can take
    python export.py runs/demo exported/ --format onnx --force
"""
import argparse
import copy
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import torch

import files
import predict
import run
import train
from model import ViT, count_parameters

FORMATS = ("native", "timm", "onnx")
PACKAGES = {"native": ("safetensors",), "timm": ("safetensors",), "onnx": ("onnx", "onnxscript")}
FILES = {"native": ("poorvit.safetensors",), "timm": ("model.safetensors", "config.json"), "onnx": ("model.onnx",)}
# What of a checkpoint the native file keeps besides weights, config and data (the optimizer state it drops).
PROVENANCE = ("step", "last_acc", "best_acc", "best_epoch", "train_seconds", "args", "run")
# timm's registered ViT whose every size model_args overrides: the name picks the VisionTransformer class only.
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"


def format_list(text):
    names = list(dict.fromkeys(text.split(",")))
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: choose from {','.join(FORMATS)} (comma-separated)")
    return names


def why_not(fmt, model: ViT):
    """Why `fmt` cannot hold this model, in words (None: it can)."""
    missing = [name for name in PACKAGES[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs the package {' and '.join(missing)} (pip install -r requirements.txt)"
    if fmt == "timm" and model.cfg.num_cls > 1:
        return (f"a model with {model.cfg.num_cls} CLS tokens has no timm form (timm's head reads one token); "
                f"native and onnx keep it")
    return None


def safetensors_bytes(tensors, metadata):
    """A .safetensors file's bytes; "format": "pt" in the metadata, which transformers' loaders require."""
    from safetensors.torch import save

    return save({name: t.contiguous() for name, t in tensors.items()}, {"format": "pt", **metadata})


def native_metadata(ckpt) -> dict:
    """What run.read_export reads back: config, classes, mean, std and the run's provenance, each as JSON."""
    provenance = {key: ckpt[key] for key in PROVENANCE if key in ckpt}
    fields = {"config": ckpt["config"], **ckpt["data"], "provenance": provenance}
    return {key: json.dumps(value) for key, value in fields.items()}


@torch.no_grad()
def timm_weights(model: ViT) -> dict:
    """The state dict of timm's VisionTransformer computing what `model` computes: the patch Linear as a Conv2d, q, k
    and v stacked into qkv, every low-rank map merged into one matrix (up @ down in float64, rounded once)."""
    cfg = model.cfg
    model = copy.deepcopy(model).double()
    # The norms and the head already carry timm's names.
    state = model.state_dict()
    weights = {name: t for name, t in state.items() if name.startswith(("norm.", "head.")) or ".norm" in name}
    patch = model.to_patch_embedding[1]
    # (c p1 p2) is the order of Conv2d's (in_chans, p, p) weight, as "b c (h p1) (w p2) -> b (h w) (c p1 p2)" reads it.
    weights["patch_embed.proj.weight"] = patch.weight.reshape(cfg.dim, cfg.in_chans, cfg.patch_size, cfg.patch_size)
    weights["patch_embed.proj.bias"] = patch.bias
    weights["cls_token"] = model.cls_tokens
    weights["pos_embed"] = model.pos_embedding  # a sin-cos table becomes a learnable parameter there
    for i, block in enumerate(model.blocks):
        dense = block.dense()
        # timm splits qkv as "b n (three h d)": q, k, v stacked, each with our head order.
        weights[f"blocks.{i}.attn.qkv.weight"] = torch.cat([dense[letter][0] for letter in "qkv"])
        weights[f"blocks.{i}.attn.qkv.bias"] = torch.cat([dense[letter][1] for letter in "qkv"])
        for ours, theirs in (("o", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            weights[f"blocks.{i}.{theirs}.weight"], weights[f"blocks.{i}.{theirs}.bias"] = dense[ours]
    return {name: t.float() for name, t in weights.items()}


def timm_config(model: ViT, data) -> dict:
    """config.json as timm's save_for_hf writes it: model_args rebuild our shape (without them the weights do not
    load); pretrained_cfg says how to preprocess (without it timm assumes 224 px and ImageNet's mean and std)."""
    cfg = model.cfg
    model_args = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
                  "num_classes": cfg.num_classes, "embed_dim": cfg.dim, "depth": cfg.depth, "num_heads": cfg.heads,
                  "mlp_ratio": cfg.mlp_ratio, "qkv_bias": True, "class_token": True, "global_pool": "token",
                  "no_embed_class": False, "pre_norm": False}
    pretrained_cfg = {"input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "fixed_input_size": True,
                      "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "mean": data["mean"],
                      "std": data["std"], "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj",
                      "classifier": "head"}
    return {"architecture": TIMM_ARCHITECTURE, "num_classes": cfg.num_classes, "num_features": cfg.dim,
            "global_pool": "token", "label_names": data["classes"], "model_args": model_args,
            "pretrained_cfg": pretrained_cfg}


def onnx_bytes(model: ViT, data) -> bytes:
    """One ONNX file: input "images" (N, C, H, W) normalised, N dynamic; output "logits"; classes, mean and std as
    JSON in its metadata. torch.export traces the einops patterns as plain reshapes."""
    example = torch.zeros(2, model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
    program = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False,
                                input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.model.metadata_props.update({key: json.dumps(value) for key, value in data.items()})
    return program.model_proto.SerializeToString()


def train_command(args) -> str:
    """The train.py command line of a run's flags: those that differ from train.py's defaults."""
    defaults = vars(train.get_args_parser().parse_args([]))
    words = ["python", "train.py"]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value == defaults.get(name, object()):
            continue
        if isinstance(value, bool):
            words.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def model_card(model: ViT, ckpt, outputs, timm_params, refused) -> str:
    """OUT/README.md: what the model is, how it was trained, how well it does, and how to load each file."""
    data = ckpt["data"]
    dataset = ckpt["args"]["dataset"]
    acc = "not evaluated" if ckpt.get("last_acc") is None else f"{ckpt['last_acc']:.2f}%"
    mean, std = ([round(v, 4) for v in data[key]] for key in ("mean", "std"))
    lines = [f"# PoorViT: a {count_parameters(model):,}-parameter Vision Transformer for {dataset}", "",
             "Trained from scratch with PoorViTs, a reference implementation of \"Powerful Design of Small Vision "
             "Transformer on CIFAR10\" (Gent Wu, 2025, arXiv 2501.06220).", "",
             f"- test accuracy on {dataset}: {acc} (its last evaluation; the weights of step {ckpt['step']})",
             f"- classes: {', '.join(map(str, data['classes']))}",
             f"- input: RGB {model.cfg.img_size} px square, (x / 255 - mean) / std, mean {mean}, std {std}",
             f"- model: {json.dumps(ckpt['config'])}",
             f"- trained by: `{train_command(ckpt['args'])}`",
             f"- code: PoorViTs {ckpt.get('run', {}).get('git_commit')}", "", "| file | load with |", "|---|---|"]
    if "poorvit.safetensors" in outputs:
        lines.append("| `poorvit.safetensors` | PoorViTs: `python predict.py predict poorvit.safetensors images/`, "
                     "`train.py --init-from`; elsewhere `safetensors.torch.load_file` (config in its metadata) |")
    if "model.safetensors" in outputs:
        lines.append(f"| `config.json`, `model.safetensors` | `timm.create_model('local-dir:FOLDER', pretrained=True)` "
                     f"({timm_params:,} parameters: low-rank parts merged, sin-cos positions learnable there) |")
    if "model.onnx" in outputs:
        lines.append("| `model.onnx` | `onnxruntime.InferenceSession('model.onnx').run(['logits'], {'images': x})`, "
                     "x float32 (N, 3, H, W) normalised |")
    lines += [f"| not exported | {line} |" for line in refused]
    return "\n".join(lines + ["", "Each file and what it keeps: docs/export.md of PoorViTs.", ""])


def get_args_parser():
    parser = run.Parser(prog="export.py", description="Export a trained PoorViT: safetensors, timm folder, ONNX.")
    parser.add_argument("source", help="a run folder (its checkpoint.pt), a checkpoint, or an exported folder or file")
    parser.add_argument("out", help="the folder to write into (created if missing)")
    parser.add_argument("--format", type=format_list, help=f"comma-separated, of {','.join(FORMATS)} (unset: every "
                        f"format the model can take, with a note for each it cannot)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist in OUT")
    return parser


def main(args):
    with predict.user_errors("export.py"):
        # The source, read as predict.py reads it.
        model, ckpt = predict.load(args.source, "cpu")

        # The formats asked for; unset, those the model can take.
        reasons = {fmt: why_not(fmt, model) for fmt in args.format or FORMATS}
        refused = [f"--format {fmt}: {why}" for fmt, why in reasons.items() if why]
        if args.format and refused:
            raise ValueError(refused[0])
        for line in refused:
            print(f"export.py: note: skipped {line}", file=sys.stderr)
        formats = [fmt for fmt, why in reasons.items() if why is None]

        # OUT: a folder (or none yet), none of whose files is overwritten without --force.
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is not a folder")
        names = [name for fmt in formats for name in FILES[fmt]] + ["README.md"]
        existing = [name for name in names if (out / name).exists()]
        if existing and not args.force:
            raise ValueError(f"{out} already holds {', '.join(existing)}: pass --force to overwrite, or choose "
                             f"another folder")

        # Every file made in memory first: a failure writes nothing.
        outputs = {}
        timm_params = None
        if "native" in formats:
            outputs["poorvit.safetensors"] = safetensors_bytes(ckpt["model"], native_metadata(ckpt))
        if "timm" in formats:
            weights = timm_weights(model)
            timm_params = sum(t.numel() for t in weights.values())
            outputs["model.safetensors"] = safetensors_bytes(weights, {})
            outputs["config.json"] = (json.dumps(timm_config(model, ckpt["data"]), indent=2) + "\n").encode()
        if "onnx" in formats:
            outputs["model.onnx"] = onnx_bytes(model, ckpt["data"])
        outputs["README.md"] = model_card(model, ckpt, outputs, timm_params, refused).encode()

        # The folder, once there is something to write into it.
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{out} is not a writable folder ({e.strerror or e})") from None

    # Each file under a temporary name, then renamed: whole or absent, with the user's umask.
    for name, payload in outputs.items():
        files.atomic_write(out / name, payload)
        print(out / name)
    if timm_params is not None:
        print(f"export.py: note: timm: {timm_params:,} parameters in timm's form (low-rank parts merged, in float64), "
              f"{count_parameters(model):,} here", file=sys.stderr)
    return outputs


if __name__ == "__main__":
    main(get_args_parser().parse_args())
