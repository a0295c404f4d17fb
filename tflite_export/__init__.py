"""tfopt.tflite_export: verified TFLite export for phones (LiteRT), Coral Edge TPU and microcontrollers.

The only part of tfopt that imports TensorFlow (and only inside `convert`). Everything else reads the
`.tflite` flatbuffer or runs it with LiteRT (`ai_edge_litert`), so it works on any `.tflite`. Models
with several (list or dict, float or integer) inputs and outputs convert as they are (README).

Example:
    >>> from tfopt import tflite_export
    >>> tfl = tflite_export.convert(model, target="edgetpu", representative_data=x_train[:300])
    >>> tfl.save("model_int8.tflite")
    >>> print(tfl.report); print(tfl.edgetpu)
    >>> tflite_export.compare(model, tfl, x_test[:200])
    >>> two = tflite_export.convert(two_input_model, representative_data={"image": images, "meta": meta})
    >>> two.input_names, two.predict({"image": images, "meta": meta})["cls"]
"""

from tfopt.tflite_export._errors import ConversionError, EdgeTPUError, MicroError, TFLiteFileError
from tfopt.tflite_export.analysis import Analysis, analyze
from tfopt.tflite_export.converter import IO_DTYPES, MODES, TARGETS, TFLiteModel, convert
from tfopt.tflite_export.edgetpu import CompilerLog, EdgeTPUReport, OpVerdict, edgetpu_report, parse_compiler_log
from tfopt.tflite_export.micro import MicroResult, save_c_array
from tfopt.tflite_export.runtime import Comparison, Latency, benchmark, compare, compare_latency

__all__ = [
    "IO_DTYPES",
    "MODES",
    "TARGETS",
    "Analysis",
    "CompilerLog",
    "Comparison",
    "ConversionError",
    "EdgeTPUError",
    "EdgeTPUReport",
    "Latency",
    "MicroError",
    "MicroResult",
    "OpVerdict",
    "TFLiteFileError",
    "TFLiteModel",
    "analyze",
    "benchmark",
    "compare",
    "compare_latency",
    "convert",
    "edgetpu_report",
    "parse_compiler_log",
    "save_c_array",
]
