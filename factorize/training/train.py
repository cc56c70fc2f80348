"""Training loop: ``fit`` for any NNX classifier, ``train_and_evaluate`` driven by a config.

Steps are functional: the model is split once into (graphdef, trainable params, rest) and a
``jax.jit``-compiled function maps arrays to arrays, merging the graph only while tracing. This
avoids ``nnx.jit``'s per-call Python graph traversal, which on CPU costs as much as a small
model's step (see ``experiments/bench_train.py``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from factorize import data as data_lib
from factorize._io import append_jsonl, atomic_write_json
from factorize.models.spec import ModelSpec, build
from factorize.training import checkpoint as ckpt_lib
from factorize.training import parallel
from factorize.training.config import TrainConfig

Filter = Any  # an nnx filter: a Variable type, a predicate, ...


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (Nesterov momentum) or AdamW with a (warmup +) cosine or constant schedule.

    Weight decay is decoupled and applies to kernels only (ndim > 1), not to biases or
    BatchNorm scales.
    """
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    lr = config.learning_rate
    if config.schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif warmup > 0:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
    else:
        sched = optax.cosine_decay_schedule(lr, total)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    if config.optimizer == "adamw":
        return optax.adamw(sched, weight_decay=config.weight_decay, mask=decay_mask)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(sched, momentum=config.momentum, nesterov=True),
    )


def augment_batch(x: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after ``pad``-pixel zero padding, and random horizontal flip (per image)."""
    n, h, w, c = x.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
    dx = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    crop = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (h, w, c)))(xp, dy, dx)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def _loss(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    if smoothing:
        onehot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, onehot)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    wrt: Filter = nnx.Param,
    augment: bool = False,
    seed: int = 0,
    label_smoothing: float = 0.0,
) -> Callable:
    """The jitted step ``(params, rest, opt_state, x, y, step) -> (params, rest, opt_state,
    loss, accuracy)`` over a model split as ``nnx.split(model, wrt, ...)`` in train mode."""
    aug_key = jax.random.fold_in(jax.random.key(seed), 1)

    @jax.jit
    def train_step(params, rest, opt_state, x, y, step):
        if augment:
            x = augment_batch(x, jax.random.fold_in(aug_key, step))

        # ``rest`` is an argument (not a closure) and merged with copy=True, so the Variables
        # that BatchNorm updates belong to grad's trace.
        def loss_fn(params, rest):
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m(x)
            _, _, new_rest = nnx.split(m, wrt, ...)  # updated BatchNorm statistics
            return _loss(logits, y, label_smoothing).mean(), (logits, new_rest)

        (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return params, new_rest, opt_state, loss, acc

    return train_step


def _eval_fn(graphdef: nnx.GraphDef) -> Callable:
    @jax.jit
    def step(params, rest, x, y, mask):
        logits = nnx.merge(graphdef, params, rest)(x)
        loss = _loss(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(loss * mask), jnp.sum(correct * mask)

    return step


def _batches_padded(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Fixed-size batches (one compilation); the last is zero-padded and masked."""
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        n = len(xb)
        mask = np.zeros(batch_size, np.float32)
        mask[:n] = 1
        if n < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(batch_size - n, yb.dtype)])
        yield xb, yb, mask


def _round_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    n = mesh.devices.size
    return -(-batch_size // n) * n


def evaluate(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 500,
    mesh: jax.sharding.Mesh | None = None,
    _step: Callable | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``x``, ``y``."""
    mesh = mesh or parallel.make_mesh()
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = parallel.replicate((params, rest), mesh)
    step = _step or _eval_fn(graphdef)
    bs = _round_batch(min(batch_size, max(len(x), 1)), mesh)
    loss_sum, correct = 0.0, 0.0
    for xb, yb, mb in _batches_padded(x, y, bs):
        batch_loss, c = step(params, rest, *parallel.shard_batch((xb, yb, mb), mesh))
        loss_sum, correct = loss_sum + batch_loss, correct + c
    n = max(len(x), 1)
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}


def _fmt(k: str, v: Any) -> str:
    return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"


def fit(
    model: nnx.Module,
    dataset: data_lib.Dataset,
    config: TrainConfig,
    *,
    workdir: str | os.PathLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
    wrt: Filter = nnx.Param,
    eval_every: int = 1,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``dataset.x_train`` for ``config.epochs`` epochs.

    Works on any NNX classifier (``model(x) -> logits``), e.g. a converted model being
    fine-tuned. Only variables matching ``wrt`` are trained (default: all ``nnx.Param``); pass
    a narrower filter to freeze the rest. Evaluates on the test split every ``eval_every``
    epochs; each epoch's metrics are returned and, with ``workdir``, appended as one JSON line
    to ``workdir/metrics.jsonl``. Batches are sharded over ``mesh`` (default: all devices);
    the last incomplete training batch of an epoch is dropped (one compiled shape).
    """
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    n_train = len(dataset.x_train)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} exceeds the {n_train} training examples")
    augment = config.augment if config.augment is not None else dataset.name == "cifar10"
    tx = make_optimizer(config, steps_per_epoch)

    model.train()
    graphdef, params, rest = nnx.split(model, wrt, ...)
    opt_state = tx.init(params)
    params, rest, opt_state = parallel.replicate((params, rest, opt_state), mesh)
    train_step = make_train_step(
        graphdef, tx, wrt=wrt, augment=augment, seed=config.seed,
        label_smoothing=config.label_smoothing,
    )  # fmt: skip

    eval_step = None
    metrics_path = None
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        metrics_path = Path(workdir) / "metrics.jsonl"

    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
        losses, accs = [], []
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            unit="step",
        )
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            xb, yb = parallel.shard_batch((dataset.x_train[idx], dataset.y_train[idx]), mesh)
            params, rest, opt_state, loss, acc = train_step(
                params, rest, opt_state, xb, yb, jnp.int32(step)
            )
            losses.append(loss)
            accs.append(acc)
            step += 1
            bar.update()
        train_loss = float(jnp.mean(jnp.stack(losses)))
        train_time = time.perf_counter() - t0
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "train_accuracy": float(jnp.mean(jnp.stack(accs))),
            "epoch_time_s": round(train_time, 3),
            "images_per_s": round(steps_per_epoch * config.batch_size / train_time, 1),
        }
        bar.set_postfix(loss=f"{train_loss:.4f}")
        bar.close()
        if len(dataset.x_test) and (epoch % eval_every == 0 or epoch == config.epochs):
            nnx.update(model, params, rest)
            model.eval()
            if eval_step is None:  # compile once, reuse every epoch
                eval_step = _eval_fn(nnx.split(model, nnx.Param, ...)[0])
            res = evaluate(
                model,
                dataset.x_test,
                dataset.y_test,
                batch_size=config.eval_batch_size,
                mesh=mesh,
                _step=eval_step,
            )
            row.update(test_loss=res["loss"], test_accuracy=res["accuracy"])
        history.append(row)
        if metrics_path is not None:
            append_jsonl(metrics_path, row)  # append-only: one complete line per epoch
        if config.progress:
            tqdm.write(" ".join(_fmt(k, v) for k, v in row.items()))
    nnx.update(model, params, rest)
    model.eval()
    return history


def train_and_evaluate(
    config: TrainConfig, workdir: str | os.PathLike
) -> tuple[nnx.Module, list[dict[str, Any]]]:
    """Load data, build (or restore) the model, :func:`fit` it, save ``workdir/checkpoint``.

    ``workdir`` receives ``config.json``, ``metrics.jsonl`` and the final checkpoint (orbax
    state + architecture spec, restorable with :func:`factorize.training.checkpoint.restore`).
    It must not already hold a checkpoint: runs never overwrite earlier results.
    """
    workdir = Path(workdir)
    ckpt_path = workdir / "checkpoint"
    if ckpt_path.exists() or (workdir / "metrics.jsonl").exists():
        raise FileExistsError(f"{workdir} already holds a training run; choose a new directory")
    ds = data_lib.load(config.dataset, data_dir=config.data_dir, verify=config.verify_data)
    if config.n_train is not None or config.n_test is not None:
        ds = ds.subset(config.n_train, config.n_test)

    if config.init_checkpoint:
        init = Path(config.init_checkpoint).absolute()
        if init == ckpt_path.absolute():
            raise ValueError("init_checkpoint and the output checkpoint must differ")
        model = ckpt_lib.restore(init)
        spec = ckpt_lib.read_meta(init)["spec"]
    else:
        conv = None if config.family is None else {"family": config.family, "rank": config.rank}
        spec = ModelSpec(
            config.model, ds.num_classes, ds.in_channels, dict(config.model_kwargs), conv
        )
        model = build(spec, rngs=nnx.Rngs(config.seed))
    if spec.in_channels != ds.in_channels or spec.num_classes != ds.num_classes:
        raise ValueError(
            f"model expects {spec.in_channels} channels / {spec.num_classes} classes, dataset "
            f"{ds.name} has {ds.in_channels} / {ds.num_classes}"
        )

    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(workdir / "config.json", dataclasses.asdict(config))
    history = fit(model, ds, config, workdir=workdir)
    final = history[-1] if history else {}
    ckpt_lib.save(
        ckpt_path,
        model,
        spec,
        metadata={
            "dataset": ds.name,
            "image_shape": list(ds.image_shape),
            "config": dataclasses.asdict(config),
            "test_accuracy": final.get("test_accuracy"),
        },
    )
    return model, history
