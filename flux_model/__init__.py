"""The Flux.1 transformer and autoencoder (BFL's reference semantics and parameter names; quantized Linears allowed)."""

from flux_model.autoencoder import FLUX_AE_PARAMS, AutoEncoder, AutoEncoderParams
from flux_model.model import Flux, FluxConfig, Modulations, timestep_embedding

__all__ = ["AutoEncoder", "AutoEncoderParams", "FLUX_AE_PARAMS", "Flux", "FluxConfig", "Modulations",
           "timestep_embedding"]
