"""Tiny random-weight CLIP and DINOv2 folders of the real architectures, for offline tests and demos of the
model-based metrics (they load through the same `from_pretrained` path as the hub models)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def write_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from urae.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer()
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def write_tiny_dinov2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=14)).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out
