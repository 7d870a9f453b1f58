"""ONNX export: the HBI custom ops, the three graphs, the model package and its parity check."""
