"""Integer quantization: schemes (w8a8, w4a8, w8a16, w4a16), calibration, and the quantized model."""
from ...runtime.intref import QuantConfig, QuantizedModel
from .calibrate import calibration_chunks, calibration_files
from .quantize import quantize_model

__all__ = ["QuantConfig", "QuantizedModel", "calibration_chunks", "calibration_files", "quantize_model"]
