"""PyTorch -> ONNX export with manifests (the engines issue builds this stage)."""
