"""Model files, text encoders, scheduler, pipeline and CLI around the Flux transformer."""

from engine.errors import ModelFileError

__all__ = ["ModelFileError"]
