"""calozoo's data layer: readout geometry, file formats, the built-in simulator, transforms and
physics observables of calorimeter showers."""

from showers.errors import ShowerDataError
from showers.readout import Layer, Readout, get_readout, list_readouts

__all__ = ["Layer", "Readout", "ShowerDataError", "get_readout", "list_readouts"]
