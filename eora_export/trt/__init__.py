"""TensorRT side: engine build, the EoraLinear plugin library, Triton repository."""
