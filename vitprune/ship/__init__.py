"""Consumers that ship: torch.compile, ONNX export, benchmarks, pictures of the kept patches."""
