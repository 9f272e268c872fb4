"""bench_infer_gpu.py --speed: one row per inference speed option (urae.speed) at each size.

Every row generates the same image (seed, embeddings, URAE runtime) with a full schedule of --speed-steps
steps through urae.sampling.generate with the option applied by urae.speed.apply, exactly as
flux_urae_infer.py does, and takes it off again (urae.speed.undo) before the next row. A row reports the
mean s/step over the schedule after its first step (for --compile, after a 2-step warm-up image at that
size, so the compile time is reported apart), the dense-equivalent TFLOP/s (dense FLOP x steps / time),
the 28-step projection, peak GPU memory, for caches the transformer passes answered from the cache, and
for every row the difference of its image to the dense row's (mean absolute difference in 8-bit levels,
PSNR): zero for the lossless options up to rounding, the price of a cache otherwise.
"""

from __future__ import annotations

import math
import time

import numpy as np

# GPU rows; a backend is `backend:NAME` (diffusers' names: _native_cudnn and _native_flash come with torch,
# flash / _flash_3_hub / sage need their packages and are skipped when missing)
GPU_OPTIONS = ("dense", "compile", "backend:_native_cudnn", "backend:_native_flash", "fbcache", "taylorseer",
               "magcache", "compile+fbcache")
CPU_OPTIONS = ("dense", "backend:_native_math", "fbcache", "taylorseer", "magcache")


def parse_option(opt: str, cuda: bool):
    from urae.speed import CACHES, SpeedPlan

    p = SpeedPlan()
    for part in opt.split("+"):
        if part == "dense":
            continue
        if part == "compile":
            p.compile, p.compile_backend = True, "inductor" if cuda else "aot_eager"
        elif part.startswith("backend:"):
            p.backend = part.split(":", 1)[1]
        elif part in CACHES:
            p.cache = part
        else:
            raise ValueError(f"unknown speed option {part!r} in {opt!r}: dense, compile, backend:NAME, "
                             f"{', '.join(CACHES[1:])}, joined with +")
    return p


def image_difference(a, b) -> dict:
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = float(((x - y) ** 2).mean())
    return {"mean_abs_levels": float(np.abs(x - y).mean()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)}


def speed_row(pipe, size: int, opt: str, steps: int, embeds, dev, flop_per_step: float, dense_image):
    """One option at one size; returns (row, image)."""
    from urae.runtime import HighResSettings
    from urae.sampling import SampleRequest, generate
    from urae.speed import apply, undo

    p = parse_option(opt, dev.cuda)
    settings = HighResSettings.for_resolution(size, size)
    req = SampleRequest("random embeddings", size, size, seed=0, steps=steps)
    row = {"size": size, "option": opt, "steps": steps, "proportional_attention": settings.proportional_attention,
           "ntk_factor": settings.ntk_factor, "flop_per_step": flop_per_step}
    try:
        counter = apply(pipe, p, steps)
    except Exception as e:  # noqa: BLE001 - a backend whose package is missing is a result, not a failure
        row["status"] = f"unavailable: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
        undo(pipe, p, None)
        return row, None
    try:
        if p.compile:  # compile at this size first; the timed image then measures the compiled blocks
            dev.sync()
            t0 = time.perf_counter()
            generate(pipe, SampleRequest("warm-up", size, size, seed=0, steps=2), settings, prompt_embeds=embeds)
            dev.sync()
            row["compile_s"] = time.perf_counter() - t0
        if counter:
            counter.start_image()
        marks: list[float] = []

        def on_step():
            dev.sync()
            marks.append(time.perf_counter())

        dev.free()
        dev.reset_peak()
        dev.sync()
        t0 = time.perf_counter()
        image = generate(pipe, req, settings, prompt_embeds=embeds, on_step=on_step)
        dev.sync()
        row["image_s"] = time.perf_counter() - t0
        row["peak_gib"], row["reserved_gib"] = dev.peaks()
        row["first_step_s"] = marks[0] - t0
        row["s_per_step"] = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else row["first_step_s"]
        row["tflops"] = flop_per_step / row["s_per_step"] / 1e12  # dense-equivalent for a cache
        row["projected_28_s"] = 28 * row["s_per_step"]
        if counter:
            row["cached_passes"], row["passes"] = counter.reused, counter.passes
        if dense_image is not None:
            row["vs_dense"] = image_difference(image, dense_image)
        row["status"] = "ok"
    except RuntimeError as e:
        from benchmarks.gpu_probes import is_oom

        if not is_oom(e):
            raise
        row["status"], image = "OOM", None
    finally:
        undo(pipe, p, counter)
        dev.free()
    return row, image


def run_speed(pipe, cfg: dict, sizes, options, steps: int, embeds, dev, left, results: dict, save, flops_per_pass):
    for size in sizes:
        dense = None
        for opt in options:
            # the dense row's own time predicts the others (compile: plus its compile); before it, skip nothing
            dense_row = next((r for r in results["speed_rows"] if r["size"] == size and r["option"] == "dense"
                              and r.get("image_s")), None)
            est = 1.2 * dense_row["image_s"] * (2 if "compile" in opt else 1) if dense_row else 0
            if est > left():
                print(f"skip {size}x{size} {opt}: needs ~{est:.0f} s, {max(0.0, left()):.0f} s of the budget left")
                results["speed_skipped"].append({"size": size, "option": opt, "estimated_s": est})
                save()
                continue
            row, image = speed_row(pipe, size, opt, steps, embeds, dev, flops_per_pass(cfg, size, size), dense)
            if opt == "dense":
                dense = image
            results["speed_rows"].append(row)
            save()
            print(f"  {size}x{size} {opt}: {row['status']}"
                  + (f", {row['s_per_step']:.4f} s/step, {row['tflops']:.4g} TFLOP/s" if row.get("s_per_step") else ""),
                  flush=True)


def _f(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def print_speed_report(results: dict) -> None:
    n = results["speed_steps"]
    print(f"\nspeed options: one {n}-step image per row (seed 0, URAE runtime for the size: NTK + proportional "
          "attention from 2048); s/step = mean over the schedule after its first step; TFLOP/s = dense FLOP per "
          "step / s/step (dense-equivalent for caches); 28-step s = 28 x s/step; GiB = peak allocated / reserved "
          "while generating; cached = transformer passes the cache answered; vs dense = mean |difference| in 8-bit "
          "levels and PSNR of the image against the dense row's")
    print(f"{'size':>10} {'option':>22} {'s/step':>8} {'TFLOP/s':>8} {'28-step s':>9} {'compile s':>9} {'GiB':>11} "
          f"{'cached':>7} {'vs dense':>16}  status")
    for r in results["speed_rows"]:
        cached = f"{r['cached_passes']}/{r['passes']}" if "passes" in r else "-"
        vs = r.get("vs_dense")
        vs = "-" if vs is None else f"{vs['mean_abs_levels']:.3f} {_f(vs['psnr_db'], '.1f')}dB"
        mem = f"{_f(r.get('peak_gib'), '.1f', 'n/a')}/{_f(r.get('reserved_gib'), '.1f', 'n/a')}"
        print(f"{r['size']:>5}x{r['size']:<4} {r['option']:>22} {_f(r.get('s_per_step'), '8.4f', '       -')} "
              f"{_f(r.get('tflops'), '8.4g', '       -')} {_f(r.get('projected_28_s'), '9.1f', '        -')} "
              f"{_f(r.get('compile_s'), '9.1f', '        -')} {mem:>11} {cached:>7} {vs:>16}  {r['status']}")
    for s in results["speed_skipped"]:
        print(f"{s['size']:>5}x{s['size']:<4} {s['option']:>22}  skipped for the budget (~{s['estimated_s']:.0f} s)")
