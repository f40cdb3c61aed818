"""Integer quantization: schemes (w8a8, w4a8, w8a16, w4a16), calibration, the quantized model, its report."""
from ...runtime.intref import QuantConfig, QuantizedModel
from .calibrate import calibration_chunks, calibration_files
from .quantize import quantize_model
from .report import format_quant_report

__all__ = ["QuantConfig", "QuantizedModel", "calibration_chunks", "calibration_files", "format_quant_report",
           "quantize_model"]
