"""PoorViTs: a small pre-norm Vision Transformer with several CLS tokens (arXiv 2501.06220).

Baseline: patch 4 on 32x32 -> 64 tokens, width 192, depth 9, 12 heads, MLP ratio 2, stochastic depth 0 -> 0.1,
2.70 M parameters. Depth is ambiguous in the seed (docs/faithfulness.md): its build_model.py has depth=9 commented
out, so its models/vit.py default, 12 (3.59 M), applies; 9 is its parent commit's and its ancestor's, whose 93.58%
matches the paper's baseline. We default to 9; depth=12 is the other reading.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import pack, rearrange, unpack
from einops.layers.torch import Rearrange
from torch import nn
from torchvision.ops import StochasticDepth

from attention import Attention, check_shape, parse_latent, projection

CLS_POOLS = ("concat", "mean")
POS_EMBEDS = ("learned", "sincos")
# Config fields that older checkpoints hold, at the one value this code builds: read as absent.
RETIRED_FIELDS = {("patch_init", "pytorch"), ("shared_kv_latent", False)}


@dataclass
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 192
    depth: int = 9
    heads: int = 12
    mlp_ratio: float = 2.0
    num_cls: int = 1
    cls_pool: str = "concat"
    pos_embed: str = "learned"
    latent: str = ""
    latent_dim: int = 64
    mlp_latent_dim: int = 0
    drop_path: float = 0.1

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "heads", "num_cls",
                     "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide img_size={self.img_size}")
        for name, choices in (("cls_pool", CLS_POOLS), ("pos_embed", POS_EMBEDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(choices)}")
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"pos_embed='sincos' needs dim divisible by 4, got dim={self.dim}")
        check_shape(self.dim, self.heads, self.latent, self.latent_dim)
        if not 0 <= self.mlp_latent_dim <= min(self.dim, self.mlp_dim):
            raise ValueError(f"mlp_latent_dim={self.mlp_latent_dim} must be in 0..{min(self.dim, self.mlp_dim)} "
                             f"(0: full rank)")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path={self.drop_path} must be in [0, 1)")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The seed's fixed 2-D sin-cos positions (grid*grid patches row by row, dim): sin(row w), cos(row w), sin(col w),
    cos(col w), a quarter of dim each, at the frequencies w_i = temperature^(-i / (dim / 4)), i < dim / 4."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    row = rearrange(rows, "h w -> (h w) 1") * omega
    col = rearrange(cols, "h w -> (h w) 1") * omega
    return torch.cat((row.sin(), row.cos(), col.sin(), col.cos()), dim=1)


class FeedForward(nn.Module):
    """fc1 -> GELU -> fc2; with rank > 0 each layer is low-rank (down, no bias -> up)."""

    def __init__(self, dim: int, hidden_dim: int, rank: int = 0):
        super().__init__()
        self.fc1 = projection(dim, hidden_dim, rank)
        self.act = nn.GELU()
        self.fc2 = projection(hidden_dim, dim, rank)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; stochastic depth drops each residual branch per sample."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.latent, cfg.latent_dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = FeedForward(cfg.dim, cfg.mlp_dim, cfg.mlp_latent_dim)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def dense(self) -> dict:
        """{name: (weight, bias)} of q, k, v, o, fc1, fc2: the map each applies (a low-rank one as up @ down)."""
        return {**self.attn.dense(), "fc1": self.mlp.fc1.dense(), "fc2": self.mlp.fc2.dense()}

    def load_dense(self, dense: dict):
        """Takes the maps of `dense`, each by truncated SVD where it is low-rank."""
        self.attn.load_dense(dense)
        self.mlp.fc1.load_dense(*dense["fc1"])
        self.mlp.fc2.load_dense(*dense["fc2"])


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p),
            nn.Linear(cfg.in_chans * p * p, cfg.dim),
        )
        self.cls_tokens = nn.Parameter(torch.zeros(1, cfg.num_cls, cfg.dim))
        num_tokens = cfg.num_cls + cfg.num_patches
        if cfg.pos_embed == "learned":
            self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, cfg.dim))
        else:
            # CLS positions stay zero: a learned one would only duplicate the learnable CLS token itself.
            table = torch.zeros(1, num_tokens, cfg.dim)
            table[0, cfg.num_cls :] = sincos_2d(cfg.grid, cfg.dim)
            self.register_buffer("pos_embedding", table, persistent=False)
        drop_rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in drop_rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        head_dim = cfg.num_cls * cfg.dim if cfg.cls_pool == "concat" else cfg.dim
        self.head = nn.Linear(head_dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The seed's patch embedding is a Conv2d its init never touches: PyTorch's default, U(+-1/sqrt(3 p^2)).
        self.to_patch_embedding[1].reset_parameters()
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        if isinstance(self.pos_embedding, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embedding, std=0.02)

    def tokens(self, images):
        """The first block's input: CLS tokens then patch tokens, with positions, and the pack shapes."""
        patches = self.to_patch_embedding(images)
        # "1 k d -> b k d" as a view: einops.repeat on the Parameter would register a new einops backend inside the
        # first compiled call, and Dynamo would recompile the whole model at step 2 when its guard on that table fails.
        cls = self.cls_tokens.expand(patches.shape[0], -1, -1)
        x, ps = pack([cls, patches], "b * d")
        return x + self.pos_embedding, ps

    def cls_outputs(self, images):
        """The final-norm outputs of the k CLS tokens, (b, k, dim): what the head reads."""
        x, ps = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        cls, _ = unpack(self.norm(x), ps, "b * d")
        return cls

    def forward(self, images):
        cls = self.cls_outputs(images)
        pooled = rearrange(cls, "b k d -> b (k d)") if self.cfg.cls_pool == "concat" else cls.mean(dim=1)
        return self.head(pooled)

    @torch.no_grad()
    def whiten_patch_embedding(self, images, eps: float = 5e-4, chunk_bytes: int = 2**28):
        """Whitening init: the first C*p*p output channels of the patch embedding become the PCA-whitening filters
        eigvec_i / sqrt(lambda_i + eps) of the uncentred second moment of every stride-1 patch of the (normalised)
        `images`; the other channels keep their init. The patches of a chunk of images take at most `chunk_bytes`
        (at least one image). Returns the eigenvalues, largest first."""
        p = self.cfg.patch_size
        linear = self.to_patch_embedding[1]
        k = linear.in_features
        if k > self.cfg.dim:
            raise ValueError(f"whitening needs dim >= in_chans*patch_size**2 = {k}, got dim={self.cfg.dim}")
        moment = torch.zeros(k, k, dtype=torch.float64, device=images.device)
        count = 0
        # Each image has (side - p + 1)^2 patches of k float64s: 0.3 MB at 32 px and patch 4, 5 MB at 64 px and patch 8.
        per_image = (images.shape[-1] - p + 1) * (images.shape[-2] - p + 1) * k * 8
        for batch in images.split(max(1, chunk_bytes // per_image)):
            patches = rearrange(F.unfold(batch.double(), p), "b k l -> (b l) k")
            moment += patches.T @ patches
            count += len(patches)
        # eigh in float64 on the CPU: the same moment gives the same filters on every rank and device.
        eigvals, eigvecs = torch.linalg.eigh(moment.cpu() / count)
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        # An eigenvector's sign is arbitrary; fix it so that its largest entry is positive.
        signs = eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True)).sign()
        filters = (eigvecs * signs).T / (eigvals + eps).sqrt()[:, None]
        linear.weight[:k] = filters.to(linear.weight)
        return eigvals


# The config fields a model may change when it takes another model's weights (transfer_weights): its ranks, and
# what only matters for training from scratch.
TRANSFER_FREE_FIELDS = {"latent", "latent_dim", "mlp_latent_dim", "drop_path"}


@torch.no_grad()
def transfer_weights(source: ViT, target: ViT):
    """target takes source's weights: each projection as the best approximation target's rank allows (truncated
    SVD: up = U sqrt(S), down = sqrt(S) V^T), everything else copied. At full rank both compute the same."""
    differing = sorted(f for f in asdict(source.cfg) if f not in TRANSFER_FREE_FIELDS
                       and getattr(source.cfg, f) != getattr(target.cfg, f))
    if differing:
        raise ValueError("source and target differ in " + ", ".join(
            f"{f} ({getattr(source.cfg, f)!r} vs {getattr(target.cfg, f)!r})" for f in differing))
    # Configs equal but for the ranks: the parameters outside the blocks' attn and mlp have the same names and shapes.
    rest = {k: v for k, v in source.state_dict().items() if ".attn." not in k and ".mlp." not in k}
    target.load_state_dict(rest, strict=False)
    for source_block, target_block in zip(source.blocks, target.blocks):
        target_block.load_dense(source_block.dense())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_macs(cfg: ViTConfig) -> int:
    """Multiply-accumulates of one image's forward pass (matmuls only; norms, GELU and softmax are negligible)."""
    n = cfg.num_cls + cfg.num_patches  # tokens
    d = cfg.dim
    r = cfg.latent_dim
    letters = parse_latent(cfg.latent)

    def linear(in_features, out_features, rank):
        return n * (rank * (in_features + out_features) if rank else in_features * out_features)

    projections = sum(linear(d, d, r if letter in letters else 0) for letter in "qkvo")
    mlp = linear(d, cfg.mlp_dim, cfg.mlp_latent_dim) + linear(cfg.mlp_dim, d, cfg.mlp_latent_dim)
    per_block = projections + 2 * n * n * d + mlp
    head_in = cfg.num_cls * d if cfg.cls_pool == "concat" else d
    return cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * d + cfg.depth * per_block + head_in * cfg.num_classes
