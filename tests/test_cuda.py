"""The CUDA-only paths outside urae.memory (those are in test_memory_cuda.py), skipped without CUDA.
Every CUDA test carries the `cuda` mark, so on a GPU machine one command runs them all:

    python -m pytest -m cuda -q
"""

import json

import numpy as np
import pytest
import torch
from conftest import train_argv
from PIL import Image
from safetensors.torch import load_file

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_mover_copies_round_trip_on_the_side_stream():
    from urae.memory.transfer import Mover

    mover = Mover("cuda")
    host = torch.randn(1 << 20).pin_memory()
    pending = mover.to_device(host)
    assert pending.event is not None  # asynchronous: the compute stream must wait for it
    dev = pending.wait()
    back = torch.empty_like(host).pin_memory()
    mover.to_host(dev * 2, back).synchronize()
    assert torch.equal(back, host * 2)


def test_bf16_training_with_block_swap_and_activation_offload(tiny_flux_dir, demo_data_dir, tmp_path):
    from urae.trainer import main

    out = tmp_path / "out"
    assert main(train_argv(tiny_flux_dir, demo_data_dir, out, "--max_train_steps", "2", "--mixed_precision", "bf16",
                           "--gradient_checkpointing", "true", "--blocks_to_swap", "2",
                           "--offload_activations")) == 0
    losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.isfinite(v.float()).all() for v in load_file(out / "urae_demo.safetensors").values())


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_inference_offload_gives_the_resident_image(offload, tiny_flux_dir, tmp_path):
    from urae.inference import main

    def image(name, *extra):
        out = tmp_path / name
        assert main(["--model", str(tiny_flux_dir), "--output_dir", str(out), "--steps", "3", "--prompt", "x",
                     "--width", "128", "--height", "128", "--device", "cuda", *extra]) == 0
        return np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)

    assert np.abs(image("resident", "--offload", "none") - image(offload, "--offload", offload)).max() <= 1
