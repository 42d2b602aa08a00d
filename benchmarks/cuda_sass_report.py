"""Registers, spills and the SASS of the CUDA decode kernel's inner loops, on a machine without a GPU.

Compiles ``triton_kernels/cuda/packed_decode.cu`` (the configuration as ``#define`` overrides) for sm_90 with NVRTC,
disassembles the cubin with cuobjdump and prints its resource usage and, for each loop that holds tensor-core MMAs,
its instruction count and most frequent opcodes -- the numbers to look at before spending device time on a kernel
change (static counts: a loop body runs once per 16-token tile).

Tools (none needs a GPU): NVRTC from the ``nvidia-cuda-nvrtc`` wheel of the test extras (or ``KVQUANT_NVRTC_LIB``),
cuobjdump from Triton's wheel. ``tests/test_cuda_decode.py`` compiles the kernel the same way (:func:`compile_cubin`).

Usage: ``python benchmarks/cuda_sass_report.py [KB=2 VB=2 K_LUT=1 ...]``
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kvquant_hf.kernels import cuda_decode

DEFAULTS = dict(D=128, KB=4, VB=4, KS=2, VS=2, MR=4, NW=4, HAS_HIST=0, LEN_DEV=0, MINB=1, K_LUT=0, V_LUT=0, BF16IN=0)


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


def loop_report(sass: str) -> list[str]:
    """One line per loop (backward branch) whose body holds HMMA instructions."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    where = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in where:
            continue
        body = [t for _, t in ins[where[int(m.group(1), 16)]: i + 1]]
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
        if any(k.startswith("HMMA") for k in ops):
            common = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
            out.append(f"loop {int(m.group(1), 16):#x}-{addr:#x}: {len(body)} instructions: {common}")
    return out


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    defs = dict(DEFAULTS)
    for item in argv:
        k, _, v = item.partition("=")
        defs[k] = int(v)
    nvrtc = nvrtc_lib()
    if not nvrtc:
        raise SystemExit("no libnvrtc: pip install nvidia-cuda-nvrtc (the test extras) or set KVQUANT_NVRTC_LIB")
    with open(cuda_decode._SRC) as fh:
        src = "".join(f"#define {k} {v}\n" for k, v in defs.items()) + fh.read()
    res, cubin, log = compile_cubin(src, nvrtc)
    if res:
        raise SystemExit(f"NVRTC failed:\n{log}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    print(" ".join(f"{k}={v}" for k, v in defs.items()))
    print("\n".join(line.strip() for line in usage.splitlines() if "REG:" in line))
    print("\n".join(loop_report(sass)))


if __name__ == "__main__":
    main()
