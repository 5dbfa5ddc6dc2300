"""Model files, text encoders, scheduler, pipeline and CLI around the Flux transformer."""

from engine.errors import ModelFileError
from engine.loading import load_ae, load_flux

__all__ = ["ModelFileError", "load_ae", "load_flux"]
