"""lamscale: Learnable-Attention-Mask Transformer encoders on long multimodal sequences, at scale."""

__version__ = "0.1.0"
