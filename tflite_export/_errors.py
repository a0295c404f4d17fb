"""Exception types of `tfopt.tflite_export` (ValueError subclasses: the CLI prints them as one line)."""


class ConversionError(ValueError):
    """The converter failed, or emitted a model that does not meet what was asked (e.g. not fully int8)."""


class TFLiteFileError(ValueError):
    """The input is not a readable `.tflite` flatbuffer."""


class EdgeTPUError(ConversionError):
    """`target="edgetpu"` with `strict=True` and an op that would not map to the Edge TPU."""


class MicroError(ConversionError):
    """`target="micro"`: TFLite Micro cannot run the model, or its outputs differ from LiteRT's."""
