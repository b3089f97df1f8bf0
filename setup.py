"""Build the unigist extension.

CPU kernels are always built. CUDA kernels are built when a CUDA build of
torch and nvcc are both present (set UNIGIST_CPU_ONLY=1 to skip them). The
CUDA arch list defaults to "8.0;9.0a" and follows TORCH_CUDA_ARCH_LIST when
that is set: csrc/cuda/*.cu build for every arch of it, the wgmma kernels of
csrc/cuda/sm90/ only for sm_90a and only when the list names 9.0a (then the
other sources see UNIGIST_WITH_SM90). MAX_JOBS caps ninja's parallelism, as in
every torch extension.
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


def _arch_list() -> list:
    return [a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split() if a]


def _want_sm90a() -> bool:
    return any(a.split("+")[0] == "9.0a" for a in _arch_list())


# The sm_90a kernels need the arch-specific target (wgmma, setmaxnreg), which
# the other sources must not get (it would drop sm_80). torch compiles every
# source of an extension with one set of -gencode flags, so the sm90 set is
# compiled here, through the same ninja-backed compiler and flags, with its
# own -gencode, and linked in as objects.
SM90_GENCODE = "-gencode=arch=compute_90a,code=sm_90a"


class BuildExt(BuildExtension):
    def build_extension(self, ext):
        sm90_sources = getattr(ext, "sm90_sources", [])
        if sm90_sources:
            args = dict(ext.extra_compile_args)
            args["nvcc"] = list(args["nvcc"]) + [SM90_GENCODE]
            objects = self.compiler.compile(
                sm90_sources,
                output_dir=os.path.join(self.build_temp, "sm90"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=args,
                depends=ext.depends,
            )
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extension(ext)


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def extensions():
    cpu_sources = _rel([os.path.join(HERE, "csrc", "ops.cpp"), os.path.join(HERE, "csrc", "autograd.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    # at::parallel_for is an inline template of ATen's OpenMP backend: without
    # -fopenmp the kernels' loops over heads and query blocks would run serially.
    cxx_flags = ["-O3", "-fopenmp"] + _cpu_isa_args()
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        sm90_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "sm90", "*.cu"))) if _want_sm90a() else []
        defines = ["-DUNIGIST_WITH_CUDA"] + (["-DUNIGIST_WITH_SM90"] if sm90_sources else [])
        nvcc_flags = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"] + defines
        ext = CUDAExtension(
            "unigist._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _cuda_header_dirs(),
            extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            # setuptools relinks only when one of these is newer than the library.
            depends=sm90_sources + _rel(glob.glob(os.path.join(HERE, "csrc", "**", "*.*h"), recursive=True)),
        )
        ext.sm90_sources = sm90_sources
        return [ext]
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
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
