import io

import pytest
import torch

from lion import Lion


def test_two_steps_match_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt.step()
    # m = 0: update = sign(0.1 * g) = [1, -1, 0]; p = p * (1 - 0.1 * 0.5) - 0.1 * update; m = 0.01 * g.
    torch.testing.assert_close(p.data, torch.tensor([0.95 - 0.1, -1.9 + 0.1, 0.475]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.003, -0.001, 0.0]))
    p.grad = torch.tensor([-0.001, 0.2, -0.5])
    opt.step()
    # beta1 * m + 0.1 * g = [0.0027 - 0.0001, -0.0009 + 0.02, -0.05] -> [1, 1, -1].
    torch.testing.assert_close(p.data, torch.tensor([0.85 * 0.95 - 0.1, -1.8 * 0.95 - 0.1, 0.475 * 0.95 + 0.1]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.99 * 0.003 - 1e-5, -0.00099 + 0.002, -0.005]))


def test_groups_keep_their_own_hyperparameters_over_several_steps():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    # a: the optimizer's lr and betas, its own weight decay; b: its own lr and betas, the optimizer's weight decay.
    opt = Lion([{"params": [a], "weight_decay": 0.1}, {"params": [b], "lr": 3e-3, "betas": (0.8, 0.95)}],
               lr=1e-2, weight_decay=0.5)
    hyper = {"a": (1e-2, 0.9, 0.99, 0.1), "b": (3e-3, 0.8, 0.95, 0.5)}
    expected = {"a": a.detach().clone(), "b": b.detach().clone()}
    moment = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    # Six steps of the recurrence written out; from the second on, the moment is not zero and both betas show.
    for _ in range(6):
        grads = {"a": torch.randn(4, 3), "b": torch.randn(5)}
        a.grad, b.grad = grads["a"].clone(), grads["b"].clone()
        opt.step()
        for name, param in (("a", a), ("b", b)):
            lr, beta1, beta2, weight_decay = hyper[name]
            g, m = grads[name], moment[name]
            update = torch.sign(beta1 * m + (1 - beta1) * g)
            expected[name] = expected[name] * (1 - lr * weight_decay) - lr * update
            moment[name] = beta2 * m + (1 - beta2) * g
            torch.testing.assert_close(param.detach(), expected[name])
            torch.testing.assert_close(opt.state[param]["exp_avg"], moment[name])


def test_lion_decreases_loss_of_least_squares():
    torch.manual_seed(0)
    x, w_true = torch.randn(64, 8), torch.randn(8, 1)
    y = x @ w_true
    w = torch.nn.Parameter(torch.zeros(8, 1))
    opt = Lion([w], lr=0.02)

    def loss_fn():
        return (x @ w - y).square().mean()

    start = loss_fn().item()
    for _ in range(200):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.01 * start


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = [torch.randn(8, 6) for _ in range(6)]

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = torch.nn.Linear(6, 3)
    resumed.load_state_dict(saved["model"])
    resumed_opt = Lion(resumed.parameters(), lr=1.0)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    train(resumed, resumed_opt, data[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_parameters_without_grad_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = Lion([a, b], lr=0.1, weight_decay=1.0)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.data, torch.ones(2)) and b not in opt.state


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr=0.0"),
        (dict(lr=-1e-4), "lr=-0.0001"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(-0.1, 0.99)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lion([torch.nn.Parameter(torch.zeros(1))], **kwargs)


class LionUnscaledByTheScaler(Lion):
    """Lion as it was before it took the scaler's tensors: GradScaler unscales, reads found_inf on the host, steps."""
    _step_supports_amp_scaling = False


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts values read back to the host (on a GPU, each one a sync)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__)
        return func(*args, **(kwargs or {}))


def fp16_run(optimizer_class, steps=4, overflow=None, unscale_first=False):
    """`steps` fp16 autocast steps under a GradScaler (with `unscale_first`, GradScaler.unscale_ is called before each
    step, as for gradient clipping); `overflow` (a float) is written into one gradient of the last step. The initial
    scale is not a power of 2, so that unscaling by a division would round differently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    opt = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=3000.0)
    before, reads = None, HostReads()
    for step in range(steps):
        x = torch.randn(8, 6)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step == steps - 1:
            before = copy_state(model, opt)
            if overflow is not None:
                model[2].weight.grad[1, 3] = overflow
        with reads:
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
        scaler.update()
    return before, copy_state(model, opt), scaler, reads.reads


def copy_state(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    return params + [opt.state[p]["exp_avg"].clone() for p in model.parameters()]


@pytest.mark.parametrize("unscale_first", [False, True])
def test_an_fp16_step_with_the_scalers_tensors_is_bit_identical_to_unscaling_first_and_reads_nothing(unscale_first):
    _, new, new_scaler, new_reads = fp16_run(Lion, unscale_first=unscale_first)
    _, old, old_scaler, old_reads = fp16_run(LionUnscaledByTheScaler, unscale_first=unscale_first)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    assert new_scaler.state_dict() == old_scaler.state_dict() and new_scaler.get_scale() == 3000.0
    # The old path reads found_inf once per step (GradScaler._maybe_opt_step); the new one never.
    assert (new_reads, old_reads) == (0, 4)


@pytest.mark.parametrize("overflow", [float("inf"), float("-inf"), float("nan")])
def test_an_overflowed_fp16_step_changes_neither_parameters_nor_moments(overflow):
    before, after, scaler, reads = fp16_run(Lion, overflow=overflow)
    assert any(not torch.equal(a, b) for a, b in zip(*fp16_run(Lion)[:2]))  # without the overflow the step moves
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and reads == 0
    assert scaler.get_scale() == 1500.0  # GradScaler saw the overflow too: it halved the scale
