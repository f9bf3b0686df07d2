"""llama_export: LLaMA-family models to tensor-parallel ONNX subgraphs, ONNX Runtime and TensorRT.

Importing the package imports neither onnxruntime nor tensorrt; backends load lazily.
"""

__version__ = "0.1.0"
