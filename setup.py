"""Build script for miafw's native extension ``mia_core._C``.

Project metadata lives in pyproject.toml; this file only adds the extension and its build
command. The extension is plain C++17 over numpy buffers: it never includes or links torch,
so ``pip install .`` works under build isolation with only setuptools and pybind11 (this file
must never import torch or numpy).

Like torchvision's setup.py it prints what it decided: the sources (globbed and sorted for
reproducible builds), the flags, whether OpenMP is used and why, and the CUDA status.
"""

import os
import shutil
import sys
import tempfile
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def log(msg):
    print(f"[miafw setup] {msg}", flush=True)


def cuda_decision():
    requested = os.environ.get("MIAFW_CUDA", "0").strip().lower() in {"1", "true", "yes", "on"}
    if requested:
        return ("not built: MIAFW_CUDA=1 was set, but CUDA kernels are not part of this version "
                "of miafw yet (CPU extension only)")
    return "not built (CUDA kernels are not part of this version; MIAFW_CUDA unset)"


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
    the build (tests/test_threading.py asserts it).
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
            ext.extra_compile_args = list(ext.extra_compile_args) + opt + (omp_compile if ok else [])
            ext.extra_link_args = list(ext.extra_link_args) + (omp_link if ok else [])
            log(f"extension {ext.name}: compiler={ctype}, cxx_std=17, "
                f"extra_compile_args={ext.extra_compile_args}, "
                f"extra_link_args={ext.extra_link_args}")
        log(f"CUDA: {cuda_decision()}")
        super().build_extensions()
        for ext in self.extensions:
            log(f"OpenMP symbol versions of {ext.name}: {openmp_symbol_report(self.get_ext_fullpath(ext.name))}")


# Relative, sorted paths: the same inputs in the same order on every machine.
sources = sorted(
    os.path.relpath(p, ROOT).replace(os.sep, "/")
    for p in glob(os.path.join(ROOT, CSRC, "*.cpp"))
)
if not sources:
    sys.exit(f"[miafw setup] no C++ sources found under {CSRC}/")

log(f"sources: {sources}")
log(f"include_dirs: ['{CSRC}']")
log(f"CUDA: {cuda_decision()}")

ext_modules = [
    Pybind11Extension(
        "mia_core._C",
        sources=sources,
        include_dirs=[CSRC],
        depends=sorted(os.path.relpath(p, ROOT).replace(os.sep, "/")
                       for p in glob(os.path.join(ROOT, CSRC, "kernels", "*.h"))),
        cxx_std=17,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": MiafwBuildExt}, zip_safe=False)
