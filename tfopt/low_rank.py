"""Low-rank factorization: SVD-split Dense and Conv2D kernels into two thinner layers.

A Dense kernel ``W`` (``m x n``) is split with its singular value decomposition ``W = U diag(s) V^T`` into
``A = U_r diag(sqrt(s_r))`` (``m x r``) and ``B = diag(sqrt(s_r)) V_r^T`` (``r x n``): the layer becomes
``Dense(r, use_bias=False)`` (named ``<name>_u``) followed by ``Dense(n)`` (named ``<name>_v``), which keeps the
bias and the activation. ``A B`` is the best rank-``r`` approximation of ``W`` in the Frobenius norm
(Eckart-Young); splitting ``sqrt(s)`` evenly keeps both factors at the same scale, which helps the fine-tuning.

A Conv2D kernel ``K`` (``kh x kw x c_in x c_out``) is factorized as the matrix ``K.reshape(kh * kw * c_in, c_out)``:
a ``kh x kw`` convolution with ``r`` filters, the original strides, padding and dilation, and no bias, then a 1x1
convolution with ``c_out`` filters, the bias and the activation. At full rank both are exactly the original layer.

The rank of each layer is the smallest ``r`` that keeps the fraction `energy` of the kernel's squared Frobenius
norm::

    r = min { r : (s_1^2 + ... + s_r^2) / (s_1^2 + ... + s_p^2) >= energy }

(the relative reconstruction error is then ``sqrt(1 - kept energy)``), or a fixed `rank` for every layer (capped
at ``p = min(m, n)``). A layer is left as it is when the factors would not hold fewer parameters:
``r * (m + n) >= m * n``.
"""

import math
import types
import weakref

import keras
import numpy as np
from keras import ops

from tfopt import _checks, _graph, _report, _wrappers, qat, registry
from tfopt import _model_utils as mu

__all__ = ["low_rank_factorize", "low_rank_report", "LowRankReport", "choose_rank"]

L = keras.layers
_RECORD = "_tfopt_low_rank"  # on a factorized model: its source (a weak reference) and the report rows
_ENERGY = (
    "The fraction of each kernel's squared singular values (its squared Frobenius norm) the factors keep, e.g. 0.9."
)


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
    cumulative = np.cumsum(np.asarray(singular_values, dtype=np.float64) ** 2)
    kept = cumulative / cumulative[-1] if cumulative[-1] > 0 else np.ones_like(cumulative)
    r = int(rank) if rank is not None else int(np.searchsorted(kept, energy, side="left")) + 1
    r = min(r, kept.size)
    return r, float(kept[r - 1])


def _unsupported_reason(layer):
    """Why `layer` cannot be factorized here, or None if it can."""
    spec = registry.lookup(layer)
    # The factors are new layers of the Keras class: a subclass may compute otherwise (`call`, `convolution_op`).
    if not (spec and spec.factorizable) or not type(layer).__module__.startswith("keras."):
        return (
            f"only Dense and Conv2D are factorized, not {type(layer).__name__} (nor subclasses, whose call may differ)"
        )
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled on it (merge or disable LoRA first)"
    if getattr(layer, "quantization_mode", None):
        return f"it is quantized by Keras ({layer.quantization_mode!r})"
    if getattr(layer, "groups", 1) != 1:
        return f"it is a grouped convolution (groups={layer.groups})"
    if not layer.built:
        return "it is not built"
    return None


def _factor_layers(layer, r, a, b):
    """Two new built layers computing `layer` with kernel ``a @ b``; bias and activation go to the second."""
    config, kernel = layer.get_config(), layer.kernel
    cls = L.Dense if isinstance(layer, L.Dense) else L.Conv2D
    first = dict(config, name=f"{layer.name}_u", use_bias=False, activation="linear", activity_regularizer=None)
    first["units" if cls is L.Dense else "filters"] = r
    second = dict(config, name=f"{layer.name}_v")
    if cls is L.Dense:
        inputs = [(None, a.shape[0]), (None, r)]
    else:
        kh, kw, c_in, c_out = kernel.shape
        second.update(kernel_size=(1, 1), strides=(1, 1), padding="valid", dilation_rate=(1, 1))
        last = layer.data_format == "channels_last"
        inputs = [(None, None, None, c) if last else (None, c, None, None) for c in (c_in, r)]
        a, b = a.reshape(kh, kw, c_in, r), b.reshape(1, 1, r, c_out)
    u, v = cls.from_config(first), cls.from_config(second)
    u.build(inputs[0])
    v.build(inputs[1])
    u.set_weights([a.astype(kernel.dtype)])
    v.set_weights([b.astype(kernel.dtype), *(ops.convert_to_numpy(w) for w in layer.weights if w is not kernel)])
    return u, v


class LowRankReport(_report.Report):
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

    header = ("layer", "type", "kernel", "rank", "energy", "params before", "params after", "result")
    right = (3, 4, 5, 6)
    totals = ("params_before", "params_after", "ratio", "model_params_before", "model_params_after")

    def __init__(self, rows, model_params_before, model_params_after):
        super().__init__(rows)
        done = [r for r in rows if r["factorized"]]
        self.params_before = sum(r["params_before"] for r in done)
        self.params_after = sum(r["params_after"] for r in done)
        self.ratio = self.params_before / self.params_after if self.params_after else 1.0
        self.model_params_before = model_params_before
        self.model_params_after = model_params_after

    def _cells(self, r):
        return (
            r["name"], r["type"], "x".join(str(d) for d in r["kernel_shape"]),
            "-" if r["rank"] is None else f"{r['rank']}/{r['max_rank']}",
            "-" if r["energy"] is None else f"{r['energy']:.3f}", f"{r['params_before']:,}", f"{r['params_after']:,}",
            "factorized" if r["factorized"] else f"kept: {r['reason']}",
        )  # fmt: skip

    def _footer(self):
        return [
            ("factorized layers", "", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
             f"{self.ratio:.2f}x fewer"),
            ("whole model", "", "", "", "", f"{self.model_params_before:,}", f"{self.model_params_after:,}", ""),
        ]


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
            (subclasses of Dense and Conv2D included) is an error; with None
            it is left as it is and listed in the report with the reason.

    Returns:
        The factorized model. ``tfopt.low_rank_report(model, factorized)``
        gives the ranks and parameter counts (a `LowRankReport`).

    Raises:
        TypeError: `model` is not a model, `rank` / `energy` / `filters` have
            the wrong type.
        ValueError: `rank < 1`, `energy` outside (0, 1], a subclassed or
            unbuilt model, a model holding tfopt pruning / clustering / QAT
            layers (factorize first, or strip them), selected layers that
            cannot be factorized (all are listed), or `filters` that select
            no Dense / Conv2D layer.

    Example:
        >>> small = tfopt.low_rank_factorize(model, energy=0.9)
        >>> print(tfopt.low_rank_report(model, small))
        >>> small.compile("adam", "sparse_categorical_crossentropy"); small.fit(x, y, epochs=2)
    """
    _checks.check_int(
        rank, "rank", 1, "The inner dimension of the two factors, or None to choose it from `energy`.", none_ok=True
    )
    if _checks.check_fraction(energy, "energy", _ENERGY, high_closed=True) == 0.0:
        raise ValueError(f"`energy` must be in (0, 1]. {_ENERGY} Received: energy={float(energy)!r}")
    mu.check_model(model, "model", "low_rank_factorize")
    _check_not_wrapped(model)
    selected = mu.make_filter(filters)
    candidates, refused = [], []
    for layer in mu.all_layers(model):
        if selected is not None:
            if selected(layer):
                (refused if _unsupported_reason(layer) else candidates).append(layer)
        elif getattr(registry.lookup(layer), "factorizable", False):
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
        shape = list(layer.kernel.shape) if layer.built else None
        row = dict(name=layer.name, type=type(layer).__name__, kernel_shape=shape, max_rank=None, rank=None,
                   energy=None, params_before=params, params_after=params, factorized=False,
                   reason=_unsupported_reason(layer))
        rows.append(row)
        if row["reason"]:
            continue
        kernel = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float64)
        matrix = kernel.reshape(-1, kernel.shape[-1])
        m, n = matrix.shape
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        r, kept = choose_rank(s, rank, energy)
        row.update(max_rank=int(s.size), rank=r, energy=kept)
        if r * (m + n) >= m * n:
            row["reason"] = f"rank {r} would not reduce parameters ({r} x ({m} + {n}) >= {m} x {n})"
            continue
        root = np.sqrt(s[:r])
        plan[id(layer)] = _factor_layers(layer, r, u[:, :r] * root, root[:, None] * vt[:r])
        row.update(params_after=r * (m + n) + params - m * n, factorized=True)  # the bias stays

    new = _graph.map_layers(model, lambda l: plan.get(id(l)) or mu.copy_layer(l))
    setattr(new, _RECORD, types.SimpleNamespace(source=weakref.ref(model), rows=rows))
    return new


def low_rank_report(model, factorized):
    """What `low_rank_factorize` did to each Dense / Conv2D layer of `model`.

    Args:
        model: the model given to `tfopt.low_rank_factorize`.
        factorized: the model it returned (fine-tuned or not).

    Returns:
        A `LowRankReport`: ``print(report)`` shows the ranks and parameter
        counts, ``report.to_dict()`` gives plain data.

    Raises:
        TypeError / ValueError: as `tfopt.low_rank_factorize` for a bad model.
        ValueError: `factorized` is not what ``low_rank_factorize(model)``
            returned in this process (the factorization is recorded on the
            returned model; a saved and loaded or cloned copy does not keep
            it).

    Example:
        >>> small = tfopt.low_rank_factorize(model, energy=0.9)
        >>> print(tfopt.low_rank_report(model, small))  # doctest: +SKIP
    """
    mu.check_model(model, "model", "low_rank_report")
    mu.check_model(factorized, "factorized", "low_rank_report")
    record = getattr(factorized, _RECORD, None)
    if record is None or record.source() is not model:
        raise ValueError(
            f"`low_rank_report` describes a factorization, and model {factorized.name!r} is not the result of "
            f"`tfopt.low_rank_factorize` on model {model.name!r} (the ranks are recorded on the returned model in "
            "this process; a saved and loaded or cloned copy does not keep them). Pass the model you factorized and "
            f"the model it returned. Received: model={model.name!r}, factorized={factorized.name!r}"
        )
    return LowRankReport([dict(r) for r in record.rows], model.count_params(), factorized.count_params())


def _check_not_wrapped(model):
    message = (
        "Model {model} holds tfopt layers ({layers}): factorize the float model first, then prune, cluster or "
        "quantize it; or strip them first (`tfopt.strip_pruning`, `tfopt.strip_clustering`). Received: model={model}"
    )
    _wrappers.refuse(model, _wrappers.TfoptWrapper, message)
    if qat.is_quantized_model(model):  # QAT's QuantizeLayer is not a wrapper
        raise ValueError(message.format(layers="QuantizeLayer", model=repr(model.name)))
