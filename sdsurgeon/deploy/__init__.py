"""The folded model out: ONNX export and its verification with onnxruntime."""
