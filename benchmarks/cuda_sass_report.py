"""Registers, spills and the SASS of the CUDA decode kernel's inner loops, on a machine without a GPU.

Compiles ``triton_kernels/cuda/packed_decode.cu`` (the configuration as ``#define`` overrides) with NVRTC to PTX,
assembles it for sm_90 with ptxas and disassembles it with cuobjdump, then prints ptxas's register / spill line and,
for each loop that holds tensor-core MMAs, its instruction count and most frequent opcodes -- the numbers to look at
before spending device time on a kernel change (static counts: a loop body runs once per 16-token tile).

Tools (none needs a GPU): NVRTC and ptxas from the PyPI wheels ``nvidia-cuda-nvrtc-cu12`` and
``nvidia-cuda-nvcc-cu12`` (``pip install`` them; they are not project dependencies), cuobjdump from Triton's wheel.

Usage: ``python benchmarks/cuda_sass_report.py [KB=2 VB=2 K_LUT=1 ...]``
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from triton_kernels import cuda_decode

DEFAULTS = dict(D=128, KB=4, VB=4, KS=2, VS=2, MR=4, NW=4, HAS_HIST=0, LEN_DEV=0, MINB=1, K_LUT=0, V_LUT=0, BF16IN=0)


def _pkg_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 triton")
    return next(iter(spec.submodule_search_locations))


def compile_ptx(src: str) -> bytes:
    lib = ctypes.CDLL(os.path.join(_pkg_dir("nvidia.cuda_nvrtc"), "lib", "libnvrtc.so.12"))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"packed_decode.cu", 0, None, None):
        raise SystemExit("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=compute_90", b"-std=c++17"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise SystemExit(f"NVRTC failed:\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


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
    with open(cuda_decode._SRC) as fh:
        src = "".join(f"#define {k} {v}\n" for k, v in defs.items()) + fh.read()
    ptx = compile_ptx(src)
    bin_dir = os.path.join(_pkg_dir("nvidia.cuda_nvcc"), "bin")
    objdump = os.path.join(_pkg_dir("triton"), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "wb") as fh:
            fh.write(ptx)
        ptxas = os.path.join(bin_dir, "ptxas")
        os.chmod(ptxas, os.stat(ptxas).st_mode | 0o111)  # the wheel may unpack it without the executable bit
        r = subprocess.run([ptxas, "-arch=sm_90", "-v", ptx_path, "-o", cubin], capture_output=True, text=True,
                           check=True)
        print(" ".join(f"{k}={v}" for k, v in defs.items()))
        print("\n".join(line.strip() for line in r.stderr.splitlines() if "registers" in line or "spill" in line))
        sass = subprocess.run([objdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    print("\n".join(loop_report(sass)))


if __name__ == "__main__":
    main()
