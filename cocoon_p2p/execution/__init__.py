"""Running models: tensors, model specs, backends (TensorRT, onnxruntime), the executor, text generation.

Decides: how a model is identified (sha256 of its ONNX file, :mod:`.models`),
loaded and run (:mod:`.backends`, :mod:`.executor`), how text becomes tokens and
tokens text (:mod:`.generation`), and how the built-in models are exported
(:mod:`.export`). Knows nothing of the network: the job layer hands it inputs
and takes back outputs.
"""
