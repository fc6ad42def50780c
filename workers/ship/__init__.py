"""Shipping a model: using it in process (`load_model`, `bulklabel predict`) and exporting it (ONNX, TorchScript)."""
