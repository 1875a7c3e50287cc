"""Repository rule that exposes the local CUDA toolkit and NCCL to Bazel.

Finds nvcc under $CUDA_PATH (default /usr/local/cuda) and libnccl under $NCCL_PATH or the usual
places, symlinks their include and library folders into the external repository, and writes:
  @local_cuda//:cudart   static CUDA runtime (so bundles need no libcudart on the host)
  @local_cuda//:cublas   cuBLAS / cuBLASLt (dynamic)
  @local_cuda//:nccl     NCCL (dynamic)
  @local_cuda//:defs.bzl CUDA_AVAILABLE, NVCC, CUDA_VERSION
When no toolkit is found the targets exist but CUDA_AVAILABLE is False, and cuda_library()
builds nothing (the CUDA backend then reports that it was not built).
"""

def _find_nccl(rctx, cuda):
    cands = []
    env = rctx.os.environ.get("NCCL_PATH")
    if env:
        cands += [env + "/lib", env + "/lib64", env]
    cands += [cuda + "/lib", cuda + "/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
    for d in cands:
        if rctx.path(d + "/libnccl.so").exists or rctx.path(d + "/libnccl.so.2").exists:
            return d
    return None

def _find_nccl_include(rctx, cuda):
    env = rctx.os.environ.get("NCCL_PATH")
    cands = ([env + "/include"] if env else []) + [cuda + "/include", "/usr/include"]
    for d in cands:
        if rctx.path(d + "/nccl.h").exists:
            return d
    return None

def _local_cuda_impl(rctx):
    cuda = rctx.os.environ.get("CUDA_PATH", "/usr/local/cuda")
    nvcc = cuda + "/bin/nvcc"
    available = rctx.path(nvcc).exists and rctx.path(cuda + "/include/cuda_runtime.h").exists
    version = "none"
    if available:
        res = rctx.execute([nvcc, "--version"])
        for line in res.stdout.splitlines():
            if "release" in line:
                version = line.split("release ")[1].split(",")[0]
        rctx.symlink(cuda + "/include", "cuda/include")
        rctx.symlink(cuda + "/lib64", "cuda/lib64")
    nccl_lib = _find_nccl(rctx, cuda) if available else None
    nccl_inc = _find_nccl_include(rctx, cuda) if available else None
    if nccl_lib and nccl_inc:
        rctx.symlink(nccl_inc, "nccl/include")
        rctx.symlink(nccl_lib, "nccl/lib")
    have_nccl = bool(nccl_lib and nccl_inc)

    build = ['package(default_visibility = ["//visibility:public"])', ""]
    if available:
        build.append("""
cc_library(
    name = "cuda_headers",
    hdrs = glob(["cuda/include/**"]),
    includes = ["cuda/include"],
)

cc_library(
    name = "cudart",
    srcs = ["cuda/lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lrt", "-lpthread"],
    deps = [":cuda_headers"],
)

cc_library(
    name = "cublas",
    linkopts = ["-L%s/lib64", "-lcublas", "-lcublasLt", "-Wl,-rpath,%s/lib64"],
    deps = [":cuda_headers"],
)
""" % (cuda, cuda))
    else:
        build.append("""
cc_library(name = "cuda_headers")
cc_library(name = "cudart")
cc_library(name = "cublas")
""")
    if have_nccl:
        build.append("""
cc_library(
    name = "nccl",
    hdrs = ["nccl/include/nccl.h"],
    includes = ["nccl/include"],
    linkopts = ["-L%s", "-l:libnccl.so.2", "-Wl,-rpath,%s"],
    deps = [":cuda_headers"],
)
""" % (nccl_lib, nccl_lib))
    else:
        build.append('cc_library(name = "nccl")\n')
    rctx.file("BUILD", "\n".join(build))
    rctx.file("defs.bzl", "CUDA_AVAILABLE = %s\nNCCL_AVAILABLE = %s\nNVCC = %r\nCUDA_VERSION = %r\nCUDA_PATH = %r\n" % (
        available,
        have_nccl,
        nvcc,
        version,
        cuda,
    ))
    rctx.file("WORKSPACE", 'workspace(name = "local_cuda")\n')

local_cuda = repository_rule(
    implementation = _local_cuda_impl,
    environ = ["CUDA_PATH", "NCCL_PATH"],
    local = True,
)
