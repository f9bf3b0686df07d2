"""The TensorRT backend: plugins (Triton kernels), engine build, and the engine runner.

Where things live:
    kernels.py     Triton RMSNorm / RoPE kernels and their launch plans (runs under TRITON_INTERPRET)
    aot.py         PTX compilation of those kernels for sm_80 / sm_90, without a GPU
    plugins.py     tensorrt.plugin registrations (AOT PTX + JIT fallback)
    lowering.py    ONNX pass: custom nodes -> TensorRT plugin nodes
    profiles.py    prefill / decode optimization profiles from symbolic input shapes
    structure.py   "same structure" key so identical layer segments are built once and refit
    build.py       build_engines(): per-rank engines + build_manifest.json
    runner.py      TensorRTBackend: the RankBackend over those engines

Importing this package imports neither tensorrt nor triton. `llama-export build` (cli.py) calls
`build.build_engines`; the runner opens `runner.TensorRTBackend` through `backends.open_backend`.
"""
