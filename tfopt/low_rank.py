"""Low-rank factorization: SVD-split Dense and Conv2D kernels into two thinner layers.

A Dense kernel ``W`` (``m x n``) is split with its singular value
decomposition ``W = U diag(s) V^T`` into ``A = U_r diag(sqrt(s_r))``
(``m x r``) and ``B = diag(sqrt(s_r)) V_r^T`` (``r x n``): the layer becomes
``Dense(r, use_bias=False)`` (named ``<name>_u``) followed by ``Dense(n)``
(named ``<name>_v``), which keeps the bias and the activation. ``A B`` is the
best rank-``r`` approximation of ``W`` in the Frobenius norm (Eckart-Young);
splitting ``sqrt(s)`` evenly keeps both factors at the same scale, which helps
the fine-tuning.

A Conv2D kernel ``K`` (``kh x kw x c_in x c_out``) is factorized as the
matrix ``K.reshape(kh * kw * c_in, c_out)``: a ``kh x kw`` convolution with
``r`` filters, the original strides, padding and dilation, and no bias, then
a 1x1 convolution with ``c_out`` filters, the bias and the activation. At
full rank both are exactly the original layer.

The rank of each layer is the smallest ``r`` that keeps the fraction
`energy` of the kernel's squared Frobenius norm::

    r = min { r : (s_1^2 + ... + s_r^2) / (s_1^2 + ... + s_p^2) >= energy }

(the relative reconstruction error is then ``sqrt(1 - kept energy)``), or a
fixed `rank` for every layer (capped at ``p = min(m, n)``). A layer is left
as it is when the factors would not hold fewer parameters:
``r * (m + n) >= m * n``.
"""

import math

import keras
import numpy as np
from keras import ops

from tfopt import _graph
from tfopt import _model_utils as mu

__all__ = ["low_rank_factorize", "LowRankReport", "choose_rank"]

L = keras.layers


def choose_rank(singular_values, rank=None, energy=0.9):
    """The rank that keeps `energy` of the spectrum, or `rank` capped at its length.

    ``r = min { r : sum_{i<=r} s_i^2 / sum_i s_i^2 >= energy }``.

    Args:
        singular_values: 1-D array, descending (as `numpy.linalg.svd` returns them).
        rank: a fixed rank (>= 1), or None to choose it from `energy`.
        energy: fraction in (0, 1] of the squared singular values to keep.

    Returns:
        ``(r, kept)``: the rank and the fraction of energy it keeps.

    Example:
        >>> tfopt.low_rank.choose_rank([3.0, 1.0], energy=0.9)
        (1, 0.9)
    """
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    cumulative = np.cumsum(s2)
    total = cumulative[-1]
    kept = cumulative / total if total > 0 else np.ones_like(cumulative)
    if rank is not None:
        r = min(int(rank), s2.size)
    else:
        r = int(np.searchsorted(kept, energy, side="left")) + 1
        r = min(r, s2.size)
    return r, float(kept[r - 1])


def _check_args(rank, energy):
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise TypeError(
                "`rank` must be None (choose each layer's rank from `energy`) or a positive integer. "
                f"Received: rank={rank!r}"
            )
        if rank < 1:
            raise ValueError(
                f"`rank` must be >= 1 (the inner dimension of the two factors), or None to choose it from "
                f"`energy`. Received: rank={rank}"
            )
    if isinstance(energy, bool) or not isinstance(energy, (int, float, np.floating, np.integer)):
        raise TypeError(f"`energy` must be a float in (0, 1]. Received: energy={energy!r}")
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(
            "`energy` must be in (0, 1]: the fraction of each kernel's squared singular values (its squared "
            f"Frobenius norm) the factors keep, e.g. 0.9. Received: energy={energy!r}"
        )


def _unsupported_reason(layer):
    """Why `layer` cannot be factorized here, or None if it can."""
    if type(layer) not in (L.Dense, L.Conv2D):
        return f"only Dense and Conv2D are factorized, not {type(layer).__name__} (nor subclasses, whose call may differ)"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled on it (merge or disable LoRA first)"
    if getattr(layer, "quantization_mode", None):
        return f"it is quantized by Keras ({layer.quantization_mode!r})"
    if isinstance(layer, L.Conv2D) and layer.groups != 1:
        return f"it is a grouped convolution (groups={layer.groups})"
    if not layer.built:
        return "it is not built"
    return None


def _matrix(layer):
    w = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float64)
    return w.reshape(-1, w.shape[-1]), w.shape


def _factor_layers(layer, r, a, b):
    """Two new built layers computing `layer` with kernel ``a @ b``; bias and activation go to the second."""
    config = layer.get_config()
    kernel = layer.kernel
    dtype = kernel.dtype
    first = dict(config, name=f"{layer.name}_u", use_bias=False, activation="linear", activity_regularizer=None)
    second = dict(config, name=f"{layer.name}_v")
    if isinstance(layer, L.Dense):
        first["units"] = r
        u, v = L.Dense.from_config(first), L.Dense.from_config(second)
        u.build((None, a.shape[0]))
        v.build((None, r))
        u.set_weights([a.astype(dtype)])
        kh = None
    else:
        kh, kw, c_in, c_out = kernel.shape
        first["filters"] = r
        second.update(kernel_size=(1, 1), strides=(1, 1), padding="valid", dilation_rate=(1, 1))
        u, v = L.Conv2D.from_config(first), L.Conv2D.from_config(second)
        last = layer.data_format == "channels_last"
        u.build((None, None, None, c_in) if last else (None, c_in, None, None))
        v.build((None, None, None, r) if last else (None, r, None, None))
        u.set_weights([a.reshape(kh, kw, c_in, r).astype(dtype)])
        b = b.reshape(1, 1, r, c_out)
    rest = [ops.convert_to_numpy(w) for w in layer.weights if w is not kernel]
    v.set_weights([b.astype(dtype), *rest])
    return u, v


class LowRankReport:
    """What `low_rank_factorize` did to each Dense / Conv2D layer.

    Attributes:
        rows: list of dicts with keys name, type, kernel_shape, max_rank, rank
            (None when not factorized for a reason other than size), energy
            (kept fraction of the squared singular values at `rank`),
            params_before, params_after (kernel + bias), factorized (bool),
            reason (why a layer was left as it is, else None).
        params_before, params_after: totals over the factorized layers.
        ratio: params_before / params_after over the factorized layers
            (1.0 when none was factorized).
        model_params_before, model_params_after: parameter counts of the
            whole models.
    """

    def __init__(self, rows, model_params_before, model_params_after):
        self.rows = rows
        done = [r for r in rows if r["factorized"]]
        self.params_before = sum(r["params_before"] for r in done)
        self.params_after = sum(r["params_after"] for r in done)
        self.ratio = self.params_before / self.params_after if self.params_after else 1.0
        self.model_params_before = model_params_before
        self.model_params_after = model_params_after

    def to_dict(self):
        return {
            "layers": [dict(r) for r in self.rows],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }

    def __str__(self):
        header = ("layer", "type", "kernel", "rank", "energy", "params before", "params after", "result")
        lines = []
        for r in self.rows:
            rank = "-" if r["rank"] is None else f"{r['rank']}/{r['max_rank']}"
            energy = "-" if r["energy"] is None else f"{r['energy']:.3f}"
            result = "factorized" if r["factorized"] else f"kept: {r['reason']}"
            shape = "x".join(str(d) for d in r["kernel_shape"])
            lines.append((r["name"], r["type"], shape, rank, energy, f"{r['params_before']:,}", f"{r['params_after']:,}", result))
        total = ("factorized layers", "", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.ratio:.2f}x fewer")
        model = ("whole model", "", "", "", "", f"{self.model_params_before:,}", f"{self.model_params_after:,}", "")
        widths = [max(len(str(x[i])) for x in [header, total, model] + lines) for i in range(len(header))]

        def fmt(cells):
            return "  ".join(
                str(c).rjust(w) if 3 <= i <= 6 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([fmt(header), rule] + [fmt(l) for l in lines] + [rule, fmt(total), fmt(model)])

    __repr__ = __str__


def _tfopt_layers(model):
    return [l for l in _graph.sublayers(model) if type(l).__module__.startswith("tfopt.")]


def low_rank_factorize(model, rank=None, energy=0.9, filters=None):
    """Returns a copy of `model` with Dense and Conv2D kernels split into two low-rank layers.

    Each Dense layer becomes ``Dense(r, use_bias=False)`` then ``Dense(n)``
    and each Conv2D a ``kh x kw`` convolution with `r` filters then a 1x1
    convolution, initialized from the kernel's SVD (see the module
    docstring); the second layer keeps the bias and activation. The rank
    comes from `energy` per layer, or is `rank` for all; a layer whose
    factors would not hold fewer parameters is left as it is. The result is
    a plain Keras model: fine-tune it (factorizing costs accuracy), then
    prune, cluster, quantize or export it like any other. The model you pass
    is never modified.

    Args:
        model: a built Sequential or Functional model (nested models too).
        rank: a fixed rank for every factorized layer (capped at the kernel's
            rank), or None (default) to choose it from `energy`. Takes
            precedence over `energy`.
        energy: fraction in (0, 1] of each kernel's squared singular values
            the factors keep (default 0.9).
        filters: which layers to factorize: None (every Dense and Conv2D), a
            regex on layer names, a list of regexes, or a callable
            ``fn(layer) -> bool``. A selected layer that cannot be factorized
            is an error; with None it is left as it is and listed in the
            report with the reason.

    Returns:
        ``(factorized_model, report)``: the new model and a `LowRankReport`
        (``print(report)`` shows the ranks and parameter counts,
        ``report.to_dict()`` gives plain data).

    Raises:
        TypeError: `model` is not a model, `rank` / `energy` / `filters` have
            the wrong type.
        ValueError: `rank < 1`, `energy` outside (0, 1], a subclassed or
            unbuilt model, a model holding tfopt pruning / clustering / QAT
            layers (factorize first, or strip them), selected layers that
            cannot be factorized (all are listed), or `filters` that select
            no Dense / Conv2D layer.

    Example:
        >>> small, report = tfopt.low_rank_factorize(model, energy=0.9)
        >>> print(report)
        >>> small.compile("adam", "sparse_categorical_crossentropy"); small.fit(x, y, epochs=2)
    """
    _check_args(rank, energy)
    mu.check_model(model, "model", "low_rank_factorize")
    wrapped = _tfopt_layers(model)
    if wrapped:
        raise ValueError(
            f"Model {model.name!r} holds tfopt layers ({', '.join(mu.describe(l) for l in wrapped[:4])}"
            f"{', ...' if len(wrapped) > 4 else ''}): factorize the float model first, then prune, cluster or "
            "quantize it; or strip them first (`tfopt.strip_pruning`, `tfopt.strip_clustering`). "
            f"Received: model={model.name!r}"
        )
    selected = mu.make_filter(filters)
    candidates, refused = [], []
    for layer in mu.all_layers(model):
        if selected is not None:
            if selected(layer):
                (refused if _unsupported_reason(layer) else candidates).append(layer)
        elif isinstance(layer, (L.Dense, L.Conv2D)):
            candidates.append(layer)
    if refused:
        raise ValueError(
            "`filters` selected layers that cannot be factorized: "
            + "; ".join(f"{mu.describe(l)}: {_unsupported_reason(l)}" for l in refused)
            + f". Select only Dense and Conv2D layers. Received: filters={filters!r}"
        )
    if not candidates:
        raise ValueError(
            f"No Dense or Conv2D layer of model {model.name!r} to factorize"
            + (" among those `filters` selects" if selected else "")
            + f". Received: filters={filters!r}"
        )

    rows, plan = [], {}
    for layer in candidates:
        params = sum(math.prod(w.shape) for w in layer.weights)
        row = {
            "name": layer.name,
            "type": type(layer).__name__,
            "kernel_shape": list(layer.kernel.shape) if layer.built else None,
            "max_rank": None,
            "rank": None,
            "energy": None,
            "params_before": params,
            "params_after": params,
            "factorized": False,
            "reason": _unsupported_reason(layer),
        }
        rows.append(row)
        if row["reason"]:
            continue
        matrix, _ = _matrix(layer)
        m, n = matrix.shape
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        r, kept = choose_rank(s, rank, energy)
        row.update(max_rank=int(s.size), rank=r, energy=kept)
        bias = params - m * n
        if r * (m + n) >= m * n:
            row["reason"] = f"rank {r} would not reduce parameters ({r} x ({m} + {n}) >= {m} x {n})"
            continue
        root = np.sqrt(s[:r])
        plan[id(layer)] = _factor_layers(layer, r, u[:, :r] * root, root[:, None] * vt[:r])
        row.update(params_after=r * (m + n) + bias, factorized=True)

    new = _graph.map_layers(model, lambda l: plan.get(id(l)) or mu.copy_layer(l)) if plan else mu.clone(model, mu.copy_layer)
    return new, LowRankReport(rows, model.count_params(), new.count_params())
