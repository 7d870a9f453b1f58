"""TensorRT engine building and the hbi plugins (issue 9). Needs tensorrt and onnx, never torch."""
