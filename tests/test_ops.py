"""The fast conv paths equal lax.conv_general_dilated (forward and gradients) for every stage
type the families use; MAC counting is unaffected by which implementation runs."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import factorize
from factorize import ops
from factorize._checks import normalize_padding

# (name, input channels, kernel shape HWIO, groups): every stage kind of every family.
STAGES = [
    ("depthwise 3x3", 6, (3, 3, 1, 6), 6),
    ("depthwise 3x3 multiplier 2", 4, (3, 3, 1, 8), 4),
    ("depthwise 3x1", 6, (3, 1, 1, 6), 6),
    ("depthwise 1x3", 6, (1, 3, 1, 6), 6),
    ("grouped r->1 (bsconv)", 8, (3, 3, 2, 4), 4),
    ("pointwise", 6, (1, 1, 6, 5), 1),
    ("dense 3x3", 4, (3, 3, 4, 5), 1),
    ("dense 3x1", 4, (3, 1, 4, 5), 1),
]
# (strides, padding, dilation): every stride pattern, padding kind and dilation, few compiles.
GEOMETRIES = [
    ((1, 1), "SAME", (1, 1)),
    ((2, 2), "VALID", (1, 1)),
    ((2, 1), ((0, 2), (1, 0)), (1, 1)),
    ((1, 3), "SAME", (1, 1)),
    ((2, 1), "SAME", (2, 2)),
    ((1, 2), ((3, 0), (0, 2)), (2, 1)),
]


def _run(impl, x, k, groups, strides, pads, dilation):
    with ops.implementation(impl):
        return ops.conv(x, k, groups=groups, strides=strides, padding=pads, dilation=dilation)


def _outputs(conv, x, k, geometry):
    """Forward output and gradients w.r.t. input and kernel of a random linear loss, for
    ``conv(x, k, strides, pads, dilation)``."""
    strides, pads, dilation = geometry
    y = conv(x, k, strides, pads, dilation)
    # a fixed non-constant cotangent; jax.random inside the program would dominate compile time
    ct = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)

    def loss(x, k):
        return jnp.vdot(conv(x, k, strides, pads, dilation), ct)

    return (y, *jax.grad(loss, argnums=(0, 1))(x, k))


def _check_equal(conv, reference, x, k, geometries):
    """``conv`` equals ``reference`` (output, d/dx, d/dkernel) in all ``(strides, padding,
    dilation)`` geometries, compiled as one jitted program (one compile: the test suite's time
    is compile time)."""
    normalized = [(s, normalize_padding(p, x.shape[1:3], k.shape[:2], s, d), d)
                  for s, p, d in geometries]

    @jax.jit
    def both(x, k):
        return [(_outputs(conv, x, k, g), _outputs(reference, x, k, g)) for g in normalized]

    for geometry, (got, ref) in zip(geometries, both(x, k), strict=True):
        for name, a, b in zip(("output", "d/dx", "d/dkernel"), got, ref, strict=True):
            assert a.shape == b.shape, (geometry, name)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{geometry} {name}")


def _lax_grouped(groups):
    """The reference: ``lax.conv_general_dilated`` with ``groups`` feature groups."""
    def conv(x, k, strides, pads, dilation):
        return ops.lax_conv(x, k, groups, strides, pads, dilation)
    return conv


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s[0])
def test_fast_equals_lax(stage):
    _, cin, kshape, groups = stage
    # Dense stages run XLA's conv on both sides: one geometry checks the dispatch.
    geometries = GEOMETRIES if ops.fast_kind(cin, kshape, groups) != "lax" else GEOMETRIES[2:3]
    x = jax.random.normal(jax.random.key(0), (2, 11, 10, cin))
    k = jax.random.normal(jax.random.key(1), kshape)

    def fast(x, k, strides, pads, dilation):
        return _run("fast", x, k, groups, strides, pads, dilation)

    _check_equal(fast, _lax_grouped(groups), x, k, geometries)


def _jaxpr_primitives(jaxpr) -> set[str]:
    """Primitive names in ``jaxpr`` and every jaxpr nested in it (custom_vjp, loops, pjit)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr → Jaxpr
                if hasattr(inner, "eqns"):
                    names |= _jaxpr_primitives(inner)
    return names


def _primitives(fn, *args) -> set[str]:
    """Primitives of ``fn`` and of its gradient (w.r.t. all arguments), nested ones included."""
    def grads(*args):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=range(len(args)))(*args)

    return (_jaxpr_primitives(jax.make_jaxpr(fn)(*args).jaxpr)
            | _jaxpr_primitives(jax.make_jaxpr(grads)(*args).jaxpr))


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s[0])
def test_fast_path_is_taken(stage):
    _, cin, kshape, groups = stage
    x, k = jnp.ones((1, 6, 6, cin)), jnp.ones(kshape)
    pads = ((1, 1), (1, 1))
    prims = _primitives(lambda x, k: _run("fast", x, k, groups, (1, 1), pads, (1, 1)), x, k)
    expect_lax = groups == 1 and kshape[:2] != (1, 1)  # dense convs stay XLA's
    assert ("conv_general_dilated" in prims) == expect_lax
    def reference(x, k):
        return _run("lax", x, k, groups, (1, 1), pads, (1, 1))

    # the reference's forward pass is exactly one conv; with its gradient, convs and no matmul
    assert _jaxpr_primitives(jax.make_jaxpr(reference)(x, k).jaxpr) == {"conv_general_dilated"}
    ref = _primitives(reference, x, k)
    assert "conv_general_dilated" in ref and "dot_general" not in ref


def test_auto_is_fast_on_cpu_and_names_are_checked():
    assert jax.default_backend() != "cpu" or ops.current_implementation() == "fast"
    with ops.implementation("lax"):
        assert ops.current_implementation() == "lax"
        with ops.reference_implementation():
            assert ops.current_implementation() == "lax"
    assert set(ops.IMPLEMENTATIONS) == {"auto", "lax", "fast"}
    with pytest.raises(ValueError, match="implementation must be one of"):
        with ops.implementation("cudnn"):
            pass


def test_switching_implementation_retraces_an_already_traced_function():
    """The implementation is read at trace time; JAX must not serve a trace (or a compiled
    executable) made under the other one. With a plain context variable this test failed:
    the same ``jax.jit(f)`` / ``f`` ran the fast path inside ``implementation("lax")`` and
    ``count_macs`` counted the fast path's (conv-free) trace."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))

    def f(x, k):
        return ops.conv(x, k, groups=4, padding=((1, 1), (1, 1)))

    jf = jax.jit(f)
    with ops.implementation("fast"):
        fast_out, fast_prims = jf(x, k), _primitives(f, x, k)
    with ops.implementation("lax"):
        lax_out, lax_prims = jf(x, k), _primitives(f, x, k)
        assert "convolution" in jf.lower(x, k).as_text()
    assert "conv_general_dilated" not in fast_prims and "conv_general_dilated" in lax_prims
    np.testing.assert_allclose(fast_out, lax_out, rtol=1e-5, atol=1e-5)
    with ops.implementation("fast"):
        assert "convolution" not in jf.lower(x, k).as_text()
        # count_macs traces under "lax" a function already traced under "fast"
        assert factorize.count_macs(f, x, k) == 2 * 8 * 8 * 9 * 4


def _channel_major_case(op):
    """(lax-order x, lax-order kernel, groups, fast fn on lax-order arrays) for one of the
    channel-major ops, whose channel orders are the transposes of lax's."""
    from factorize.chain import transpose_channels

    if op == "multiplier_major":  # depthwise, 4 inputs × multiplier 2; output c·m+t → t·C+c
        cin, kshape, groups = 4, (3, 3, 1, 8), 4

        def fast(x, k, s, p, d):
            y = ops.depthwise_multiplier_major(x, transpose_channels(k, 3, 4, 2), s, p, d)
            return transpose_channels(y, 3, 2, 4)  # back to lax's order
    else:  # grouped, 4 groups × 2 inputs, one output each; input g·I+i → i·G+g
        cin, kshape, groups = 8, (3, 3, 2, 4), 4

        def fast(x, k, s, p, d):
            return ops.grouped_inputs_major(transpose_channels(x, 3, 4, 2), k, s, p, d)

    x = jax.random.normal(jax.random.key(0), (2, 11, 10, cin))
    k = jax.random.normal(jax.random.key(1), kshape)
    return x, k, groups, fast


@pytest.mark.parametrize("op", ["multiplier_major", "inputs_major"])
def test_channel_major_ops_equal_lax(op):
    """The ops ``run_chain`` feeds through permuted 1×1 kernels equal lax's grouped conv up to
    that channel permutation, forward and both gradients, in every geometry."""
    x, k, groups, fast = _channel_major_case(op)
    _check_equal(fast, _lax_grouped(groups), x, k, GEOMETRIES)


def _equations(jaxpr):
    """All equations of a jaxpr, nested ones (custom_vjp, jit, loops) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_dsc_with_multiplier_runs_multiplier_major():
    """dsc rank 2 under the fast path never builds the repeated (B, H, W, 2C) activations that
    lax's channel order needs: only the tiny kernels are permuted."""
    f = factorize.random_factorized(jax.random.key(0), (3, 3, 4, 6), "dsc", 2)
    x = jnp.ones((2, 5, 5, 4))
    with ops.implementation("fast"):
        eqns = list(_equations(jax.make_jaxpr(lambda f, x: f(x))(f, x).jaxpr))
    names = {e.primitive.name for e in eqns}
    assert "custom_vjp_call" in names or "custom_vjp_call_jaxpr" in names
    for e in eqns:  # jnp.repeat is a broadcast (or gather) of the activations
        if e.primitive.name in ("gather", "broadcast_in_dim"):
            assert e.outvars[0].aval.shape[:3] != (2, 5, 5), e


def test_channel_major_layouts_are_chosen_for_bsconv_and_dsc_only():
    """Which stages ``run_chain`` runs channel-major, per family (a performance path: the
    equality tests pass without it, so its selection is pinned here)."""
    from factorize.chain import _channel_major_layouts

    expected = {("bsconv", 2): {1: "inputs_major"}, ("dsc", 2): {0: "multiplier_major"}}
    for family, rank in [*FAMILY_RANKS, ("bsconv", 1), ("dsc", 1)]:
        f = factorize.random_factorized(jax.random.key(0), (3, 3, 4, 6), family, rank)
        got = _channel_major_layouts(f.stages, f.factors)[1]
        assert got == expected.get((family, rank), {}), (family, rank)


FAMILY_RANKS = [
    ("dsc", 2), ("bsconv", 2), ("spatial", 3), ("lowrank_in", 3), ("lowrank_out", 3),
    ("tucker2", (3, 4)), ("cp3", 5), ("cp4", 5), ("full", "full"),
]


CHAIN_GEOMETRIES = [dict(strides=(2, 1), padding="SAME"),
                    dict(strides=1, padding="VALID", dilation=(1, 2))]


def _check_chain_against_lax(f, x, geom, grad_atol=1e-4):
    """``f(x, **geom)`` and its gradients w.r.t. factors and input (loss ``Σ sin(f(x))``), jitted
    under the fast implementation, equal the same under lax."""

    def out_and_grad(f, x):
        return f(x, **geom), jax.grad(lambda f, x: jnp.sum(jnp.sin(f(x, **geom))), (0, 1))(f, x)

    res = {}
    for impl in ("lax", "fast"):
        with ops.implementation(impl):
            res[impl] = jax.jit(out_and_grad)(f, x)
    (out, grads), (ref_out, ref_grads) = res["fast"], res["lax"]
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=grad_atol)


@pytest.mark.parametrize("geom", CHAIN_GEOMETRIES, ids=["stride21-same", "dilation12-valid"])
@pytest.mark.parametrize("family,rank", FAMILY_RANKS, ids=lambda v: str(v))
def test_chain_equal_and_macs_under_both_implementations(family, rank, geom):
    """Includes cp4, whose kh×1 and 1×kw depthwise stages the fast path runs merged."""
    shape = (3, 3, 4, 6)
    f = factorize.random_factorized(jax.random.key(0), shape, family, rank)
    x = jax.random.normal(jax.random.key(1), (2, 9, 7, 4))
    _check_chain_against_lax(f, x, geom)
    for impl in ("lax", "fast"):
        with ops.implementation(impl):
            macs = factorize.count_macs(lambda f, x: f(x, **geom), f, x)
        assert macs == x.shape[0] * f.macs((9, 7), **geom)


@pytest.mark.parametrize("chunked", ["inference", "training"])
@pytest.mark.parametrize("family,rank", [("dsc", 2), ("cp3", 5), ("bsconv", 2), ("cp4", 5)])
def test_chunked_chain_equals_lax(family, rank, chunked, monkeypatch):
    """The chain over batch chunks (forced for every chain, one image per chunk) — its
    undifferentiated forward pass (and then the training forward pass that keeps the stage
    inputs), or its backward pass from the kept stage inputs — gives lax's output and
    gradients."""
    from factorize import chain

    monkeypatch.setattr(chain, f"_chunk_{chunked}", lambda *args: True)
    monkeypatch.setattr(chain, "_CHUNK_BYTES", 1)
    f = factorize.random_factorized(jax.random.key(0), (3, 3, 4, 6), family, rank)
    x = jax.random.normal(jax.random.key(1), (3, 9, 7, 4))
    geom = dict(strides=(2, 1), padding="SAME")

    def apply(f, x):
        return f(x, **geom)

    with ops.implementation("fast"):  # the chunk loop (a fori_loop) runs where it should
        inference = str(jax.make_jaxpr(apply)(f, x))
        forward_rule = str(jax.make_jaxpr(lambda f, x: jax.vjp(apply, f, x)[0])(f, x))
        pullback = jax.vjp(apply, f, x)[1]
        backward_rule = str(jax.make_jaxpr(pullback)(jnp.ones_like(apply(f, x))))

    def loops(jaxpr):
        return jaxpr.count("while") + jaxpr.count("scan")

    # (dsc, depthwise-first, also chunks its inference when training chunking is forced)
    assert (loops(inference) > 0) == (chunked == "inference" or family == "dsc")
    # a chunked backward pass keeps a whole forward pass; otherwise the forward is chunked
    assert (loops(forward_rule) > 0) == (chunked == "inference")
    assert (loops(backward_rule) > 0) == (chunked == "training")
    _check_chain_against_lax(f, x, geom, grad_atol=1e-5)


def test_chunking_is_chosen_as_measured(monkeypatch):
    """Which chains run over batch chunks (performance paths, pinned here). Inference:
    depthwise-first chains, and chains whose intermediates are ≥ 2× the input and ≥ 24 MiB.
    Training: chains not starting with a depthwise stage whose intermediates are ≥ 2× the
    input and ≥ 16 MiB. Never a chain with a dense stage, never under lax."""
    from factorize import chain

    chosen = []
    real = chain._in_batch_chunks
    monkeypatch.setattr(chain, "_in_batch_chunks",
                        lambda fns, x, factors, inf, train: chosen.append((inf, train))
                        or real(fns, x, factors, inf, train))

    def chunking(family, rank, channels, hw, impl="fast"):
        chosen.clear()
        f = factorize.random_factorized(jax.random.key(0), (3, 3, channels, channels), family,
                                        rank)
        x = jax.ShapeDtypeStruct((32, hw, hw, channels), jnp.float32)  # traced, never run
        with ops.implementation(impl):
            jax.make_jaxpr(lambda f, x: f(x))(f, x)
        return chosen[0] if chosen else (False, False)

    assert chunking("dsc", 1, 256, 32) == chunking("dsc", 1, 64, 16) == (True, False)
    assert chunking("cp3", 283, 256, 32) == chunking("cp4", 140, 128, 32) == (True, True)
    assert chunking("bsconv", 2, 128, 32) == (True, True)
    assert chunking("cp3", 141, 256, 32) == (False, False)  # intermediates 1.1× the input
    assert chunking("cp3", 67, 64, 32) == (False, True)  # 2.1× and 17.6 MB
    assert chunking("cp4", 140, 128, 16) == (False, False)  # 2.2× but 9.2 MB
    assert chunking("tucker2", (128, 128), 256, 32) == (False, False)
    assert chunking("dsc", 1, 256, 32, impl="lax") == (False, False)


def test_layer_grad_under_jit_matches_lax():
    layer = factorize.FactorizedConv(4, 6, (3, 3), family="cp3", rank=5, strides=2,
                                     rngs=__import__("flax").nnx.Rngs(0))
    value, bias = layer.to_factorized(), layer.bias[...]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))

    def loss(v, x):
        return jnp.sum(jnp.tanh(v(x, 2) + bias))

    with ops.implementation("fast"):
        fast = jax.jit(jax.grad(loss, argnums=(0, 1)))(value, x)
    with ops.implementation("lax"):
        ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(value, x)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_import_changes_no_global_state():
    code = (
        "import os, jax; before = os.environ.get('XLA_FLAGS'); "
        "import factorize, factorize.ops; "
        "assert os.environ.get('XLA_FLAGS') == before, os.environ.get('XLA_FLAGS'); "
        "assert not jax.config.jax_enable_x64; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("groups,padding,strides,dilation", [
    (6, "SAME", (2, 2), (1, 1)), (6, "VALID", (1, 2), (2, 1)), (1, ((1, 0), (2, 1)), (1, 1), (1, 1)),
    (3, "SAME", (1, 1), (1, 1)),
])
def test_conv_general_dilated_drop_in(groups, padding, strides, dilation):
    """The ``nnx.Conv(conv_general_dilated=...)`` hook equals lax, gradients included."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 6))
    k = jax.random.normal(jax.random.key(1), (3, 3, 6 // groups, 12))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def run(fn, x, k):
        return fn(x, k, strides, padding, None, dilation, dn, groups)

    def loss(fn):
        return lambda x, k: jnp.sum(run(fn, x, k) ** 2)

    got = jax.jit(lambda x, k: run(ops.conv_general_dilated, x, k))(x, k)
    np.testing.assert_allclose(got, run(lax.conv_general_dilated, x, k), rtol=1e-5, atol=1e-5)
    g_got = jax.grad(loss(ops.conv_general_dilated), (0, 1))(x, k)
    g_ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, k)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # input dilation is not covered by the fast path: handed to lax unchanged
    pads = ((1, 1), (1, 1))
    got = ops.conv_general_dilated(x, k, (1, 1), pads, (2, 1), None, dn, groups)
    ref = lax.conv_general_dilated(x, k, (1, 1), pads, (2, 1), None, dn, groups)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_mobilenet_depthwise_takes_the_fast_path():
    from flax import nnx

    from factorize.models import make_model

    m = make_model("mobilenet", num_classes=10, in_channels=3, alpha=0.25, rngs=nnx.Rngs(0))
    m.eval()
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    jaxpr = str(jax.make_jaxpr(lambda x: m(x))(x))
    assert "feature_group_count=8" not in jaxpr  # the first block's depthwise (8 channels)
    with ops.implementation("lax"):
        ref = jax.jit(lambda x: m(x))(x)  # jitted: op by op, this model took 30 s
        assert "feature_group_count=8" in str(jax.make_jaxpr(lambda x: m(x))(x))
    np.testing.assert_allclose(jax.jit(lambda x: m(x))(x), ref, rtol=1e-5, atol=1e-5)
