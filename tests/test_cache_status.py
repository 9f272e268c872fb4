"""Cache completeness without loading models: the identity memo, cache_status, build_caches with only the
missing components, cached sample prompts, single-component loading. Tiny FLUX pipeline, offline."""

import json
import shutil
import socket

import pytest
import torch

from urae.components import load_text_encoders, load_vae
from urae.data import build_caches, cache_prompts, cache_status, make_dataloader
from urae.data.memo import MEMO_NAME
from urae.data.options import DataOptions
from urae.data.synthetic import write_image

PROMPTS = ["a red fox in snow", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def model(tiny_flux_dir, tmp_path_factory):
    """A private copy of the tiny model (tests change its files)."""
    return shutil.copytree(tiny_flux_dir, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def parts(model):
    return {**load_text_encoders(model, torch.float32), "vae": load_vae(model, torch.float32)}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model or tokenizer load fails the test (the load functions are wrapped, not replaced in behaviour)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    loads = []

    def forbid(cls_, *a, **k):
        loads.append(cls_.__name__)
        raise AssertionError(f"{cls_.__name__}.from_pretrained called")

    for base in (ModelMixin, PreTrainedModel, PreTrainedTokenizerBase):
        monkeypatch.setattr(base, "from_pretrained", classmethod(forbid))
    return loads


def make_data(root):
    for i, (w, h) in enumerate([(80, 80), (160, 80), (64, 130)]):
        write_image(root / f"img{i}.png", w, h, seed=i).with_suffix(".txt").write_text(f"caption {i}")
    return root


def opts(tmp_path, **kw):
    return DataOptions(train_data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), resolution=64, **kw)


def first_run(tmp_path, model, parts):
    make_data(tmp_path / "data")
    return build_caches(opts(tmp_path), parts, model_location=str(model), prompts=PROMPTS, progress=False)


def batches(plan):
    return [{k: v for k, v in b.items()} for b in make_dataloader(plan, batch_size=1, shuffle=False,
                                                                    sample_posterior=False)]


def test_complete_caches_need_no_model(tmp_path, model, parts, no_model_loads, pipe_encode):
    plan = first_run(tmp_path, model, parts)
    status = cache_status(opts(tmp_path), str(model), dtype=torch.float32, prompts=PROMPTS)
    assert status.complete and not status.needs_vae and not status.needs_text_encoders
    assert (status.latents.valid, status.latents.total) == (3, 3)
    assert (status.texts.valid, status.texts.total) == (5, 5)  # 3 captions + 2 prompts
    assert status.latents.identity == plan.latents.identity and status.texts.identity == plan.text_identity

    again = build_caches(opts(tmp_path), {}, status=status, prompts=PROMPTS)  # no models at all
    assert [(e.image, e.latent_file, e.text_files) for e in again.entries] == \
           [(e.image, e.latent_file, e.text_files) for e in plan.entries]
    for a, b in zip(batches(again), batches(plan)):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["t5_embeds"], b["t5_embeds"])

    embeds = cache_prompts(PROMPTS, again)  # from disk, as FluxPipeline.encode_prompt gives them
    for (t5, pooled), prompt in zip(embeds, PROMPTS):
        ref_t5, ref_pooled = pipe_encode(prompt)
        torch.testing.assert_close(t5, ref_t5, atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not cached"):
        cache_prompts(["a prompt never cached"], again)
    assert no_model_loads == []


@pytest.fixture(scope="module")
def pipe_encode(model, parts):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(transformer=None, scheduler=None, **parts)

    def encode(prompt):
        with torch.no_grad():
            t5, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
        return t5, pooled
    return encode


def test_edited_caption_and_changed_encoder_file(tmp_path, model, parts):
    first_run(tmp_path, model, parts)
    (tmp_path / "data" / "img1.txt").write_text("an edited caption")
    status = cache_status(opts(tmp_path), str(model), dtype=torch.float32, prompts=PROMPTS)
    assert status.latents.complete and status.texts.state == "incomplete" and status.texts.valid == 4
    assert status.needs_text_encoders and not status.needs_vae

    # another storage or load dtype, T5 length, or prompt than the run recorded: not complete
    assert cache_status(opts(tmp_path), str(model), dtype=torch.bfloat16).texts.state == "unknown"
    assert cache_status(opts(tmp_path), str(model), dtype=torch.float32, t5_max_length=256).texts.state == "unknown"
    assert not cache_status(opts(tmp_path), str(model), dtype=torch.float32, prompts=["new"]).texts.complete

    changed = shutil.copytree(model, tmp_path / "changed")
    weights = next((changed / "text_encoder_2").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the T5 weights
    weights.write_bytes(bytes(data))
    status = cache_status(opts(tmp_path), str(changed), dtype=torch.float32)
    assert status.texts.state == "unknown" and status.latents.complete  # the VAE files are the same


def test_only_the_vae_when_texts_are_complete_and_memo_survives(tmp_path, model, parts):
    plan = first_run(tmp_path, model, parts)
    memo_file = plan.entries[0].latent_file.parents[1] / MEMO_NAME
    before = json.loads(memo_file.read_text())
    plan.entries[0].latent_file.unlink()
    status = cache_status(opts(tmp_path), str(model), dtype=torch.float32, prompts=PROMPTS)
    assert status.needs_vae and not status.needs_text_encoders and status.latents.valid == 2

    again = build_caches(opts(tmp_path), {"vae": parts["vae"]}, status=status, prompts=PROMPTS, progress=False)
    assert again.latents.encoded == 1 and again.texts.encoded == 0
    assert [(e.latent_file, e.text_files) for e in again.entries] == [(e.latent_file, e.text_files) for e in plan.entries]
    with pytest.raises(ValueError, match="no text encoders"):
        build_caches(opts(tmp_path), {"vae": parts["vae"]}, status=status, prompts=["another"], progress=False)

    build_caches(opts(tmp_path), parts, model_location=str(model), prompts=PROMPTS, progress=False)  # a second run
    assert json.loads(memo_file.read_text()) == before
    assert cache_status(opts(tmp_path), str(model), dtype=torch.float32, prompts=PROMPTS).complete


def test_another_storage_dtype_is_counted_before_the_vae_loads(tmp_path, model, parts):
    """One latent version per image: a run storing another dtype says, before loading the VAE, how many files
    it will re-encode and why."""
    plan = first_run(tmp_path, model, parts)
    plan.entries[0].latent_file.unlink()
    status = cache_status(opts(tmp_path), str(model), dtype=torch.bfloat16, prompts=PROMPTS)
    assert status.latents.state == "unknown" and status.needs_vae
    assert status.latents.why.endswith("so the VAE loads to encode: 1 missing, 2 stored as float32 (this run stores "
                                       "bfloat16; the new files replace them)"), status.latents.why


def test_no_vae_and_unknown_latents_is_an_error(tmp_path, model, parts):
    make_data(tmp_path / "data")
    status = cache_status(opts(tmp_path), str(model), dtype=torch.float32)
    assert status.latents.state == status.texts.state == "unknown"
    assert status.latents.why == ("no caching run has used these VAE files in float32 yet, so the VAE loads: all 3 "
                                  "latent files are still to be encoded")
    with pytest.raises(ValueError, match="no vae"):
        build_caches(opts(tmp_path), {k: v for k, v in parts.items() if k != "vae"}, status=status, progress=False)


def test_hub_id_offline_unknown_or_from_local_snapshot(tmp_path, model, parts, monkeypatch):
    import huggingface_hub.constants

    connects = []

    def no_network(sock, address):
        connects.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    first_run(tmp_path, model, parts)

    status = cache_status(opts(tmp_path), "someone/tiny-flux", dtype=torch.float32, prompts=PROMPTS)
    assert status.latents.state == status.texts.state == "unknown" and "no local files" in status.texts.why

    repo = hub / "models--someone--tiny-flux"  # the hub cache layout: refs/main -> snapshots/<commit>/
    shutil.copytree(model, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    status = cache_status(opts(tmp_path), "someone/tiny-flux", dtype=torch.float32, prompts=PROMPTS)
    assert status.complete
    assert connects == []


@pytest.mark.slow  # a subprocess: ~10 s of imports and loading
def test_caching_cli_loads_only_the_models_of_incomplete_kinds(tmp_path, model, parts):
    import os
    import subprocess
    import sys
    from pathlib import Path

    first_run(tmp_path, model, parts)
    (tmp_path / "data" / "img0.txt").write_text("an edited caption")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "urae.data", "--model", str(model), "--train_data_dir", str(tmp_path / "data"),
           "--cache_dir", str(tmp_path / "cache"), "--resolution", "64", "--dtype", "fp32",
           "--stats_json", str(tmp_path / "stats"), "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads((tmp_path / "stats.rank0.json").read_text())
    assert stats["loaded"] == ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    assert stats["texts_encoded"] == 1 and stats["latents_encoded"] == 0
    assert "cache status: latents complete (3 of 3 valid); texts incomplete (2 of 3 valid)" in out.stdout

    bad = subprocess.run([*cmd[:4], str(tmp_path / "nowhere"), *cmd[5:]], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=120)
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr  # one line: no traceback, no log noise
    assert lines[0].startswith("error: ") and "no such folder" in lines[0]


def test_single_components_load_as_the_pipeline_does(model, parts):
    from diffusers import FluxPipeline

    from urae.components import load_components
    from urae.data.identity import module_fingerprint
    from urae.data.text_cache import TextEncoders
    from urae.loading import ModelLoadError

    pipe = FluxPipeline.from_pretrained(model, transformer=None, dtype=torch.float32)
    assert module_fingerprint(parts["vae"]) == module_fingerprint(pipe.vae)
    names = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    assert TextEncoders(*(parts[n] for n in names)).identity() == TextEncoders(*(getattr(pipe, n) for n in names)).identity()
    assert not any(p.requires_grad for p in parts["text_encoder_2"].parameters())

    bf16 = load_components(model, ["vae"], torch.bfloat16)["vae"]
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="has no controlnet"):
        load_components(model, ["controlnet"])
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_vae(model.parent / "missing")
