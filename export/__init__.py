"""PyTorch -> ONNX export of the four networks from their I/O spec, with a manifest per network that records the
source checkpoint, the spec, the opset, library versions and the measured parity (`onnx_export`)."""
