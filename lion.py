"""Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675).

    update = sign(beta1 * m + (1 - beta1) * g)
    p      = p - lr * (update + weight_decay * p)
    m      = beta2 * m + (1 - beta2) * g

Every update entry is +-1, so the lr should be 3-10x smaller and the weight decay 3-10x larger than AdamW's.
"""
import torch
from torch.optim import Optimizer


def unscaled_or_skipped(grads, exp_avgs, decay, grad_scale, found_inf):
    """What a step under torch.amp.GradScaler (fp16) computes with, decided on the device without a host read.

    The gradients are unscaled as GradScaler.unscale_ does (times the scale's reciprocal taken in fp64, in place), so
    that a step without an overflow is bit-identical to unscaling first. Where found_inf > 0 (an overflow), each
    gradient is replaced by its moment, so that the moment stays as it is; the weight decay factor becomes 1 and
    the update's factor 0, so that the parameters stay as they are. Returns the gradients, the decay factor and the
    update's factor.
    """
    skip = found_inf > 0
    if grad_scale is not None:  # None: GradScaler.unscale_ already ran on these gradients
        torch._foreach_mul_(grads, grad_scale.double().reciprocal().float())
    # A selection, not arithmetic: an infinite or NaN gradient times 0 is still NaN. One small kernel per tensor.
    grads = [torch.where(skip, m, g) for m, g in zip(exp_avgs, grads)]
    return grads, torch.where(skip, 1.0, decay), torch.logical_not(skip).float()


class Lion(Optimizer):
    # GradScaler then hands step() the loss scale and the overflow flag as tensors (self.grad_scale, self.found_inf)
    # instead of unscaling and reading the flag on the host, which would sync every fp16 step: as fused AdamW.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"Lion lr={lr} must be positive")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lion betas={tuple(betas)} must be two numbers in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"Lion weight_decay={weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Under a GradScaler the gradients arrive scaled, and a
        step whose gradients overflowed changes neither the parameters nor the moments."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step for the length of this call only.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            grads = [p.grad for p in params]
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            beta1, beta2 = group["betas"]
            decay = 1 - group["lr"] * group["weight_decay"]
            if found_inf is not None:
                grads, decay, keep = unscaled_or_skipped(grads, exp_avgs, decay, grad_scale, found_inf)

            # The update, from the moment before this step's gradient joins it.
            torch._foreach_mul_(params, decay)
            updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
            torch._foreach_sign_(updates)
            if found_inf is not None:
                torch._foreach_mul_(updates, keep)
            torch._foreach_add_(params, updates, alpha=-group["lr"])

            # Then the moment.
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
        return loss
