"""Build script. The package metadata lives in pyproject.toml.

setup.py exists for the optional compiled CUDA extension ``simcse_fast._C`` (sources in csrc/).
Until csrc/ holds kernels it builds nothing: installing never needs nvcc, CUDA or a GPU.
"""

from setuptools import setup

setup()
