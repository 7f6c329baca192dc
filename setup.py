"""Build script for miafw's native extensions: ``mia_core._C`` (the kernels) and, with
``MIAFW_CUDA_EMU=1``, ``mia_core._cuda_emu`` (the CUDA twins' sources on a host emulation of the
CUDA runtime, for the tests only; see csrc/cuda_emu/host_cuda.h).

Project metadata lives in pyproject.toml; this file only adds the extension and its build
command. The extension is plain C++17 over numpy buffers: it never includes or links torch,
so ``pip install .`` works under build isolation with only setuptools and pybind11 (this file
must never import torch or numpy).

Like torchvision's setup.py it prints what it decided: the sources (globbed and sorted for
reproducible builds), the flags, whether OpenMP is used and why, the CUDA status and whether
the CUDA emulation is built.
"""

import os
import shutil
import sys
import tempfile
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# Compile an extension's sources in parallel (one job per CPU; NPY_NUM_BUILD_JOBS overrides):
# the pybind11 translation units dominate the build time.
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def log(msg):
    print(f"[miafw setup] {msg}", flush=True)


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_requested():
    return _env_flag("MIAFW_CUDA")


def find_nvcc():
    """(nvcc path, CUDA home) or (None, None): CUDA_HOME/CUDA_PATH's bin/nvcc, else nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand, home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, None
    # /usr/local/bin/nvcc may be a link or a wrapper script: ask nvcc where it lives.
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    try:
        import subprocess

        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ _HERE_="):
                home = os.path.dirname(os.path.realpath(line.split("=", 1)[1].strip()))
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return nvcc, home


def cuda_libdir(home):
    """Directory holding libcudart.so under a CUDA home (None if not found)."""
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if glob(os.path.join(d, "libcudart.so*")):
            return d
    return None


def cuda_config():
    """(build CUDA?, reason, nvcc, libdir). CUDA is built only with MIAFW_CUDA=1 and nvcc found."""
    if not _cuda_requested():
        return False, "not built (MIAFW_CUDA unset; set MIAFW_CUDA=1 with nvcc available to build the CUDA twins)", None, None
    nvcc, home = find_nvcc()
    if nvcc is None:
        return (False, "WARNING: CUDA was requested (MIAFW_CUDA=1) but nvcc was not found (neither "
                "$CUDA_HOME/bin/nvcc nor nvcc on PATH); building the CPU-only extension", None, None)
    libdir = cuda_libdir(home)
    if libdir is None:
        return (False, f"WARNING: CUDA was requested (MIAFW_CUDA=1) and nvcc was found at {nvcc}, but "
                f"libcudart.so was not found under {home}; building the CPU-only extension", None, None)
    return True, f"yes (MIAFW_CUDA=1, nvcc {nvcc}, libcudart in {libdir})", nvcc, libdir


CUDA_BUILD, CUDA_REASON, NVCC, CUDA_LIBDIR = cuda_config()

# A100 (sm_80) and H100 (sm_90) machine code, plus compute_90 PTX for newer GPUs to JIT.
NVCC_GENCODE = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
]
# --fmad=false: no multiply-add contraction, so device code performs the same correctly rounded
# operations as the CPU kernels (csrc/kernels/quant_elem.h is compiled for both).
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false", "-Xcompiler",
              "-fPIC"] + NVCC_GENCODE


def cuda_decision():
    return CUDA_REASON


def openmp_flags(compiler_type):
    """(compile_args, link_args) that enable OpenMP for this compiler family."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


OPENMP_PROBE = r"""
#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel
  {
#pragma omp atomic
    n += omp_get_thread_num() >= 0;
  }
  return n > 0 ? 0 : 1;
}
"""


def probe_openmp(compiler, compile_args, link_args):
    """Compile AND link a tiny OpenMP program; return (ok, reason)."""
    tmp = tempfile.mkdtemp(prefix="miafw-omp-")
    try:
        src = os.path.join(tmp, "omp_probe.cpp")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
        compiler.link_executable(objs, "omp_probe", output_dir=tmp, extra_postargs=link_args)
        return True, "compiler and linker accept " + " ".join(compile_args)
    except Exception as exc:  # CompileError, LinkError, missing omp.h / libomp, ...
        return False, f"{type(exc).__name__}: {exc}".strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def openmp_symbol_report(path):
    """One line: the newest GOMP_/OMP_ symbol versions the built library imports.

    torch's bundled libgomp exports up to GOMP_5.0 / OMP_5.0, and only one libgomp is loaded per
    process, so anything newer would fail to resolve beside torch. Informational: never fails
    the build (tests/kernels/test_openmp_threading.py asserts it).
    """
    import re
    import subprocess

    tool = shutil.which("readelf")
    if tool is None:
        return "not checked (readelf not found)"
    try:
        out = subprocess.run([tool, "--dyn-syms", "-W", path], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"not checked ({exc})"
    newest = {}
    for fam, ver in re.findall(r"@{1,2}((?:GOMP|OMP))_([0-9.]+)", out):
        key = tuple(int(x) for x in ver.split("."))
        newest[fam] = max(newest.get(fam, key), key)
    if not newest:
        return "none imported"
    parts = [f"{fam}_{'.'.join(map(str, v))}" for fam, v in sorted(newest.items())]
    ok = all(v <= (5, 0) for v in newest.values())
    return f"newest {', '.join(parts)} ({'OK: <= GOMP_5.0/OMP_5.0' if ok else 'WARNING: newer than GOMP_5.0/OMP_5.0, which torch bundles'})"


class MiafwBuildExt(build_ext):
    """pybind11's build_ext plus an OpenMP probe; prints the final decision and flags."""

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        omp_compile, omp_link = openmp_flags(ctype)
        ok, reason = probe_openmp(self.compiler, omp_compile, omp_link)
        if ok:
            log(f"OpenMP: yes ({reason})")
        else:
            log("WARNING: OpenMP: no -- the kernels will run single-threaded. "
                f"Probe with {' '.join(omp_compile)} failed: {reason}")
        opt = ["/O2"] if ctype == "msvc" else ["-O3"]
        for ext in self.extensions:
            use_omp = ok and ext.name != EMU_NAME  # the emulation runs on one thread
            ext.extra_compile_args = list(ext.extra_compile_args) + opt + (omp_compile if use_omp else [])
            ext.extra_link_args = list(ext.extra_link_args) + (omp_link if use_omp else [])
            log(f"extension {ext.name}: compiler={ctype}, cxx_std=17, "
                f"extra_compile_args={ext.extra_compile_args}, "
                f"extra_link_args={ext.extra_link_args}")
        log(f"CUDA: {cuda_decision()}")
        log(f"CUDA emulation ({EMU_NAME}): {EMU_REASON}")
        stamp, config = self._force_on_config_change()
        if CUDA_BUILD:
            self._compile_cuda()
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:  # only after a successful build
            f.write(config)
        for ext in self.extensions:
            log(f"OpenMP symbol versions of {ext.name}: {openmp_symbol_report(self.get_ext_fullpath(ext.name))}")

    def run(self):
        # In-place and editable builds put the libraries in the source tree (build_extensions
        # runs with inplace switched off, so this is decided here).
        if not EMU_BUILD and (self.inplace or getattr(self, "editable_mode", False)):
            self._drop_stale_emulation()
        super().run()

    def _drop_stale_emulation(self):
        """Without MIAFW_CUDA_EMU=1, remove the mia_core._cuda_emu an earlier in-place build
        left in the source tree: it would no longer be rebuilt, so tests would run stale twins."""
        path = os.path.join(ROOT, self.get_ext_filename(EMU_NAME))
        if os.path.exists(path):
            log(f"CUDA emulation: removing the stale {os.path.relpath(path, ROOT)} "
                "(MIAFW_CUDA_EMU unset)")
            os.remove(path)

    def _force_on_config_change(self):
        """Rebuild everything when MIAFW_CUDA's outcome changed since the last build: the
        sources' timestamps do not change with it, so distutils would keep the stale library."""
        stamp = os.path.join(self.build_temp, "miafw_build_config")
        config = f"cuda={int(CUDA_BUILD)}\n"
        try:
            with open(stamp) as f:
                previous = f.read()
        except OSError:
            previous = None
        if previous != config:
            if previous is not None or any(os.path.exists(self.get_ext_fullpath(e.name))
                                           for e in self.extensions):
                log(f"build configuration changed ({(previous or 'unknown').strip()} -> "
                    f"{config.strip()}): rebuilding")
            self.force = True
        return stamp, config

    def _compile_cuda(self):
        """nvcc-compile csrc/cuda/*.cu to objects and hand them to the linker as extra_objects."""
        import subprocess

        out_dir = os.path.join(self.build_temp, "miafw_cuda")
        os.makedirs(out_dir, exist_ok=True)
        objects = []
        for src in cuda_sources:
            obj = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".o")
            deps = [src] + cuda_headers + kernel_headers  # .cu files include kernels/*.h too
            if self.force or not os.path.exists(obj) or \
                    os.path.getmtime(obj) < max(os.path.getmtime(d) for d in deps):
                cmd = [NVCC] + NVCC_FLAGS + ["-I", CSRC, "-c", src, "-o", obj]
                log("nvcc: " + " ".join(cmd))
                subprocess.run(cmd, check=True)
            objects.append(obj)
        for ext in self.extensions:
            if ext.name == MAIN_NAME:
                ext.extra_objects = list(ext.extra_objects or []) + objects


# Relative, sorted paths: the same inputs in the same order on every machine.
sources = sorted(
    os.path.relpath(p, ROOT).replace(os.sep, "/")
    for p in glob(os.path.join(ROOT, CSRC, "*.cpp"))
)
if not sources:
    sys.exit(f"[miafw setup] no C++ sources found under {CSRC}/")


def _globbed(pattern):
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, "/")
                  for p in glob(os.path.join(ROOT, CSRC, pattern)))


# CUDA twins: csrc/cuda/*.cu (nvcc) and their binding csrc/cuda/*.cpp (the C++ compiler).
cuda_sources = _globbed(os.path.join("cuda", "*.cu")) if CUDA_BUILD else []
cuda_headers = (_globbed(os.path.join("cuda", "*.h")) + _globbed(os.path.join("cuda", "*.cuh"))
                if CUDA_BUILD else [])
kernel_headers = _globbed(os.path.join("kernels", "*.h"))
ext_kwargs = {}
if CUDA_BUILD:
    sources = sources + _globbed(os.path.join("cuda", "*.cpp"))
    ext_kwargs = dict(
        define_macros=[("MIAFW_WITH_CUDA", "1")],
        library_dirs=[CUDA_LIBDIR],
        runtime_library_dirs=[CUDA_LIBDIR],
        libraries=["cudart"],
    )

log(f"sources: {sources}")
log(f"include_dirs: ['{CSRC}']")
log(f"CUDA: {cuda_decision()}")
if CUDA_BUILD:
    log(f"CUDA sources: {cuda_sources}")
    log(f"nvcc flags: {NVCC_FLAGS}")
    log(f"CUDA link: -L{CUDA_LIBDIR} -Wl,-rpath,{CUDA_LIBDIR} -lcudart, define MIAFW_WITH_CUDA=1")

MAIN_NAME = "mia_core._C"
EMU_NAME = "mia_core._cuda_emu"

ext_modules = [
    Pybind11Extension(
        MAIN_NAME,
        sources=sources,
        include_dirs=[CSRC],
        depends=kernel_headers + cuda_headers,
        cxx_std=17,
        **ext_kwargs,
    ),
]

# The CUDA twins' own sources compiled as C++ against a host emulation of the CUDA runtime
# (csrc/cuda_emu/host_cuda.h), so the tests run the twins' code without a GPU. Never a backend
# (mia_core.kernels does not use it), so it is built only when asked for: it adds about a
# quarter to the build's CPU time (five more translation units). CI sets MIAFW_CUDA_EMU=1
# (.ci/run).
EMU_BUILD = _env_flag("MIAFW_CUDA_EMU")
if EMU_BUILD:
    EMU_REASON = "yes (MIAFW_CUDA_EMU=1)"
    emu_sources = _globbed(os.path.join("cuda_emu", "*.cpp")) + [f"{CSRC}/cuda/bind_cuda.cpp"]
    emu_depends = (_globbed(os.path.join("cuda", "*.cu")) + _globbed(os.path.join("cuda", "*.h")) +
                   _globbed(os.path.join("cuda", "*.cuh")) +
                   _globbed(os.path.join("cuda_emu", "*.h")) + kernel_headers +
                   [f"{CSRC}/bind_util.h"])
    ext_modules.append(Pybind11Extension(
        EMU_NAME,
        sources=emu_sources,
        include_dirs=[CSRC],
        depends=emu_depends,
        define_macros=[("MIAFW_CUDA_EMULATION", "1")],
        extra_compile_args=["-ffp-contract=off"] if os.name != "nt" else [],
        cxx_std=17,
    ))
    log(f"CUDA emulation ({EMU_NAME}): {EMU_REASON}; sources: {emu_sources}")
else:
    EMU_REASON = ("not built (MIAFW_CUDA_EMU unset; set MIAFW_CUDA_EMU=1 to build the host "
                  "emulation that tests/kernels/test_cuda_emulated.py runs)")
    log(f"CUDA emulation ({EMU_NAME}): {EMU_REASON}")

setup(ext_modules=ext_modules, cmdclass={"build_ext": MiafwBuildExt}, zip_safe=False)
