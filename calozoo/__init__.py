"""calozoo: ML fast calorimeter simulation, from data to registered ONNX models."""

from showers import __version__

__all__ = ["__version__"]
