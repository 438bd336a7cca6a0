"""Everything that works on exported files: ONNX export, TensorRT engine build, the export/engine cache
and sidecars, and the two runtimes that run those files (ONNX Runtime, TensorRT) behind `backends.base.Backend`.

Import order has no circle: `cache` (paths, sidecars, metadata keys; no onnx, no TensorRT) is imported by
`export` (torch + onnx), `build` (onnx + TensorRT, lazily) and the runtimes; `export` and `build` never
import each other, so a TensorRT-only machine (a Jetson without PyTorch) builds and runs engines without
the export code, and the export runs where TensorRT is absent.
"""
