"""Tiny FLUX.1 pipelines of the real architecture, built offline with random weights.

The folder written by `write_tiny_pipeline` has the diffusers layout of FLUX.1-dev (same module
names, guidance embedding, 16-channel VAE with 8x downscale and FLUX's scaling/shift factors, the
scheduler's FLUX settings), so it loads through exactly the code path of the real model:

    python -m urae.tiny OUT_DIR [--layers N --single-layers M --seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# FLUX.1 facts the tiny model keeps (docs/runtime.md, FLUX.1 constants).
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
LATENT_CHANNELS = 16

FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

_SENTENCES = [
    "a photo of a cat sitting on a red chair",
    "a watercolor painting of mountains at sunrise",
    "a blue square and a yellow circle on a white background",
    "a gradient from green to purple with soft light",
    "an ultra high resolution photograph of a city at night",
    "a close-up of a flower with dew drops, 4k, detailed",
    "three red triangles over a striped background",
    "portrait of an old man, dramatic lighting, film grain",
]


def transformer_config(layers: int = 2, single_layers: int = 2, guidance: bool = True) -> dict:
    """FluxTransformer2DModel config: inner dim 32 (2 heads of 16), RoPE axes summing to the head dim."""
    return {
        "patch_size": 1,
        "in_channels": 4 * LATENT_CHANNELS,
        "out_channels": None,
        "num_layers": layers,
        "num_single_layers": single_layers,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": guidance,
        "axes_dims_rope": [4, 6, 6],
    }


def build_transformer(layers: int = 2, single_layers: int = 2, seed: int = 0, guidance: bool = True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**transformer_config(layers, single_layers, guidance))
    # diffusers zero-initialises some output layers; random values make every layer matter in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # 4 blocks: diffusers derives the 8x VAE scale from 2 ** (blocks - 1).
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _byte_table() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer: every byte is a token, plus merges for common letter pairs."""
    from transformers import CLIPTokenizer

    chars = list(_byte_table().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for a, b in [("t", "h"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n</w>")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer():
    """A T5 tokenizer from a unigram sentencepiece model trained here on a few sentences."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 4),
        model_writer=model,
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab[0] = ("<pad>", 0.0)
    vocab[1] = ("</s>", 0.0)
    vocab[2] = ("<unk>", 0.0)
    return T5Tokenizer(vocab=vocab, extra_ids=4, model_max_length=512)


def build_text_encoders(clip_vocab: int, t5_vocab: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_vocab - 2,
            eos_token_id=clip_vocab - 1,
            pad_token_id=clip_vocab - 1,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    ).eval()
    return clip, t5


def build_pipeline(layers: int = 2, single_layers: int = 2, seed: int = 0, schnell: bool = False):
    """An in-memory FluxPipeline of the real architecture (schnell: no guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok = build_clip_tokenizer()
    tok2 = build_t5_tokenizer()
    clip, t5 = build_text_encoders(len(tok), len(tok2), seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(FLUX_SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER)),
        vae=build_vae(seed),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=build_transformer(layers, single_layers, seed, guidance=not schnell),
    )


def write_tiny_pipeline(out_dir: str | os.PathLike, layers: int = 2, single_layers: int = 2, seed: int = 0,
                        schnell: bool = False) -> Path:
    """Write a complete FLUX.1 diffusers folder; `FluxPipeline.from_pretrained(out_dir)` loads it offline."""
    from urae.io import set_default_mode

    out = Path(out_dir)
    if out.exists():  # before the build, not after it
        raise FileExistsError(f"{out} already exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(layers, single_layers, seed, schnell)
    # Build in a sibling temp folder and rename, so an interrupted build never leaves a half folder; the temp
    # folder goes whatever happens (an error, Ctrl-C, the name taken meanwhile).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        set_default_mode(tmp)
        if out.exists():
            raise FileExistsError(f"{out} already exists; choose a new folder")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_bfl_checkpoint(transformer, path: str | os.PathLike, fp8: bool = False) -> Path:
    """Write the transformer as a single-file BFL checkpoint (the layout of flux1-dev.safetensors); fp8: its
    Linear weights stored as float8_e4m3fn, as in flux1-dev-fp8.safetensors."""
    from urae.flux_keys import diffusers_to_bfl
    from urae.io import save_safetensors_atomic

    sd = diffusers_to_bfl(transformer.state_dict(), transformer.config.num_layers, transformer.config.num_single_layers)
    if fp8:
        sd = {k: v.to(torch.float8_e4m3fn) if k.endswith(".weight") and v.ndim == 2 else v for k, v in sd.items()}
    return save_safetensors_atomic(sd, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m urae.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single-layers", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schnell", action="store_true", help="no guidance embedding, schnell scheduler")
    ap.add_argument("--bfl-checkpoint", metavar="FILE", help="also write the transformer as a BFL single file")
    a = ap.parse_args(argv)
    try:
        out = write_tiny_pipeline(a.out_dir, a.layers, a.single_layers, a.seed, a.schnell)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote tiny FLUX.1 pipeline to {out}")
    if a.bfl_checkpoint:
        from diffusers import FluxTransformer2DModel

        t = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer")
        print(f"wrote BFL single-file transformer to {write_bfl_checkpoint(t, a.bfl_checkpoint)}")
    print(json.dumps({"layers": a.layers, "single_layers": a.single_layers, "seed": a.seed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
