"""xorserve serving: the Open Inference Protocol gRPC server on ONNX Runtime and its clients."""
