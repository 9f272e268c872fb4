"""Image generation with the URAE runtime: one code path for inference and for training samples.

`generate` runs text-to-image (or image-to-image when `init_image` is set) under the high-resolution
settings; `two_stage` is the SDEdit-style hi-res path: a draft at ~1 MP, upsampled, then refined at
the target size. Latents are decoded by `urae.vae_decode.decode`: exact, and split into row chunks
above 2048² so a 4096² decode fits beside the model on a 24 GB card.
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from urae.common import has_guidance_embedding
from urae.flow import unpack_latents
from urae.runtime import ROPE_KEYS, HighResSettings, apply_highres, check_resolution
from urae.vae_decode import decode


@dataclasses.dataclass
class SampleRequest:
    prompt: str
    width: int = 1024
    height: int = 1024
    seed: int = 0
    steps: int | None = None  # None: 28 for dev, 4 for schnell
    guidance: float | None = None  # embedded guidance; None: 3.5 for dev; schnell has no guidance embedding
    cfg_scale: float = 1.0  # true classifier-free guidance; > 1 runs the model twice per step
    negative_prompt: str | None = None  # used only with cfg_scale > 1 ("" when unset, as sd-scripts)
    max_sequence_length: int | None = None  # None: 512 dev, 256 schnell
    init_image: Image.Image | None = None
    strength: float = 0.6

    def validate(self):
        check_resolution(self.width, self.height)
        if self.init_image is not None and not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not self.cfg_scale >= 1:
            raise ValueError(f"cfg_scale must be >= 1 (1 = no CFG), got {self.cfg_scale}")


def model_defaults(transformer) -> dict:
    """Per-variant defaults: FLUX.1-dev is guidance-distilled (has a guidance embedding), schnell is not."""
    if has_guidance_embedding(transformer):
        return {"variant": "dev", "steps": 28, "guidance": 3.5, "max_sequence_length": 512}
    return {"variant": "schnell", "steps": 4, "guidance": 0.0, "max_sequence_length": 256}


def fill_defaults(req: SampleRequest, transformer) -> SampleRequest:
    d = model_defaults(transformer)
    return dataclasses.replace(
        req,
        steps=req.steps if req.steps is not None else d["steps"],
        guidance=req.guidance if req.guidance is not None else d["guidance"],
        max_sequence_length=req.max_sequence_length or d["max_sequence_length"],
    )


def decode_to_image(pipe, tokens: torch.Tensor, width: int, height: int, split: bool | None = None) -> Image.Image:
    """Packed latents from the pipeline -> PIL image (FLUX's unscale/unshift, then the exact VAE decode)."""
    vae = pipe.vae
    z = unpack_latents(tokens, height // 8, width // 8)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    pixels = decode(vae, z, split=split, device=pipe._execution_device)
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def generate(pipe, req: SampleRequest, settings: HighResSettings | None = None, prompt_embeds=None,
             on_step=None, split_vae: bool | None = None, negative_embeds=None) -> Image.Image:
    """One image. `prompt_embeds=(t5_seq, clip_pooled)` skips the text encoders (training samples); with
    cfg_scale > 1 they need `negative_embeds` of the same form."""
    from diffusers import FluxImg2ImgPipeline

    req = fill_defaults(req, pipe.transformer)
    req.validate()
    kwargs = dict(
        height=req.height,
        width=req.width,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance,
        max_sequence_length=req.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="latent",  # decoded below, exactly and in row chunks when large
    )
    if prompt_embeds is not None:
        kwargs["prompt_embeds"], kwargs["pooled_prompt_embeds"] = prompt_embeds
    else:
        kwargs["prompt"] = req.prompt
    if req.cfg_scale > 1:  # diffusers' true CFG: (1 - s) * negative + s * positive at every step
        kwargs["true_cfg_scale"] = req.cfg_scale
        if prompt_embeds is None:
            kwargs["negative_prompt"] = req.negative_prompt or ""
        elif negative_embeds is None:
            raise ValueError("cfg_scale > 1 with precomputed prompt embeddings needs negative_embeds")
        else:
            kwargs["negative_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"] = negative_embeds
    if on_step is not None:
        def callback(_pipe, _i, _t, tensors):
            on_step()
            return tensors

        kwargs["callback_on_step_end"] = callback
    runner = pipe
    if req.init_image is not None:
        runner = FluxImg2ImgPipeline(**pipe.components)  # shares the modules, no copies
        kwargs["image"] = req.init_image.convert("RGB").resize((req.width, req.height), Image.LANCZOS)
        kwargs["strength"] = req.strength
    runner.set_progress_bar_config(disable=True)
    with apply_highres(runner, settings):
        tokens = runner(**kwargs).images
    return decode_to_image(pipe, tokens, req.width, req.height, split_vae)


def draft_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """The first-stage size: same aspect ratio, long side `long_side`, multiples of 16."""
    s = long_side / max(width, height)
    return max(16, round(width * s / 16) * 16), max(16, round(height * s / 16) * 16)


def steps_for(req: SampleRequest, transformer, two_stage: bool) -> int:
    """Denoising steps a request runs (img2img runs only the strength share of them)."""
    n = fill_defaults(req, transformer).steps
    refine = max(1, int(n * req.strength)) if (two_stage or req.init_image is not None) else n
    return refine + (n if two_stage and req.init_image is None else 0)


def two_stage(pipe, req: SampleRequest, init_resolution: int, settings: HighResSettings,
              draft_settings: HighResSettings | None = None, on_step=None,
              split_vae: bool | None = None) -> Image.Image:
    """SDEdit-style hi-res: draft at `init_resolution` (long side), upsample, refine at the target size."""
    req.validate()
    w, h = draft_size(req.width, req.height, init_resolution)
    if draft_settings is None:  # the draft's size decides NTK/attention; the timestep schedule is the user's
        rope = {k: getattr(settings, k) for k in ROPE_KEYS}  # the same position scheme at the draft's grid
        draft_settings = HighResSettings.for_resolution(w, h, shift=settings.shift, dynamic_shift=settings.dynamic_shift,
                                                        **rope)
    draft = generate(pipe, dataclasses.replace(req, width=w, height=h, init_image=None), draft_settings,
                     on_step=on_step)
    refine = dataclasses.replace(req, init_image=draft.resize((req.width, req.height), Image.LANCZOS))
    return generate(pipe, refine, settings, on_step=on_step, split_vae=split_vae)
