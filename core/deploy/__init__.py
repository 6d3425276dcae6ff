"""Deployment: ONNX export of the velocity, guided and generator graphs, their check against the
reference, and an onnxruntime sampler."""
