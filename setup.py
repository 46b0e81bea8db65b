"""Build resnet_fused. The C++/CUDA extension (csrc/) is optional; see README.

The extension `resnet_fused._C` holds the ops resnet_fused::bn_act_train(_backward) and
resnet_fused::scale_shift_act:
  * a CUDAExtension (CPU + CUDA kernels) when torch is a CUDA build and a CUDA toolkit whose
    major version matches torch's is found, else a CppExtension (CPU kernels only);
  * no extension at all with RESNET_FUSED_NO_EXT=1 (the package then runs on its torch and triton
    backends).

Environment:
  RESNET_FUSED_NO_EXT=1        skip the extension
  RESNET_FUSED_NO_CUDA=1       build the CPU kernels only, even where nvcc is found
  RESNET_FUSED_REQUIRE_CUDA=1  fail instead of falling back to a CPU-only build
  CUDA_HOME / CUDA_PATH        the toolkit (default: found from nvcc on PATH, resolving wrapper
                               scripts such as /usr/local/bin/nvcc, then /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST         GPU archs (default: the visible GPUs', else "8.0;9.0+PTX")
  RESNET_FUSED_CUDNN_FRONTEND  a folder holding cudnn_frontend.h (default: build/cudnn_frontend/
                               include, which `make cudnn-frontend` fills, else the installed
                               nvidia-cudnn-frontend package); without it the CUDA build has no
                               fused cuDNN graph op (conv_bn_act_cudnn)
  MAX_JOBS                     parallel compile jobs (ninja)
Always build with --no-build-isolation: the extension must link against the installed torch.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
NAMED_ARCHS = {"ampere": ["8.0", "8.6"], "ada": ["8.9"], "hopper": ["9.0"],
               "blackwell": ["10.0", "12.0"], "turing": ["7.5"], "volta": ["7.0"]}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"resnet_fused setup: {msg}", file=sys.stderr)


def _is_toolkit(home: str) -> bool:
    """A CUDA toolkit root: nvcc, the runtime headers and libcudart."""
    if not (os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))):
        return False
    libs = [os.path.join(home, d, "libcudart.so*") for d in ("lib64", "lib")]
    libs.append(os.path.join(home, "targets", "*", "lib", "libcudart.so*"))
    return any(glob.glob(pattern) for pattern in libs)


def _nvcc_candidates(nvcc: str):
    """The toolkit roots an nvcc on PATH may belong to, following symlinks and wrapper scripts
    (e.g. /usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc)."""
    real = os.path.realpath(nvcc)
    yield os.path.dirname(os.path.dirname(real))
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return
    if head.startswith(b"#!"):
        for path in re.findall(rb"(/[^\s\"']+/bin/nvcc)\b", head):
            yield os.path.dirname(os.path.dirname(os.path.realpath(path.decode())))


def find_cuda_home() -> str | None:
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if not _is_toolkit(explicit):
            raise SystemExit(f"resnet_fused setup: CUDA_HOME/CUDA_PATH={explicit!r} is not a CUDA "
                             f"toolkit (expected bin/nvcc, include/cuda_runtime.h, libcudart)")
        return explicit
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += list(_nvcc_candidates(nvcc))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if _is_toolkit(home):
            return home
    return None


def nvcc_version(home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    import torch
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCHS


def describe_archs(archs: str) -> str:
    """'8.0;9.0+PTX' -> 'sm_80,sm_90,compute_90' (what the fat binary holds)."""
    names = []
    for item in re.split(r"[;\s,]+", archs.strip()):
        if not item:
            continue
        ptx = item.lower().endswith("+ptx")
        base = item[:-4] if ptx else item
        versions = NAMED_ARCHS.get(base.lower(), [base])
        for v in versions:
            num = v.replace(".", "")
            names.append(f"sm_{num}")
        if ptx:
            names.append(f"compute_{versions[-1].replace('.', '')}")
    return ",".join(names)


def _cudnn_frontend_candidates():
    explicit = os.environ.get("RESNET_FUSED_CUDNN_FRONTEND", "").strip()
    if explicit:
        yield explicit
        return
    yield os.path.join(ROOT, "build", "cudnn_frontend", "include")
    try:
        import importlib.metadata
        for f in importlib.metadata.files("nvidia-cudnn-frontend") or ():
            if str(f).replace(os.sep, "/").endswith("include/cudnn_frontend.h"):
                yield os.path.dirname(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass


def _header_dir(header: str, cuda_home: str) -> str | None:
    """The folder holding `header`: the NVIDIA wheels torch depends on (nvidia/cudnn,
    nvidia/cu13, ...), else the toolkit's include/."""
    dirs = []
    try:
        import nvidia
        for root in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    for d in [*dirs, os.path.join(cuda_home, "include")]:
        if os.path.isfile(os.path.join(d, header)):
            return d
    return None


def cudnn_frontend(cuda_home: str) -> tuple[list[str], str]:
    """(include dirs, version) for the fused cuDNN graph op, or ([], why not)."""
    found = next((d for d in _cudnn_frontend_candidates()
                  if os.path.isfile(os.path.join(d, "cudnn_frontend.h"))), None)
    if found is None:
        return [], ("no cuDNN frontend headers (pip install nvidia-cudnn-frontend, or set "
                    "RESNET_FUSED_CUDNN_FRONTEND to a folder holding cudnn_frontend.h)")
    dirs = [found]
    for header in ("cudnn.h", "nvrtc.h"):  # the frontend includes both
        d = _header_dir(header, cuda_home)
        if d is None:
            return [], f"no {header} (in the NVIDIA wheels torch uses, or the toolkit's include/)"
        dirs += [d] if d not in dirs else []
    with open(os.path.join(found, "cudnn_frontend_version.h")) as f:
        parts = dict(re.findall(r"#define CUDNN_FRONTEND_(MAJOR|MINOR|PATCH)_VERSION (\d+)",
                                f.read()))
    version = ".".join(parts.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH"))
    return dirs, version


def _write_if_changed(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def extension_build():
    """(ext_modules, cmdclass) for this machine, or ([], {}) when the extension is skipped."""
    if _flag("RESNET_FUSED_NO_EXT"):
        _log("RESNET_FUSED_NO_EXT is set: skipping the C++/CUDA extension")
        return [], {}
    import torch

    with_cuda, cuda_home, cuda_version = False, None, ""
    if torch.version.cuda and not _flag("RESNET_FUSED_NO_CUDA"):
        cuda_home = find_cuda_home()
        version = nvcc_version(cuda_home) if cuda_home else None
        why = None
        if cuda_home is None:
            why = "no CUDA toolkit found (set CUDA_HOME)"
        elif version is None:
            why = f"could not run {cuda_home}/bin/nvcc --version"
        elif version.split(".")[0] != torch.version.cuda.split(".")[0]:
            why = (f"nvcc {version} at {cuda_home} does not match torch's CUDA "
                   f"{torch.version.cuda} (major version)")
        if why is None:
            with_cuda, cuda_version = True, version
            os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        elif _flag("RESNET_FUSED_REQUIRE_CUDA"):
            raise SystemExit(f"resnet_fused setup: RESNET_FUSED_REQUIRE_CUDA is set but {why}")
        else:
            _log(f"building CPU kernels only: {why}")
    elif _flag("RESNET_FUSED_REQUIRE_CUDA"):
        raise SystemExit("resnet_fused setup: RESNET_FUSED_REQUIRE_CUDA is set but "
                         + ("RESNET_FUSED_NO_CUDA is set" if torch.version.cuda
                            else f"torch {torch.__version__} is not a CUDA build"))

    archs, frontend_dirs, frontend = "", [], ""
    if with_cuda:
        frontend_dirs, frontend = cudnn_frontend(cuda_home)
        if not frontend_dirs:
            _log(f"no fused cuDNN graph op (conv_bn_act_cudnn): {frontend}")
            frontend = ""
        else:
            _log(f"fused cuDNN graph op with the cuDNN frontend {frontend} ({frontend_dirs[0]})")
        archs = arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # no GPU here to detect them from
        _log(f"building CPU + CUDA kernels with {cuda_home} (nvcc {cuda_version}) for "
             f"TORCH_CUDA_ARCH_LIST={archs!r}")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    gen_dir = os.path.join(ROOT, "build", "generated")
    _write_if_changed(os.path.join(gen_dir, "resnet_fused_build_info.h"),
                      "// Generated by setup.py: what this build of resnet_fused._C holds.\n"
                      f"#define RESNET_FUSED_CUDA_ARCHS \"{describe_archs(archs)}\"\n"
                      f"#define RESNET_FUSED_CUDA_VERSION \"{cuda_version}\"\n"
                      f"#define RESNET_FUSED_TORCH_VERSION \"{torch.__version__}\"\n"
                      f"#define RESNET_FUSED_CUDNN_FRONTEND \"{frontend}\"\n")
    sources = ["csrc/resnet_fused.cpp", "csrc/autograd.cpp", "csrc/bn_eval.cpp",
               *sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))]
    # -fopenmp: at::parallel_for is inline and runs serially without it. The link then needs
    # libgomp.so.1, which resolves to the one torch has loaded (one OpenMP runtime, one thread
    # count: torch.set_num_threads applies to our kernels too).
    # -g0: no debug info (Python's CFLAGS carry -g: 4x the library's size and compile time)
    cxx = ["-O3", "-g0", "-fopenmp"]
    kwargs = dict(include_dirs=[gen_dir, os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        cxx.append("-DRESNET_FUSED_WITH_CUDA")
        if frontend_dirs:  # host code; the frontend dlopens the libcudnn torch has loaded
            sources.append("csrc/cuda/cudnn_fused.cpp")
            kwargs["include_dirs"] += frontend_dirs
            cxx.append("-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING")
            kwargs["extra_link_args"].append("-ldl")
        ext = CUDAExtension("resnet_fused._C", sources,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3",
                                                                     "-DRESNET_FUSED_WITH_CUDA"]},
                            **kwargs)
    else:
        ext = CppExtension("resnet_fused._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import its helpers)
    ext_modules, cmdclass = extension_build()
    setup(
        name="resnet_fused",
        version="0.1.0",
        description="Drop-in torchvision ResNet with fused conv+BN+residual+ReLU kernels",
        packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
        # Supported and tested (make test: the newest; make test-compat: the oldest, the GPU
        # machine's).
        python_requires=">=3.11,<3.13",
        install_requires=["torch>=2.11,<2.15", "torchvision>=0.26,<0.30"],
        extras_require={"triton": ["triton>=3.6,<3.9"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
