"""Deployment: the YOLC network (backbone, neck, head) exported to ONNX (`onnx_export`) and run by ONNX Runtime
in place of the PyTorch forward (`onnx_runtime`). Needs the `deploy` extra (onnx, onnxscript, onnxruntime)."""
