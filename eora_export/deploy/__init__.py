"""Deployable outputs of a finished run, one module per concern.

- :mod:`.graphs`: ONNX graphs (fused, pattern, FP16 baseline), the TensorRT plan and the
  Triton repository from a run or a finished folder, and ``write_deployment`` choosing among them;
- :mod:`.engine_build`: the TensorRT engine build (or the trtexec command to finish it elsewhere);
- :mod:`.plugin`: the EoraLinear plugin library (find, build, load, call through ctypes);
- :mod:`.triton`: Triton model folders and ``config.pbtxt``;
- :mod:`.trtllm`: the ModelOpt checkpoint + LoRA for TensorRT-LLM;
- :mod:`.verify`: Polygraphy comparison of graphs and the replay command.

The package imports nothing heavy itself; each module loads what it needs.
"""
