"""Builds the private native loader core, sllmd._native, from csrc/ with pybind11."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

native = Pybind11Extension(
    "sllmd._native",
    sorted(["csrc/bindings.cpp", "csrc/chunk_pool.cpp", "csrc/crc32c.cpp",
            "csrc/host_buffer.cpp", "csrc/host_memory.cpp",
            "csrc/load_task.cpp"]),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden"],
    libraries=["pthread"],
)

setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
