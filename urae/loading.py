"""Load FLUX.1 from a diffusers folder, a hub id, or a single-file BFL transformer checkpoint.

Every path a user can pass goes through `load_pipeline` / `load_transformer`; bad input becomes a
`ModelLoadError` that names the file and what was expected, never a traceback from deep in diffusers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from urae.common import dtype_from_name, parse_bool
from urae.flux_keys import bfl_to_diffusers, is_bfl_flux, is_diffusers_flux, strip_bfl_prefix
from urae.io import read_safetensors_header
from urae.quantised import describe, quantised_weights

log = logging.getLogger("urae")

FLUX_PIPELINES = {"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlPipeline"}


class ModelLoadError(ValueError):
    """A model path or file that cannot be loaded as FLUX.1, with what to do about it."""


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    device = torch.device(device) if device is not None else default_device()
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str | torch.dtype | None, device=None) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    return dtype_from_name(name)


def _is_offline() -> bool:
    try:
        return parse_bool(os.environ.get("HF_HUB_OFFLINE", "0"))
    except ValueError:
        return False


def resolve_model_location(model: str | os.PathLike) -> str:
    """Check a local folder is a FLUX pipeline, or that a hub id can be tried; return what from_pretrained takes."""
    s = str(model)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; pass a diffusers FLUX.1 folder as the model "
                                 f"(a single-file transformer checkpoint goes to --transformer)")
        index = p / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{p} is not a diffusers pipeline folder (no model_index.json); expected a FLUX.1 "
                                 f"folder such as a download of black-forest-labs/FLUX.1-dev")
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{index} is not valid JSON: {e}") from e
        if cls not in FLUX_PIPELINES:
            raise ModelLoadError(f"{p} holds a {cls}, not a FLUX.1 pipeline (expected one of {sorted(FLUX_PIPELINES)})")
        return str(p)
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise ModelLoadError(f"{s}: no such folder; pass a diffusers FLUX.1 folder or a hub id like "
                             f"black-forest-labs/FLUX.1-dev")
    if _is_offline():
        raise ModelLoadError(f"{s} looks like a hub id, but HF_HUB_OFFLINE is set, so it cannot be downloaded; "
                             f"pass a local FLUX.1 folder instead (e.g. one made by `huggingface-cli download {s}`)")
    return s


def _from_pretrained(cls, location: str, **kwargs):
    try:
        return cls.from_pretrained(location, **kwargs)
    except OSError as e:
        where = "folder" if Path(location).exists() else "hub id"
        hint = ("check the files are complete (a truncated or missing .safetensors?)" if where == "folder"
                else "check the id, your network and your access token (FLUX.1-dev is gated), "
                     "or pass a local folder")
        raise ModelLoadError(f"could not load {cls.__name__} from {where} {location}: {e}\n-> {hint}") from e
    except Exception as e:  # corrupt weights and config errors surface as assorted types from deep inside
        raise ModelLoadError(f"could not load {cls.__name__} from {location}: {type(e).__name__}: {e}") from e


def _describe(name: str, where, module) -> str:
    n = sum(p.numel() for p in module.parameters())
    dtype = next(module.parameters()).dtype
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
    return f"{name}: {where} ({str(dtype).replace('torch.', '')}, {size} params)"


def load_transformer_file(path: str | os.PathLike, config_location: str, dtype: torch.dtype):
    """A single-file transformer (BFL layout as flux1-dev.safetensors, or diffusers names) on the folder's config."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    path = Path(path).expanduser()
    try:
        keys, _ = read_safetensors_header(path)
    except (FileNotFoundError, ValueError) as e:
        raise ModelLoadError(str(e)) from e
    if not keys:
        raise ModelLoadError(f"{path}: empty or unsupported checkpoint; expected a FLUX.1 transformer .safetensors")
    bfl = is_bfl_flux(keys)
    if not bfl and not is_diffusers_flux(keys):
        sample = ", ".join(sorted(keys)[:3])
        raise ModelLoadError(f"{path} is not a FLUX.1 transformer checkpoint (keys like {sample}); expected BFL "
                             f"keys (double_blocks.N.img_attn.qkv.weight, …) or diffusers ones (transformer_blocks.…)")
    quantised = quantised_weights(path)  # from the header, before any tensor is read
    unscaled = {d for d in quantised if not d.startswith("float8_e")}
    if unscaled:
        raise ModelLoadError(f"{path} stores {describe(quantised)}: quantised with scales this loader does not "
                             f"apply; use a bf16/fp32 or a plain float8 FLUX.1 file")
    if quantised:
        log.info(f"transformer: {path.name} stores {describe(quantised)}; upcast to "
                 f"{str(dtype).replace('torch.', '')} to compute (their rounding stays)")
    try:
        config = FluxTransformer2DModel.load_config(config_location, subfolder="transformer")
    except OSError as e:
        raise ModelLoadError(f"no transformer config in {config_location}: {e}") from e
    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k).to(dtype) for k in f.keys()}
    except Exception as e:
        raise ModelLoadError(f"{path}: could not read tensors (truncated or corrupt file?): {e}") from e
    sd = bfl_to_diffusers(sd) if bfl else strip_bfl_prefix(sd)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    wrong = [(k, tuple(sd[k].shape), tuple(s)) for k, s in expected.items() if k in sd and sd[k].shape != s]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {extra[:3]}" if extra else "") + (
            f" shape {wrong[0][0]}: file {wrong[0][1]} vs config {wrong[0][2]}" if wrong else "")
        raise ModelLoadError(f"{path} does not fit the transformer config of {config_location}:{detail}. "
                             f"Is it a FLUX.1 checkpoint of the same variant (dev/schnell) as the folder?")
    model.load_state_dict(sd, assign=True)
    return model.eval()


def load_transformer(model: str, transformer_file: str | None = None, dtype=None, device=None):
    """The FLUX transformer alone (for training), from a folder/hub id or a single file on its config."""
    from diffusers import FluxTransformer2DModel

    dtype = parse_dtype(dtype, device)
    location = resolve_model_location(model)
    if transformer_file:
        t = load_transformer_file(transformer_file, location, dtype)
        where = transformer_file
    else:
        t = _from_pretrained(FluxTransformer2DModel, location, subfolder="transformer", dtype=dtype)
        where = f"{location}/transformer"
    if device is not None:
        t.to(device)
    log.info(_describe("transformer", where, t))
    return t


def load_pipeline(model: str, transformer_file: str | None = None, dtype=None, device=None, transformer=None):
    """A FluxPipeline from a folder or hub id, with an optional single-file transformer in place of its own."""
    from diffusers import FluxPipeline

    dtype = parse_dtype(dtype, device)
    location = resolve_model_location(model)
    if transformer is None and transformer_file:
        transformer = load_transformer(location, transformer_file, dtype)
    kwargs = {"dtype": dtype}
    if transformer is not None:
        kwargs["transformer"] = transformer
    pipe = _from_pretrained(FluxPipeline, location, **kwargs)
    if device is not None:
        pipe.to(device)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        log.info(_describe(name, transformer_file if name == "transformer" and transformer_file
                           else f"{location}/{name}", getattr(pipe, name)))
    return pipe


def hub_problem(repo_id: str) -> str | None:
    """Why a hub pipeline cannot be downloaded, from one request without retries (the downloads' own retries take
    over a minute to end in "does not appear to have a file named model_index.json"); None when it can."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "model_index.json"), timeout=10)
    except GatedRepoError:
        return f"{repo_id} is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return f"there is no repository {repo_id} (or it is private: log in with `hf auth login`)"
    except EntryNotFoundError:
        return f"{repo_id} has no model_index.json: it is not a diffusers pipeline"
    except HfHubHTTPError as e:
        return f"the hub answered {e}"
    except Exception as e:  # the HTTP client's connection and timeout errors: no network, proxy, DNS
        return f"the hub cannot be reached ({type(e).__name__}: {e}): no network, or a proxy or firewall in the way"
    return None
