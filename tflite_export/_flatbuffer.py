"""A fast read-only view of a `.tflite` flatbuffer, and `with_io_names`, its one writer.

Reads through the accessor API of ai-edge-litert's schema (`schema_py_generated`), not the object API
(`ModelT`), which unpacks every buffer into Python lists (slow on big models; `DataAsNumpy()` is a view).
"""

import dataclasses
import os
import pathlib

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as _schema

from tfopt.tflite_export._errors import TFLiteFileError

_FILE_IDENTIFIER = b"TFL3"


def _enum_names(cls):
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


OP_NAMES = _enum_names(_schema.BuiltinOperator)
TYPE_NAMES = {k: v.lower() for k, v in _enum_names(_schema.TensorType).items()}
_OPTION_NAMES = _enum_names(_schema.BuiltinOptions)
_ACTIVATIONS = _enum_names(_schema.ActivationFunctionType)

# Storage dtype of each TFLite tensor type that numpy represents.
NUMPY_DTYPES = {name: np.dtype(name).type for name in (
    "float32", "float16", "float64", "int32", "uint8", "int64", "bool", "int16", "int8", "uint16", "uint32", "uint64")}


@dataclasses.dataclass
class Tensor:
    """One tensor of a subgraph (shape_signature is None when the file stores none: fully static)."""

    index: int
    name: str
    dtype: str
    shape: tuple
    shape_signature: tuple
    buffer: int
    is_constant: bool
    is_sparse: bool
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int

    @property
    def is_dynamic(self):
        return self.shape_signature is not None and any(d < 0 for d in self.shape_signature)

    @property
    def num_elements(self):
        return int(np.prod(self.shape))  # 1 for a scalar (shape ())

    @property
    def quantized(self):
        return self.scales.size > 0


@dataclasses.dataclass
class Operator:
    """One operator: its builtin name (custom code for CUSTOM), version, tensor indices and options."""

    index: int
    name: str
    version: int
    custom_code: str
    inputs: tuple
    outputs: tuple
    options: object

    def option(self, getter, default=None):
        """Reads one field of the builtin options table (`default` when the op has no options)."""
        return default if self.options is None else getattr(self.options, getter)()

    @property
    def fused_activation(self):
        if not hasattr(self.options, "FusedActivationFunction"):  # also for no options (None)
            return "NONE"
        return _ACTIVATIONS.get(self.options.FusedActivationFunction(), "NONE")


@dataclasses.dataclass
class Subgraph:
    tensors: list
    operators: list
    inputs: tuple
    outputs: tuple

    def output_name(self, op):
        """The name of `op`'s first output tensor ("" for none): its name scope names the layer."""
        return self.tensors[op.outputs[0]].name if op.outputs else ""


class FlatModel:
    """The parsed model: subgraphs, op codes, metadata and lazy buffer access."""

    def __init__(self, content):
        self.content = content
        self._model = _schema.Model.GetRootAs(content, 0)
        m = self._model
        self.schema_version = m.Version()
        self.op_codes = []
        for i in range(m.OperatorCodesLength()):
            oc = m.OperatorCodes(i)
            # Schema v3a keeps the old int8 field for codes < 127 and the int32 field for all.
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            self.op_codes.append((OP_NAMES.get(code, f"BUILTIN_{code}"), oc.Version(), _str(oc.CustomCode())))
        self.metadata = {_str(md.Name()): md.Buffer() for md in map(m.Metadata, range(m.MetadataLength()))}
        self.subgraphs = [self._read_subgraph(m.Subgraphs(i)) for i in range(m.SubgraphsLength())]
        self.signatures = {}  # key -> (subgraph index, {input name: tensor}, {output name: tensor})
        for i in range(m.SignatureDefsLength()):
            sd = m.SignatureDefs(i)
            maps = [{_str(t.Name()): t.TensorIndex() for t in (get(j) for j in range(n))}
                    for get, n in ((sd.Inputs, sd.InputsLength()), (sd.Outputs, sd.OutputsLength()))]
            self.signatures[_str(sd.SignatureKey())] = (sd.SubgraphIndex(), *maps)

    def _read_subgraph(self, sg):
        tensors = [self._read_tensor(sg.Tensors(i), i) for i in range(sg.TensorsLength())]
        ops = [Operator(i, *self.op_codes[op.OpcodeIndex()], _ints(op.InputsAsNumpy()), _ints(op.OutputsAsNumpy()),
                        _options(op)) for i, op in enumerate(map(sg.Operators, range(sg.OperatorsLength())))]
        return Subgraph(tensors, ops, _ints(sg.InputsAsNumpy()), _ints(sg.OutputsAsNumpy()))

    def _read_tensor(self, t, index):
        q = t.Quantization()
        if q is not None and not q.ScaleIsNone():
            scales = q.ScaleAsNumpy().astype(np.float64)
            zps = q.ZeroPointAsNumpy() if not q.ZeroPointIsNone() else np.zeros(scales.shape, np.int64)
            qdim = q.QuantizedDimension()
        else:
            scales, zps, qdim = np.zeros(0), np.zeros(0, np.int64), 0
        buf = t.Buffer()
        return Tensor(index=index, name=_str(t.Name()), dtype=TYPE_NAMES.get(t.Type(), f"type{t.Type()}"),
                      shape=_ints(t.ShapeAsNumpy()),
                      shape_signature=None if t.ShapeSignatureIsNone() else _ints(t.ShapeSignatureAsNumpy()),
                      buffer=buf, is_constant=self.buffer_size(buf) > 0, is_sparse=t.Sparsity() is not None,
                      scales=scales, zero_points=np.asarray(zps, np.int64), quantized_dimension=qdim)

    @property
    def num_buffers(self):
        return self._model.BuffersLength()

    def buffer_size(self, index):
        return self.buffer_data(index).size

    def buffer_data(self, index):
        """The raw bytes of buffer `index` as a uint8 numpy view (empty if none)."""
        if index <= 0 or index >= self._model.BuffersLength():
            return np.zeros(0, np.uint8)
        b = self._model.Buffers(index)
        if b.Offset() > 1:  # Models over 2 GB keep buffers after the flatbuffer.
            return np.frombuffer(self.content, np.uint8, count=b.Size(), offset=b.Offset())
        if b.DataLength() == 0:
            return np.zeros(0, np.uint8)
        return b.DataAsNumpy()

    def tensor_value(self, tensor):
        """The constant value of `tensor` as a numpy array (None if not constant or not numeric)."""
        dtype = NUMPY_DTYPES.get(tensor.dtype)
        if not tensor.is_constant or tensor.is_sparse or dtype is None:
            return None
        data = self.buffer_data(tensor.buffer)
        arr = np.frombuffer(data.tobytes() if not data.flags.c_contiguous else data, dtype)
        return arr.reshape(tensor.shape) if arr.size == tensor.num_elements else arr

    def metadata_string(self, key):
        if key not in self.metadata:
            return None
        return bytes(self.buffer_data(self.metadata[key])).split(b"\0")[0].decode("utf-8", "replace")


def _ints(x):
    """A tuple of ints from Flatbuffers' *AsNumpy (which returns the int 0 when the vector is absent)."""
    return tuple(x.tolist()) if isinstance(x, np.ndarray) else ()


def _str(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")


def _options(op):
    table = op.BuiltinOptions()
    cls = getattr(_schema, _OPTION_NAMES.get(op.BuiltinOptionsType(), "NONE"), None)  # no class for NONE
    if table is None or cls is None:
        return None
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def read_bytes(tflite, arg_name="tflite"):
    """Bytes of a `.tflite` given as bytes, a path, or anything with a `.content` (a TFLiteModel)."""
    if hasattr(tflite, "content") and isinstance(tflite.content, (bytes, bytearray)):
        content, source = bytes(tflite.content), "TFLiteModel"
    elif isinstance(tflite, (bytes, bytearray, memoryview)):
        content = bytes(tflite)
        source = f"<{len(content)} bytes>"
    elif isinstance(tflite, (str, os.PathLike)):
        path = os.fspath(tflite)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"No .tflite file at this path. Pass the path of an existing file, its bytes or a "
                f"TFLiteModel. Received: {arg_name}={path!r}"
            )
        if os.path.isdir(path):
            raise TFLiteFileError(
                f"Expected a .tflite file but got a directory (a SavedModel?). Convert it first with "
                f"`tfopt.tflite_export.convert(...)`. Received: {arg_name}={path!r}"
            )
        content, source = pathlib.Path(path).read_bytes(), path
    else:
        raise TypeError(
            f"`{arg_name}` must be the bytes of a .tflite model, a path to one, or a TFLiteModel. "
            f"Received: {arg_name}={tflite!r} of type {type(tflite).__name__}"
        )
    check_identifier(content, f"{arg_name}={source!r}")
    return content


def check_identifier(content, received):
    if len(content) < 8 or content[4:8] != _FILE_IDENTIFIER:
        raise TFLiteFileError(
            "Not a TFLite flatbuffer: a .tflite file carries the identifier b'TFL3' at bytes 4-8, "
            f"this one starts with {bytes(content[:8])!r}. Pass a file written by the TFLite converter or "
            f"`tfopt.tflite_export.convert`. Received: {received}"
        )


def parse(tflite, arg_name="tflite"):
    """A `FlatModel` from bytes, a path or a TFLiteModel; clear errors for anything else."""
    content = read_bytes(tflite, arg_name)
    try:
        model = FlatModel(content)
    except Exception as e:  # A corrupt table surfaces as any of struct/Index/Type errors.
        raise TFLiteFileError(
            f"The .tflite flatbuffer is corrupt or truncated ({type(e).__name__}: {e}). Re-export the "
            f"model. Received: {arg_name}=<{len(content)} bytes>"
        ) from None
    if not model.subgraphs:
        raise TFLiteFileError(f"The .tflite model has no subgraph. Received: {arg_name}=<{len(content)} bytes>")
    return model


def layer_of(tensor_name):
    """Best guess of the Keras layer that made a tensor, from TF's name scope `model/layer/op`; of a fused
    tensor's names ('m/re_lu/Relu6;m/conv2d/convolution') the last is the op that created the value."""
    parts = [p for p in tensor_name.split(";") if "/" in p]
    if not parts:
        return None
    scopes = parts[-1].split("/")
    return scopes[1] if len(scopes) > 2 else scopes[0]


class _AlignedBuilder(flatbuffers.Builder):
    """Starts every byte vector (the weight buffers) on 16 bytes, as the converter does: kernels read
    weights in place, and int32 bias or float weights read unaligned fault on some microcontrollers."""

    def CreateNumpyVector(self, x):
        if x.dtype == np.uint8:
            self.Prep(16, x.nbytes)
        return super().CreateNumpyVector(x)


def with_io_names(content, input_names, output_names, metadata):
    """The model with its first subgraph's I/O tensors renamed (in the subgraph's order), one "serving_default"
    signature mapping those names, and the `metadata` entries ({name: bytes}) added or replaced.

    A model over 2 GB (buffers after the flatbuffer, which the object API drops) is returned unchanged.
    """
    model = _schema.ModelT.InitFromPackedBuf(content, 0)
    if any(b.offset > 1 for b in model.buffers or ()):
        return content
    sg = model.subgraphs[0]
    maps = [[_schema.TensorMapT(name=name, tensorIndex=int(index)) for index, name in zip(indices, names)]
            for indices, names in ((sg.inputs, input_names), (sg.outputs, output_names))]
    for tensor_map in maps[0] + maps[1]:
        sg.tensors[tensor_map.tensorIndex].name = tensor_map.name
    model.signatureDefs = [_schema.SignatureDefT(maps[0], maps[1], "serving_default", 0)]
    model.metadata = [md for md in model.metadata or () if _str(md.name) not in metadata]
    for name, data in metadata.items():
        buffer = _schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        model.buffers.append(buffer)
        model.metadata.append(_schema.MetadataT(name, len(model.buffers) - 1))
    builder = _AlignedBuilder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())
