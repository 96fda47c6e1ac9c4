"""LAM Transformer encoder: the learnable attention mask, attention backends, the encoder."""
from lamscale.model.attention import Attention, attention
from lamscale.model.encoder import Encoder, lam_layer_indices
from lamscale.model.lam import LowRankMask, MaskGenerator

__all__ = ["Attention", "Encoder", "LowRankMask", "MaskGenerator", "attention", "lam_layer_indices"]
