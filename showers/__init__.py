"""calozoo's data layer: readout geometry, file formats, the built-in simulator, transforms and
physics observables of calorimeter showers."""

from importlib.metadata import PackageNotFoundError, version

from showers.errors import ShowerDataError
from showers.readout import Layer, Readout, get_readout, list_readouts

__all__ = ["Layer", "Readout", "ShowerDataError", "get_readout", "list_readouts"]

# the calozoo distribution's version, here in the bottom package so that every package can record it
try:
    __version__ = version("calozoo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
