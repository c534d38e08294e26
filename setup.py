"""Build script: the Python package, plus (later) the optional CUDA extension compiled by nvcc."""
from setuptools import setup

setup()
