"""The captioning model: the LAM encoder over [frames | audio | context words], a decoder over its states."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from lamscale.config import ModelConfig
from lamscale.model.decoder import Decoder
from lamscale.model.encoder import Encoder
from lamscale.model.generate import beam_search, greedy


class CaptionModel(nn.Module):
    """Training (module.train()): logits of each next caption token (teacher forcing). Eval: generated ids,
    greedy or beam search as the task config says, so the trainer's eval forward is the generation."""

    def __init__(self, cfg: ModelConfig, vocab: int, decoder_layers: int, max_caption: int, cross_lam: bool,
                 beam_size: int = 1, length_penalty: float = 0.0):
        super().__init__()
        # context words are embedded with the decoder's own word table, so the encoder's text side is dim-wide
        self.encoder = Encoder(dataclasses.replace(cfg, text_dim=cfg.dim))
        self.decoder = Decoder(vocab, cfg.dim, decoder_layers, cfg.heads, cfg.ffn_mult, cfg.dropout, max_caption,
                               cfg.lam if cross_lam else None)
        self.max_caption, self.beam_size, self.alpha = max_caption, beam_size, length_penalty

    def encode(self, video: Tensor, video_valid: Tensor, audio: Tensor | None, audio_valid: Tensor | None,
               context: Tensor, context_valid: Tensor) -> tuple[Tensor, Tensor]:
        words = self.decoder.embed(context)
        return self.encoder(video, video_valid, words, context_valid, audio, audio_valid, every_token=True)

    def forward(self, video: Tensor, video_valid: Tensor, audio: Tensor | None, audio_valid: Tensor | None,
                context: Tensor, context_valid: Tensor, caption: Tensor) -> Tensor:
        memory, valid = self.encode(video, video_valid, audio, audio_valid, context, context_valid)
        if self.training:
            return self.decoder(caption[:, :-1], memory, valid)
        with torch.no_grad():
            if self.beam_size > 1:
                return beam_search(self.decoder, memory, valid, self.max_caption, self.beam_size, self.alpha)
            return greedy(self.decoder, memory, valid, self.max_caption)
