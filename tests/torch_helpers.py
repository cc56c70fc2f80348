"""Shared by the PyTorch interop tests: seeded torchvision models with randomised BatchNorm,
a forward-hook MAC count, NHWC ↔ NCHW calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import nnx


def randomize_batchnorm(net, seed: int) -> None:
    """Running stats and affine parameters far from identity, so a wrong eps or a swapped
    mean/var mapping shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.05)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def torchvision_model(arch: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, **kwargs).eval()
    randomize_batchnorm(net, seed + 1)
    return net


def hook_macs(net, x) -> int:
    """MACs from PyTorch forward hooks: output size × kernel taps × in-channels-per-group for
    every Conv2d (padding taps included: the output size already covers them), in × out for
    every Linear."""
    total = []

    def conv_hook(m, inp, out):
        kh, kw = m.kernel_size
        total.append(out.numel() * kh * kw * (m.in_channels // m.groups))

    def linear_hook(m, inp, out):
        total.append(out.numel() * m.in_features)

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
             for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return sum(total)


def jitted(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: np.asarray(f(state, jnp.asarray(x)))


def torch_logits(net, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


def images(hw: int, batch: int = 1, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, hw, hw, channels)).astype(np.float32)


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |diff| ≤ 1e-4 × the logits' scale; returns the relative difference."""
    scale = float(np.abs(theirs).max())
    diff = float(np.abs(ours - theirs).max())
    assert ours.shape == theirs.shape
    assert diff <= 1e-4 * scale, (diff, scale)
    return diff / scale
