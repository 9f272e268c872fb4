"""Applying LoRA files to a FLUX transformer for generation, through the network module.

Any file the module reads (ours, kohya, diffusers/PEFT, the URAE releases in those forms) is attached
without touching the stored base weights, or merged into them when asked (`fuse=True`). The high-res
runtime settings a training run wrote into a file's metadata are read back here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from urae.io import read_safetensors_header

RUNTIME_METADATA_KEY = "urae_runtime"


class AdapterError(ValueError):
    pass


class HubFileError(AdapterError):
    """A LoRA named as a hub file that cannot be had (offline and not cached, no such repo/file, gated)."""


# owner/repo/path/in/repo.safetensors
_HUB_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^\s]+\.safetensors)$")


def looks_local(text: str) -> bool:
    """A LoRA name that is a local path, never looked up on the hub: it exists; starts with `.`, `/` or `~`; has a
    Windows separator; or its first folder exists here (`out/urae_2k/urae_2k.safetensors` beside an `out` folder
    is a missing local file, not the repository out/urae_2k)."""
    local = Path(text).expanduser()
    return (local.exists() or text.startswith((".", "/", "~")) or "\\" in text
            or (len(local.parts) > 1 and Path(local.parts[0]).is_dir()))


def resolve_lora_file(spec: str | os.PathLike) -> str:
    """A LoRA given by path or as a Hugging Face Hub file `owner/repo/file.safetensors` -> a local path.

    An existing local file always wins; a path that `looks_local` is never looked up on the hub.
    Hub files are downloaded once into the usual huggingface_hub cache (HF_HOME, HF_HUB_CACHE) and found
    there offline. The trainer's `base_lora` goes through here too.
    """
    text = str(spec)
    local = Path(text).expanduser()
    m = _HUB_FILE.match(text)
    if looks_local(text) or m is None:
        return str(local)  # a missing local file is reported by whoever reads it
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    repo, file = m["repo"], m["file"]
    where = f"{text}: no such local file (start a local path with ./ to skip the hub), and as a hub file"
    try:
        return hf_hub_download(repo, file)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise HubFileError(f"{where} it is not in the cache and cannot be downloaded (offline: HF_HUB_OFFLINE is set "
                           f"or there is no network); download it once online or pass a local path") from None
    except GatedRepoError:
        raise HubFileError(f"{where} {repo} is gated: accept its terms on huggingface.co and log in "
                           f"(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubFileError(f"{where} there is no repository {repo} (or it is private: log in)") from None
    except EntryNotFoundError:
        raise HubFileError(f"{where} {repo} has no file {file}") from None
    except (HfHubHTTPError, OSError) as e:
        raise HubFileError(f"{where} the download failed: {e}") from None


def check_adapter_file(path: str | os.PathLike) -> dict:
    """Cheap validation before any model is loaded: exists, readable, has LoRA-looking keys. Returns metadata.
    A hub name (`owner/repo/file.safetensors`) is fetched into the cache here, in the early checks."""
    p = Path(resolve_lora_file(path))
    try:
        keys, meta = read_safetensors_header(p)
    except (FileNotFoundError, ValueError) as e:
        raise AdapterError(f"LoRA file: {e}") from e
    if any(".attn.processor.to_q_a." in k for k in keys):
        # the official 4K release stores only the trained factors; their change is relative to the minor
        # components of FLUX.1-dev + the 2K LoRA, which a one-time SVD pass recovers
        raise AdapterError(
            f"{p} is in the official URAE 4K attention-processor format, which no LoRA loader applies as it is. "
            f"Convert it once (SVD of the base weights; add --svd-device cuda on a GPU):\n  python -m "
            f"networks.convert_lora {p} {p.with_name(p.stem + '_lora.safetensors')} --from-urae-official "
            f"--base PATH/TO/FLUX.1-dev --base-lora urae_2k_adapter.safetensors\n(--base: a local FLUX.1-dev folder "
            f"or flux1-dev.safetensors), then pass the new file to --lora (it holds the 2K and 4K changes together).")
    if not any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight")) for k in keys):
        raise AdapterError(f"{p} holds no LoRA weights (keys like {sorted(keys)[:2]}); expected a LoRA .safetensors")
    return meta


def check_adapter_fits(path: str | os.PathLike, model_config: dict | None) -> None:
    """The file's modules and shapes against the transformer that `model_config` (its config.json) describes,
    built on the meta device (no memory, no weights): a LoRA for another architecture or width is refused
    before any model loads, by the same key map that attaches it later. No config (a hub model not downloaded
    yet): the check happens when the model is attached."""
    if model_config is None:
        return
    import torch
    from diffusers import FluxTransformer2DModel

    from networks import minor_lora

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(model_config)
    try:
        minor_lora.create_network_from_weights(1.0, str(path), None, [], transformer, for_inference=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise AdapterError(f"cannot apply LoRA {path} to this model: {e}") from e


def runtime_from_metadata(meta: dict) -> dict | None:
    """The high-res settings a file was trained with, if it recorded them."""
    raw = meta.get(RUNTIME_METADATA_KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return d if isinstance(d, dict) else None


def attach_adapters(transformer, files: list[str], scales: list[float], fuse: bool = False) -> list:
    """Attach (or merge) each LoRA file at its scale; shape or architecture mismatches are clear errors."""
    from networks import minor_lora

    networks = []
    for path, scale in zip(files, scales):
        try:
            # the factors are read from the file here; apply_to only hooks them into the model
            net, sd = minor_lora.create_network_from_weights(scale, str(path), None, [], transformer,
                                                             for_inference=True)
            if fuse:
                net.merge_to([], transformer, sd, dtype=transformer.dtype, device=transformer.device)
            else:
                net.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
                net.to(device=transformer.device)
                net.eval().requires_grad_(False)
        except (ValueError, KeyError, RuntimeError) as e:
            raise AdapterError(f"cannot apply LoRA {path} to this model: {e}") from e
        networks.append(net)
    return networks
