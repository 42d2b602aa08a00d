"""Offline compile of the CUDA decode kernel for tests: NVRTC to a cubin, cuobjdump for its resource usage.

None of it needs a GPU: NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel of the test extras (or
``KVQUANT_NVRTC_LIB``), cuobjdump from Triton's wheel.
"""

from __future__ import annotations

import ctypes
import os

def nvrtc_lib() -> str | None:
    """libnvrtc: ``KVQUANT_NVRTC_LIB``, else the ``nvidia-cuda-nvrtc`` wheel of the test extras (no GPU needed)."""
    if os.environ.get("KVQUANT_NVRTC_LIB"):
        return os.environ["KVQUANT_NVRTC_LIB"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        lib = distribution("nvidia-cuda-nvrtc").locate_file("nvidia/cu13/lib/libnvrtc.so.13")
    except PackageNotFoundError:
        return None
    return str(lib) if os.path.exists(str(lib)) else None


def cuobjdump() -> str:
    """The cuobjdump that Triton's wheel carries."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_cubin(src: str, nvrtc: str, arch: str = "sm_90") -> tuple[int, bytes, str]:
    """NVRTC ``src`` for ``arch``: (result code, cubin -- empty when compiling failed, the compiler log)."""
    builtins = os.path.join(os.path.dirname(nvrtc), "libnvrtc-builtins.so.13.0")
    if os.path.exists(builtins):  # NVRTC dlopens it by name: load it first so no LD_LIBRARY_PATH is needed
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(nvrtc)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"packed_decode.cu", 0, None, None):
        return -1, b"", "nvrtcCreateProgram failed"
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if res:
        return res, b"", log.value.decode()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return 0, cubin.raw, log.value.decode()
