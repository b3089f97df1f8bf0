"""Build the unigist extension.

CPU kernels are always built. CUDA kernels are built when a CUDA build of
torch and nvcc are both present (set UNIGIST_CPU_ONLY=1 to skip them). The
CUDA arch list defaults to "8.0;9.0a" and follows TORCH_CUDA_ARCH_LIST when
that is set. MAX_JOBS caps ninja's parallelism, as in every torch extension.
"""

import glob
import os
import platform
import shutil

from setuptools import setup

# torch derives CUDA_HOME from `which nvcc`; a wrapper script outside the
# toolkit (e.g. /usr/local/bin/nvcc) then points it at the wrong prefix.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    nvcc = shutil.which("nvcc")
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            break
    else:
        if nvcc:
            os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("UNIGIST_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    )


def _cuda_header_dirs() -> list:
    """Headers the toolkit may lack (e.g. cusparse.h, which ATen/cuda includes)
    but that torch's CUDA wheels ship under site-packages/nvidia/*/include."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                found.append(inc)
    return found


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_isa_args() -> list:
    """Vector ISA of the CPU kernels' softmax (at::vec): AVX2 + FMA where the
    build machine has them (UNIGIST_CPU_ISA=auto, the default), or the portable
    scalar build (UNIGIST_CPU_ISA=default, for a build meant for older x86 CPUs).
    The GEMMs run in ATen's cpublas, which picks its own ISA at run time."""
    choice = os.environ.get("UNIGIST_CPU_ISA", "auto").lower()
    if choice not in ("auto", "avx2", "default"):
        raise ValueError(f"UNIGIST_CPU_ISA must be auto, avx2 or default, got {choice!r}")
    if choice == "default" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if choice == "avx2" or {"avx2", "fma", "f16c"} <= _cpu_flags():
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-DUNIGIST_CPU_AVX2"]
    return []


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def extensions():
    cpu_sources = _rel([os.path.join(HERE, "csrc", "ops.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    # at::parallel_for is an inline template of ATen's OpenMP backend: without
    # -fopenmp the kernels' loops over heads and query blocks would run serially.
    cxx_flags = ["-O3", "-fopenmp"] + _cpu_isa_args()
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        nvcc_flags = [
            "-O3",
            "--use_fast_math",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-DUNIGIST_WITH_CUDA",
        ]
        return [
            CUDAExtension(
                "unigist._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs + _cuda_header_dirs(),
                extra_compile_args={"cxx": cxx_flags + ["-DUNIGIST_WITH_CUDA"], "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "unigist._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
