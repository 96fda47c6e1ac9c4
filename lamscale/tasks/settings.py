"""Each task's own config dataclass (the `task:` section); `task.name` picks it.

Kept apart from the task modules so that loading a config imports no model or metric code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TaskConfig:
    name: str = "moment_retrieval"

    def validate(self, cfg: Any) -> None:
        """Ranges and cross-field checks against the whole run config; ConfigError names the key."""


@dataclass
class MomentRetrievalConfig(TaskConfig):
    name: str = "moment_retrieval"
    w_focal: float = 1.0
    w_l1: float = 1.0
    w_giou: float = 1.0
    w_saliency: float = 1.0
    saliency_margin: float = 0.2
    nms_iou: float = 0.7
    max_windows: int = 10

    def validate(self, cfg: Any) -> None:
        from lamscale.config import ConfigError, _check_ranges

        _check_ranges({"task.w_focal": (self.w_focal, ">=0"), "task.w_l1": (self.w_l1, ">=0"),
                       "task.w_giou": (self.w_giou, ">=0"), "task.w_saliency": (self.w_saliency, ">=0"),
                       "task.saliency_margin": (self.saliency_margin, ">=0"), "task.nms_iou": (self.nms_iou, "(0,1]"),
                       "task.max_windows": (self.max_windows, ">0")})
        m = cfg.model
        if m.lam.key == "position" and m.lam.max_len < m.max_clips + m.max_text:
            raise ConfigError(f"model.lam.max_len: {m.lam.max_len} < sequence length {m.max_clips + m.max_text} "
                              f"(max_clips + max_text)")


@dataclass
class ClassificationConfig(TaskConfig):
    name: str = "classification"
    num_classes: int = 10
    image_size: int = 28  # square images of this side (pixels)
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    patch_size: int = 4
    label_smoothing: float = 0.1
    crop_padding: int = 4  # training draw: a random crop of the image padded by this many pixels (0: none)
    hflip: bool = True  # training draw: a random horizontal flip
    # photos of any size and mode (ImageNet): convert to `channels`, train on a random resized crop
    # (area 8–100 %, aspect 3/4–4/3), evaluate on the central 87.5 % square; false: images must be exact
    resize: bool = False
    mean: float = 0.5  # pixel normalisation, after scaling to [0, 1]
    std: float = 0.5

    def validate(self, cfg: Any) -> None:
        from lamscale.config import ConfigError, _check_ranges

        _check_ranges({"task.num_classes": (self.num_classes, ">0"), "task.image_size": (self.image_size, ">0"),
                       "task.patch_size": (self.patch_size, ">0"), "task.label_smoothing": (self.label_smoothing, "[0,1)"),
                       "task.crop_padding": (self.crop_padding, ">=0"), "task.std": (self.std, ">0")})
        if self.resize and self.crop_padding:
            raise ConfigError(f"task.crop_padding: {self.crop_padding} with task.resize=true; the random resized crop "
                              f"replaces the padded crop, set task.crop_padding=0")
        if self.channels not in (1, 3):
            raise ConfigError(f"task.channels: expected 1 or 3, got {self.channels}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"task.patch_size: {self.patch_size} does not divide task.image_size={self.image_size}")
        tokens = 1 + (self.image_size // self.patch_size) ** 2
        lam = cfg.model.lam
        if lam.key == "position" and lam.max_len < tokens:
            raise ConfigError(f"model.lam.max_len: {lam.max_len} < {tokens} tokens (CLS + (image_size/patch_size)²)")


@dataclass
class GroundingConfig(TaskConfig):
    """Grounding a sentence in a whole movie (MAD): train on windows, evaluate on the full length."""

    name: str = "grounding"
    window: int = 256  # training draw: this many frames around (not always centred on) the sentence's moment
    w_focal: float = 1.0
    w_l1: float = 1.0
    w_giou: float = 1.0
    candidates: int = 1000  # best-scoring frames whose proposals go into NMS
    nms_iou: float = 0.3  # MAD's official NMS threshold
    max_proposals: int = 100  # ranked proposals kept per sentence (R@100 needs 100)
    eval_batch: int = 1  # sentences per eval forward (each against its whole movie)
    eval_window: int = 0  # > 0: sliding windows of this many frames at eval (VLG-Net/CONE), 0: one forward
    eval_stride: int = 0  # frames between sliding windows (default eval_window / 2)

    def validate(self, cfg: Any) -> None:
        from lamscale.config import ConfigError, _check_ranges

        _check_ranges({"task.window": (self.window, ">0"), "task.w_focal": (self.w_focal, ">=0"),
                       "task.w_l1": (self.w_l1, ">=0"), "task.w_giou": (self.w_giou, ">=0"),
                       "task.candidates": (self.candidates, ">0"), "task.nms_iou": (self.nms_iou, "(0,1]"),
                       "task.max_proposals": (self.max_proposals, ">0"), "task.eval_batch": (self.eval_batch, ">0"),
                       "task.eval_window": (self.eval_window, ">=0"), "task.eval_stride": (self.eval_stride, ">=0")})
        m = cfg.model
        if m.lam.layers != "none" and m.lam.key == "position":
            raise ConfigError("model.lam.key: position ties the mask to absolute positions, but grounding trains on "
                              "windows and evaluates whole movies; use model.lam.key=token")
        if m.time_embedding != "conv":
            raise ConfigError("model.time_embedding: table learns max_clips absolute positions, but grounding trains "
                              "on windows and evaluates whole movies; use model.time_embedding=conv")
        for key, frames in (("task.window", self.window), ("task.eval_window", self.eval_window)):
            if frames > m.max_clips:
                raise ConfigError(f"{key}: {frames} frames, more than model.max_clips={m.max_clips}")
        if self.eval_stride > max(self.eval_window, 0) or (self.eval_stride and not self.eval_window):
            raise ConfigError(f"task.eval_stride: {self.eval_stride} needs 0 < eval_stride ≤ task.eval_window "
                              f"({self.eval_window})")


@dataclass
class CaptioningConfig(TaskConfig):
    """Captioning (MSR-VTT: video + audio clips; MADv2 AD: a movie segment + earlier ADs as context words)."""

    name: str = "captioning"
    tokenizer: str = ""  # a tokenizers JSON file; "" = tokenizer.json beside data.train's manifest (the build's)
    max_caption: int = 24  # tokens with [BOS]/[EOS]: longer training targets are cut (and counted), generation stops here
    decoder_layers: int = 2
    cross_lam: bool = False  # a LAM (model.lam's settings, key=token) on the decoder's cross-attention too
    label_smoothing: float = 0.1
    beam_size: int = 1  # 1: greedy decoding
    length_penalty: float = 0.0  # GNMT's α: hypotheses ranked by log-probability / ((5 + length) / 6)^α
    eval_batch: int = 16
    show_captions: int = 4  # val videos whose generated and reference captions go to TensorBoard at each eval
    # MADv2 audio description: the frames around an AD and the words before it
    context_s: float = 30.0  # seconds of frames before the AD's start (the segment ends with the AD)
    prev_ads: int = 3  # earlier AD sentences given as context words (the most recent ones; ≤ model.max_text in all)
    subtitles: bool = True  # subtitles overlapping the segment as context words, after the earlier ADs

    def validate(self, cfg: Any) -> None:
        from lamscale.config import ConfigError, _check_ranges

        _check_ranges({"task.max_caption": (self.max_caption, ">0"), "task.decoder_layers": (self.decoder_layers, ">0"),
                       "task.label_smoothing": (self.label_smoothing, "[0,1)"), "task.beam_size": (self.beam_size, ">0"),
                       "task.length_penalty": (self.length_penalty, ">=0"), "task.eval_batch": (self.eval_batch, ">0"),
                       "task.show_captions": (self.show_captions, ">=0"), "task.context_s": (self.context_s, ">=0"),
                       "task.prev_ads": (self.prev_ads, ">=0")})
        if self.max_caption < 3:
            raise ConfigError(f"task.max_caption: {self.max_caption} leaves no room for a word between [BOS] and [EOS]")
        m = cfg.model
        keys = m.max_clips + m.max_text + (m.max_clips if m.audio_dim else 0)
        if m.lam.layers != "none" and m.lam.key == "position" and m.lam.max_len < keys:
            raise ConfigError(f"model.lam.max_len: {m.lam.max_len} < {keys} key positions (max_clips frames + max_text "
                              f"context words + max_clips audio frames when model.audio_dim > 0); raise it or use "
                              f"model.lam.key=token")


TASK_CONFIGS: dict[str, type[TaskConfig]] = {"moment_retrieval": MomentRetrievalConfig,
                                             "classification": ClassificationConfig, "grounding": GroundingConfig,
                                             "captioning": CaptioningConfig}
