"""calozoo: ML fast calorimeter simulation, from data to registered ONNX models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("calozoo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
