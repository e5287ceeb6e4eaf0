"""Builds fmn_kernels' native CPU backend with CMake (top-level CMakeLists.txt) during `pip install`.

Metadata lives in pyproject.toml. torch must already be installed in the environment that builds,
hence `pip install --no-build-isolation` (scripts/setup.sh): an isolated build would download
another multi-GB torch. When the build fails (no compiler, no cmake) the install still succeeds
with a warning and fmn_kernels falls back to the reference on CPU; set FMN_REQUIRE_CPU_KERNELS=1
to make a failed build an error.
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._cmake(target)
        except (OSError, subprocess.CalledProcessError) as e:
            if os.environ.get("FMN_REQUIRE_CPU_KERNELS", "0") not in ("", "0"):
                raise
            warnings.warn(f"fmn: building the native CPU kernels failed ({e}); fmn_kernels will use the "
                          "materialising reference on CPU", stacklevel=2)
            self._failed = True

    def _cmake(self, target):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found (pip install cmake)")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython3_EXECUTABLE={sys.executable}", f"-DFMN_OUTPUT_DIR={target.parent}",
                     f"-DFMN_OUTPUT_NAME={target.name}"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)

    def get_outputs(self):
        # A failed (optional) build leaves no library behind: nothing to copy or record.
        return [] if getattr(self, "_failed", False) else super().get_outputs()

    def copy_extensions_to_source(self):
        if not getattr(self, "_failed", False):
            super().copy_extensions_to_source()


setup(ext_modules=[CMakeExtension("fmn_kernels._cpu_attention")], cmdclass={"build_ext": CMakeBuild})
