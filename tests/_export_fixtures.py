"""Tiny seeded models and checks for the tflite_export tests (independent of tfopt's own parser)."""

import warnings

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

INPUT_SHAPE = (8, 8, 3)


def rep_data(n=32, seed=0):
    return np.random.default_rng(seed).random((n, *INPUT_SHAPE), np.float32)


def tiny_model(seed=0, name="tiny"):
    """Conv -> DepthwiseConv(relu6) -> GAP -> Dense(5, softmax) on (8, 8, 3), dynamic batch."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, batch_size=None, name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6", name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=name)


def model_with(layer_fn, seed=0, flatten=True):
    """Conv -> <layer_fn(x)> -> [GAP] -> Dense(4): a tiny model around one layer under test."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layer_fn(x)
    if flatten:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs)


@keras.saving.register_keras_serializable(package="tfopt_tests")
class FakeQuant(keras.layers.Layer):
    """Activation fake-quant with fixed ranges: what a QAT-trained model carries."""

    def __init__(self, min_value=-6.0, max_value=6.0, **kwargs):
        super().__init__(**kwargs)
        self.min_value, self.max_value = min_value, max_value

    def call(self, x):
        return keras.quantizers.fake_quant_with_min_max_vars(x, self.min_value, self.max_value, num_bits=8)

    def get_config(self):
        return {**super().get_config(), "min_value": self.min_value, "max_value": self.max_value}


@keras.saving.register_keras_serializable(package="tfopt_tests")
class FQConv(keras.layers.Conv2D):
    """Conv2D whose kernel is fake-quantized per tensor over its symmetric abs-max range."""

    def convolution_op(self, inputs, kernel):
        m = keras.ops.max(keras.ops.abs(kernel))
        kq = keras.quantizers.fake_quant_with_min_max_vars(kernel, -m, m, num_bits=8, narrow_range=True)
        return super().convolution_op(inputs, kq)


@keras.saving.register_keras_serializable(package="tfopt_tests")
class FQDense(keras.layers.Dense):
    """Dense with a per-tensor fake-quantized kernel (per-channel Dense breaks the converter)."""

    def call(self, inputs):
        m = keras.ops.max(keras.ops.abs(self.kernel))
        kq = keras.quantizers.fake_quant_with_min_max_vars(self.kernel, -m, m, num_bits=8, narrow_range=True)
        return keras.ops.matmul(inputs, kq) + self.bias


def qat_model(seed=0):
    """A hand-made QAT model (fake-quant on input, weights and outputs), as in peers.md section 1.3."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = FakeQuant(0.0, 1.0, name="fq_in")(inputs)
    x = FQConv(8, 3, padding="same", activation="relu", name="qconv")(x)
    x = FakeQuant(0.0, 4.0, name="fq_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = FakeQuant(0.0, 4.0, name="fq_gap")(x)
    x = FQDense(4, name="qdense")(x)
    outputs = FakeQuant(-4.0, 4.0, name="fq_out")(x)
    return keras.Model(inputs, outputs, name="qat_tiny")


def tensor_types(tflite_bytes):
    """(ops, tensors) of a .tflite as the LiteRT runtime sees them, without delegates."""
    it = Interpreter(
        model_content=bytes(tflite_bytes),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    it.allocate_tensors()
    return it, it._get_ops_details(), it.get_tensor_details()


def assert_fully_int8(tflite_bytes, io_dtype=np.int8, batch_one=True):
    """Every op computes on int8: I/O as asked, int32 only for constants (bias), no float Q/DQ inside.

    With uint8 or float I/O, the converter's QUANTIZE (and DEQUANTIZE for float) at the edges are the
    only allowed ops touching non-int8 tensors.
    """
    it, ops, tensors = tensor_types(tflite_bytes)
    by_index = {t["index"]: t for t in tensors}
    inputs = [d["index"] for d in it.get_input_details()]
    outputs = [d["index"] for d in it.get_output_details()]
    for i in inputs + outputs:
        assert by_index[i]["dtype"] == io_dtype, (by_index[i]["name"], by_index[i]["dtype"])
    if batch_one:
        for d in it.get_input_details():
            assert list(d["shape_signature"])[0] == 1, d["shape_signature"]
    edge = set()
    for op in ops:
        if op["op_name"] == "QUANTIZE" and all(by_index[t]["dtype"] == np.int8 for t in [*op["inputs"], *op["outputs"]]):
            continue  # int8 -> int8 requantization: integer arithmetic
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            at_edge = set(op["inputs"]) & set(inputs) or set(op["outputs"]) & set(outputs)
            assert at_edge and io_dtype != np.int8, f"{op['op_name']} inside the graph: {op}"
            edge.update(t for t in list(op["inputs"]) + list(op["outputs"]) if t in inputs or t in outputs)
    for op in ops:
        for t in list(op["inputs"]) + list(op["outputs"]):
            if t < 0 or t in edge:
                continue
            dtype = by_index[t]["dtype"]
            if dtype == np.int32:
                assert op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MEAN", "RESHAPE",
                                         "TRANSPOSE_CONV", "PAD", "SUM", "STRIDED_SLICE", "CONCATENATION"), op
                assert t not in [o for o2 in ops for o in o2["outputs"]], f"int32 activation {by_index[t]['name']}"
            else:
                assert dtype == np.int8, f"{op['op_name']}: tensor {by_index[t]['name']!r} is {dtype}"


def raw_int8_converter(model, rep, uint8=False):
    """What a user would write by hand with the TF converter (dynamic batch: Keras' default)."""
    import tensorflow as tf

    def gen():
        for s in rep:
            yield [s[None]]

    c = tf.lite.TFLiteConverter.from_keras_model(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = gen
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = c.inference_output_type = tf.uint8 if uint8 else tf.int8
    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": from_keras_model's
        warnings.simplefilter("ignore")
        return c.convert()


COMPILER_LOG = """Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 1032 ms.

Input model: model.tflite
Input size: 3.07MiB
Output model: model_edgetpu.tflite
Output size: 3.35MiB
On-chip memory used for caching model parameters: 3.26MiB
On-chip memory remaining for caching model parameters: 4.51MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 66
Operation log: model_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 64
Number of operations that will run on CPU: 2

Operator                       Count      Status

CONV_2D                        35         Mapped to Edge TPU
DEPTHWISE_CONV_2D              17         Mapped to Edge TPU
ADD                            10         Mapped to Edge TPU
MEAN                           1          Mapped to Edge TPU
FULLY_CONNECTED                1          Mapped to Edge TPU
LEAKY_RELU                     1          Operation not supported
SOFTMAX                        1          More than one subgraph is not supported
"""
