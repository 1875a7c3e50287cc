"""cuda_library(): compile .cu files with the local nvcc and link them into a cc_library.

Each .cu is compiled on its own (no relocatable device code, so no device-link step) for the
architectures in CUDA_ARCHS: Hopper with its arch-specific features (sm_90a: wgmma, setmaxnreg)
and Ampere (sm_80), plus PTX for compute_90 so that newer cards can JIT. The objects are
position independent and named .pic.o, so cc_library takes them as they are, for static and
dynamic links alike. Include paths and headers come from `deps` (their CcInfo), so .cu files
include project headers exactly as C files do.

Where the repository rule found no CUDA toolkit, cuda_library() makes a cc_library from
`fallback_srcs` instead (C code that reports the backend as not built).
"""

load("@local_cuda//:defs.bzl", "CUDA_AVAILABLE", "NVCC")

CUDA_ARCHS = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=compute_90",
]

def _cuda_objects_impl(ctx):
    infos = [d[CcInfo] for d in ctx.attr.deps if CcInfo in d]
    cc = cc_common.merge_cc_infos(cc_infos = infos).compilation_context
    inc_flags = ["-I."]
    for inc in cc.includes.to_list() + cc.quote_includes.to_list():
        inc_flags.append("-I" + inc)
    for inc in cc.system_includes.to_list():
        inc_flags += ["-isystem", inc]
    defines = ["-D" + d for d in cc.defines.to_list()]
    hdrs = depset(ctx.files.hdrs, transitive = [cc.headers])
    outs = []
    for src in ctx.files.srcs:
        out = ctx.actions.declare_file("_cuda_objs/%s/%s.pic.o" % (ctx.label.name, src.path.replace("/", "_")))
        args = ctx.actions.args()
        args.add_all([
            "-c",
            src.path,
            "-o",
            out.path,
            "-std=c++17",
            "-O3",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "-Xcompiler",
            "-fPIC,-Wall",
            "-Werror",
            "all-warnings",
        ])
        args.add_all(CUDA_ARCHS)
        args.add_all(inc_flags)
        args.add_all(defines)
        args.add_all(ctx.attr.copts)
        ctx.actions.run(
            executable = NVCC,
            arguments = [args],
            inputs = depset([src], transitive = [hdrs]),
            outputs = [out],
            mnemonic = "NvccCompile",
            progress_message = "nvcc %s" % src.short_path,
            use_default_shell_env = True,
        )
        outs.append(out)
    return [DefaultInfo(files = depset(outs))]

_cuda_objects = rule(
    implementation = _cuda_objects_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
    },
)

def cuda_library(name, srcs, hdrs = [], cuda_hdrs = [], deps = [], copts = [], fallback_srcs = [], **kwargs):
    """A cc_library whose .cu sources are compiled by nvcc.

    srcs: .cu files (and .c files, compiled by the C toolchain as usual).
    hdrs: public headers of the library (C headers).
    cuda_hdrs: private .cuh headers included by the .cu files.
    """
    cu = [s for s in srcs if s.endswith(".cu")]
    other = [s for s in srcs if not s.endswith(".cu")]
    if CUDA_AVAILABLE:
        _cuda_objects(
            name = name + "_nvcc",
            srcs = cu,
            hdrs = hdrs + cuda_hdrs,
            deps = deps + ["@local_cuda//:cuda_headers"],
            copts = copts,
        )
        native.cc_library(
            name = name,
            srcs = other + [":" + name + "_nvcc"],
            hdrs = hdrs,
            deps = deps + ["@local_cuda//:cudart"],
            linkstatic = 1,
            alwayslink = 1,
            **kwargs
        )
    else:
        native.cc_library(
            name = name,
            srcs = fallback_srcs,
            hdrs = hdrs,
            deps = deps,
            **kwargs
        )
