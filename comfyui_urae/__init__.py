"""URAE for FLUX in ComfyUI: copy or link this folder into ComfyUI/custom_nodes/."""

from .nodes import URAEHighResRuntime, URAELoraLoader

NODE_CLASS_MAPPINGS = {
    "URAEHighResRuntime": URAEHighResRuntime,
    "URAELoraLoader": URAELoraLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "URAEHighResRuntime": "URAE high-res runtime",
    "URAELoraLoader": "URAE LoRA loader",
}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
