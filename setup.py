"""Builds gpt_ext, the fused kernels of gpt.py: `pip install --no-build-isolation -e .`

The CPU kernels always build; the CUDA kernels build when torch has CUDA and a toolkit is
found (CUDA_HOME). gpt.py JIT-builds the same sources with the same flags (ext_kwargs)
when the prebuilt module is missing.
"""
import glob
import os

ROOT = os.path.dirname(os.path.abspath(__file__))

# -O3 and OpenMP SIMD for the CPU loops; the ISA-specific paths (AVX2/AVX-512) are picked at
# run time by target_clones in the kernels, so the build never assumes the build machine's CPU.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]  # the C++ standard: torch's own
# -fno-trapping-math lets GCC turn a loop's compares and selects (exp_approx's and GELU's clamps) into
# blends: without it the AVX2 and SSE clones of those loops stay scalar ("control flow in loop"). We
# never read the FP exception flags, so no result changes.
# No --use_fast_math: its flush-to-zero made a subnormal probability count as not kept in sampling.
# The one fast intrinsic left is cross_entropy.cu's __expf, where a flushed exp(x - max) < 2^-126 moves a
# loss or a gradient by less than float32 can show.
NVCC_FLAGS = ["-O3"]
# With no GPU visible torch cannot guess the architectures: Ampere and Hopper, plus Hopper's PTX,
# which the driver compiles for newer GPUs (else they find "no kernel image").
CUDA_ARCH_LIST = "8.0;9.0+PTX"


def ext_kwargs(with_cuda):
    """Sources and flags of gpt_ext, shared by setup() and gpt.py's JIT build."""
    sources = [os.path.join(ROOT, "csrc", "ops.cpp")]
    sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    extra = {"cxx": list(CXX_FLAGS)}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        extra["nvcc"] = list(NVCC_FLAGS)
    return {"sources": sources, "extra_compile_args": extra}


def cuda_wanted():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and os.getenv("GPT_BUILD_CUDA", "1") != "0"


if __name__ == "__main__":
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_wanted()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
    kwargs = ext_kwargs(with_cuda)
    kwargs["sources"] = [os.path.relpath(s, ROOT) for s in kwargs["sources"]]
    Extension = CUDAExtension if with_cuda else CppExtension
    setup(
        ext_modules=[Extension("gpt_ext", **kwargs)],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
