"""The quality comparison written out: report.md (tables, recommendation, a verdict per community claim), grid.png,
three matplotlib plots and results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.quality.levels import REFERENCE
from bench.quality.metrics import KINDS
from bench.quality.vram import CARDS, TENSOR_CORE_UTILISATION, recommend

FILES = ("report.md", "grid.png", "psnr_vs_bits.png", "latent_error_vs_step.png", "vram_per_level.png", "results.json")
CARD_LINES_GB = (24, 16, 12, 8)
# "almost identical" for the Q8 claim: structure and pixels both within what the eye does not tell apart
ALMOST_IDENTICAL_SSIM = 0.98
ALMOST_IDENTICAL_WORST_SSIM = 0.95


def closeness_order(results: dict) -> list[str]:
    """Levels from closest to the reference to farthest, by mean final-latent relative RMSE (finite for every run,
    unlike PSNR); the reference itself first."""
    levels = results["levels"]
    return [REFERENCE, *sorted(levels, key=lambda lv: levels[lv]["summary"]["latent_rel_rmse"]["mean"])]


def _db(value: float) -> str:
    return "identical" if math.isinf(value) else ("n/a" if math.isnan(value) else f"{value:.1f}")


def _mb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e6:.2f}"


def _placement(p: dict) -> str:
    if not p["fits"]:
        return f"needs {p['needs_gib']:.1f} GiB"
    text = f"streams {p['streamed_blocks']} ({p['predicted_slowdown']:.2f}x)" if p["streamed_blocks"] else "resident"
    return text + (", tiled VAE" if p["tiled_vae"] else "")


def _streaming(p: dict | None) -> list[str]:
    if p is None:
        return ["", "", ""]
    return [_placement(p), f"{p['compute_seconds']:.2f}, {p['copy_seconds']:.2f}", f"{p['pinned_gb']:.1f} GB"]


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows), ""]


def claims(results: dict) -> list[str]:
    """A verdict with its number for each piece of community advice; "not measurable here" where a level or a GPU
    is missing from this run."""
    levels, memory = results["levels"], results["flux_dev_memory"]["rows"]
    order = closeness_order(results)
    lines = []

    def rmse(lv):
        return levels[lv]["summary"]["latent_rel_rmse"]

    def missing(*needed):
        absent = [lv for lv in needed if lv not in levels]
        return f"not measurable here: {', '.join(absent)} not in this run" if absent else None

    def ranked_resident(gb):
        return [lv for lv in order if lv != REFERENCE and memory[lv]["cards"][gb]["fits"]
                and not memory[lv]["cards"][gb]["streamed_blocks"]]

    if not (verdict := missing("Q8_0")):
        s = levels["Q8_0"]["summary"]
        ok = s["ssim"]["mean"] >= ALMOST_IDENTICAL_SSIM and s["ssim"]["worst"] >= ALMOST_IDENTICAL_WORST_SSIM
        verdict = (f"{'confirmed' if ok else 'refuted'}: SSIM {s['ssim']['mean']:.4f} mean, {s['ssim']['worst']:.4f} "
                   f"worst (threshold {ALMOST_IDENTICAL_SSIM} / {ALMOST_IDENTICAL_WORST_SSIM}); PSNR "
                   f"{_db(s['psnr']['mean'])} dB mean, {_db(s['psnr']['worst'])} dB worst, "
                   f"{s['psnr']['identical']} of {len(levels['Q8_0']['runs']['psnr'])} images identical")
    lines.append(f"- **\"Q8_0 is almost the same as FP16\"**: {verdict}.")
    for level, gb in (("Q6_K", 16), ("Q5_1", 12)):
        if not (verdict := missing(level)):
            p = memory[level]["cards"][gb]
            best = ranked_resident(gb)
            if not (p["fits"] and not p["streamed_blocks"]):
                verdict = f"refuted: Flux-dev {level} does not run resident on {gb} GB ({_placement(p)})"
            elif best and best[0] != level:
                verdict = (f"partly: {level} runs resident on {gb} GB (predicted peak {p['peak_gib']:.2f} GiB), but "
                           f"{best[0]} does too (peak {memory[best[0]]['cards'][gb]['peak_gib']:.2f} GiB) and is "
                           f"closer to the reference (latent error {rmse(best[0])['mean']:.4f} vs "
                           f"{rmse(level)['mean']:.4f})")
            else:
                verdict = (f"confirmed: {level} is the closest level that runs resident on {gb} GB (predicted "
                           f"peak {p['peak_gib']:.2f} GiB)")
        lines.append(f"- **\"{level} for {gb} GB cards\"**: {verdict}.")
    if not (verdict := missing("Q4_0", "NF4")):
        q4, nf4 = rmse("Q4_0")["mean"], rmse("NF4")["mean"]
        verdict = (f"{'confirmed' if q4 < nf4 else 'refuted'}: final-latent relative error Q4_0 {q4:.4f}, NF4 "
                   f"{nf4:.4f}; PSNR {_db(levels['Q4_0']['summary']['psnr']['mean'])} vs "
                   f"{_db(levels['NF4']['summary']['psnr']['mean'])} dB")
    lines.append(f"- **\"Q4_0 is closer to FP16 than NF4 (under 10 GB)\"**: {verdict}.")
    if not (verdict := missing("Q4_0", "NF4")):
        # relative spread (std / mean) of the latent error, since NF4's larger error alone would widen its std;
        # PSNR is logarithmic already, its std in dB is a relative spread
        cv = {lv: rmse(lv)["std"] / rmse(lv)["mean"] for lv in ("Q4_0", "NF4")}
        psnr_std = {lv: levels[lv]["summary"]["psnr"]["std"] for lv in ("Q4_0", "NF4")}
        votes = (cv["NF4"] > cv["Q4_0"]) + (psnr_std["NF4"] > psnr_std["Q4_0"])
        verdict = (f"{('refuted', 'mixed', 'confirmed')[votes]}: relative spread of the final-latent error over runs "
                   f"(std / mean) NF4 {cv['NF4']:.3f}, Q4_0 {cv['Q4_0']:.3f}; PSNR std NF4 {psnr_std['NF4']:.2f} dB, "
                   f"Q4_0 {psnr_std['Q4_0']:.2f} dB; worst latent error NF4 {rmse('NF4')['worst']:.4f}, Q4_0 "
                   f"{rmse('Q4_0')['worst']:.4f}")
    lines.append(f"- **\"NF4 is less consistent\"**: {verdict}.")
    fives = [lv for lv in ("Q5_0", "Q5_1", "Q5_K_S") if lv in levels]
    if results["device"].startswith("cuda") and "Q8_0" in levels and fives:
        q8 = levels["Q8_0"]["seconds_per_step"]
        faster = [lv for lv in fives if q8 < levels[lv]["seconds_per_step"]]
        verdict = (f"{'confirmed' if faster else 'refuted'}: Q8_0 {q8:.3f} s/step; "
                   + ", ".join(f"{lv} {levels[lv]['seconds_per_step']:.3f}" for lv in fives))
    else:
        verdict = ("not measurable here: kernel speed needs a GPU (this run: "
                   f"{results['device']}, where every level decodes its weights with the torch codecs)")
    lines.append(f"- **\"Q8 sometimes runs faster than Q5\"**: {verdict}.")
    return lines


def markdown(results: dict) -> str:
    levels, settings = results["levels"], results["settings"]
    order = closeness_order(results)
    n_runs = len(settings["prompts"]) * len(settings["seeds"])
    what = (f"the shipped demo model (a 7M-parameter toy Flux at {settings['width']}x{settings['height']} trained by "
            "`bench.train_demo`, **not Flux-dev**: its numbers rank the levels, they are not Flux-dev's errors)"
            if results["demo"]
            else f"`{results['reference']}`")
    ref_step = results["reference_seconds_per_step"]
    out = ["# Quantization levels against full precision", "",
           f"Measured by `python -m bench.quality` on {what}, {results['device']}, {results['dtype']} compute. "
           f"{len(settings['prompts'])} prompts x {len(settings['seeds'])} seeds = {n_runs} images per level, "
           f"{settings['steps']} steps, {settings['width']}x{settings['height']}, true CFG {settings['true_cfg']}, "
           f"guidance {settings['guidance']}. Every level starts from the same noise as the reference (BF16 weights).",
           "", "## Closeness to the reference", "",
           "Ordered closest first (by mean final-latent relative RMSE). PSNR / SSIM: mean +- std over runs, worst "
           "run in brackets (identical images have infinite PSNR and count in the worst case only). s/step: "
           f"{results['device']}" + (" (CPU: every quantized level decodes its weights per call; GPU kernels are "
                                     "not measured here)" if results["device"] == "cpu" else "") + ".", ""]
    rows = []
    for lv in order[1:]:
        r, s = levels[lv], levels[lv]["summary"]
        bits = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        rows.append([lv, bits, _mb(r["stored_bytes"]), _mb(r["resident_bytes"]),
                     f"{_db(s['psnr']['mean'])} +- {s['psnr']['std']:.1f} ({_db(s['psnr']['worst'])})",
                     f"{s['ssim']['mean']:.4f} +- {s['ssim']['std']:.4f} ({s['ssim']['worst']:.4f})",
                     f"{s['latent_cosine']['mean']:.5f} ({s['latent_cosine']['worst']:.5f})",
                     f"{s['latent_rel_rmse']['mean']:.4f} +- {s['latent_rel_rmse']['std']:.4f} "
                     f"({s['latent_rel_rmse']['worst']:.4f})",
                     f"{r['seconds_per_step']:.4f} ({r['seconds_per_step'] / ref_step:.2f}x)"])
    out += _table(["level", "bits/weight (blocks)", "stored MB", "resident MB", "PSNR dB", "SSIM", "latent cosine",
                   "latent rel. RMSE", "s/step (vs reference)"], rows)
    out.append(f"Reference: {_mb(results['reference_stored_bytes'])} MB stored, {ref_step:.4f} s/step.")
    out += ["", "## Error along the trajectory", "",
            "Relative RMSE of the latents against the reference's after each step, mean over runs (worst in "
            "brackets): how the error grows as sampling goes on (`latent_error_vs_step.png`).", ""]
    steps = settings["steps"]
    marks = sorted({0, steps // 4, steps // 2, (3 * steps) // 4, steps - 1})
    out += _table(["level", *(f"step {i + 1}" for i in marks)],
                  [[lv, *(f"{levels[lv]['step_error']['mean'][i]:.4f} ({levels[lv]['step_error']['worst'][i]:.4f})"
                          for i in marks)] for lv in order[1:]])
    out += ["## Weight error by layer kind", "",
            f"Relative RMSE of the block weights against the reference's, mean over the kind's tensors (worst in "
            f"brackets), on {'the demo model' if results['demo'] else 'this model'}:", ""]
    out += _kind_table(order[1:], {lv: levels[lv]["weight_errors"] for lv in levels})
    if results["flux_dev_weight_errors"]:
        out += ["On Flux-dev-shaped tensors (one of each kind at Flux-dev's shapes, 256 rows each; synthetic "
                "Student-t(5) weights at scale 0.02, heavy-tailed like trained weights, since no real Flux weights "
                "ship with the project):", ""]
        out += _kind_table(order[1:], results["flux_dev_weight_errors"])
    memory = results["flux_dev_memory"]
    rows = memory["rows"]
    out += ["## Memory for Flux-dev at 1024x1024", "",
            "From the memory planner (`engine.memory`), no weights needed: stored size (tensors), what stays on the "
            "GPU once the modulation weights are offloaded, the predicted peak of a resident run (activations, "
            "modulations, VAE decode, CUDA context), and the placement on each card size. Streaming slowdowns are "
            "predicted, not measured: a step computes "
            f"{memory['flops_per_step'] / 1e12:.1f} TFLOP at {TENSOR_CORE_UTILISATION:.0%} of the example card's "
            "dense fp16/bf16 tensor rate while the streamed blocks cross PCIe (the copy overlaps the compute). "
            "Measured peak VRAM: " + ("see the table above" if results["device"].startswith("cuda")
                                      else "needs a GPU, not measured in this run") + ".", ""]
    card_names = [f"{c.gb} GB ({c.example})" for c in CARDS]
    out += _table(["level", "stored GB", "resident GB", "peak, resident GiB", *card_names],
                  [[lv, f"{rows[lv]['stored_gb']:.2f}", f"{rows[lv]['resident_gb']:.2f}", f"{rows[lv]['peak_gib']:.2f}",
                    *(_placement(rows[lv]['cards'][c.gb]) for c in CARDS)] for lv in rows])
    if len(rows) > 1:
        out += ["## What to run", "",
                "Per card size: the level closest to full precision (ranked by the measurements above"
                + (" on the demo model" if results["demo"] else "") + ") that runs Flux-dev at 1024x1024 without "
                "streaming, and the closest that runs at all, streaming blocks from CPU memory if it must.", ""]
        out += _table(["card", "closest resident", "closest overall", "its placement", "predicted s/step: compute, "
                       "PCIe copy", "pinned CPU RAM"],
                      [[f"{r['card'].gb} GB ({r['card'].example})", r["resident"] or "none", r["any"] or "none",
                        *_streaming(r["any_placement"])]
                       for r in recommend(memory, [lv for lv in order if lv in rows])], "llllrr")
        out += ["## Community claims", "", *claims(results), ""]
    return "\n".join(out) + "\n"


def _kind_table(order: list[str], errors: dict) -> list[str]:
    kinds = [k for k in KINDS if any(k in errors[lv] for lv in order)]
    return _table(["level", *kinds],
                  [[lv, *(f"{errors[lv][k]['mean']:.4f} ({errors[lv][k]['worst']:.4f})" if k in errors[lv] else ""
                          for k in kinds)] for lv in order])


def grid(images: dict[str, list[np.ndarray]], prompts: list[str], min_side: int = 128) -> Image.Image:
    """Rows: the reference, then the levels; columns: the prompts (first seed); the level named on the left."""
    h, w = next(iter(images.values()))[0].shape[:2]
    zoom = max(1, math.ceil(min_side / max(h, w)))
    cell_h, cell_w, label_w = h * zoom, w * zoom, 90
    canvas = Image.new("RGB", (label_w + cell_w * len(prompts), cell_h * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (name, row_images) in enumerate(images.items()):
        draw.text((6, row * cell_h + cell_h // 2 - 6), name, fill="black")
        for col, image in enumerate(row_images):
            canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST),
                         (label_w + col * cell_w, row * cell_h))
    return canvas


def plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["levels"]
    order = closeness_order(results)[1:]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lv in order:
        bits, psnr = levels[lv]["bits_per_weight"], levels[lv]["summary"]["psnr"]
        if bits is not None and math.isfinite(psnr["mean"]):
            ax.errorbar(bits, psnr["mean"], yerr=psnr["std"], fmt="o", capsize=3)
            ax.annotate(lv, (bits, psnr["mean"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set(xlabel="bits per weight (block weights)", ylabel="image PSNR vs reference, dB (mean +- std)",
           title="Closeness to full precision against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "psnr_vs_bits.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lv in order:
        mean = levels[lv]["step_error"]["mean"]
        ax.plot(range(1, len(mean) + 1), mean, label=lv)
    ax.set(yscale="log", xlabel="sampling step", ylabel="latent relative RMSE vs reference (mean over runs)",
           title="Error along the trajectory")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "latent_error_vs_step.png", dpi=120)
    plt.close(fig)

    rows = results["flux_dev_memory"]["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(names))
    ax.bar(x, [rows[n]["peak_gib"] for n in names], label="predicted peak, resident run", color="#9ecae1")
    ax.bar(x, [rows[n]["resident_gb"] * 1e9 / 2**30 for n in names], width=0.5, label="transformer weights",
           color="#3182bd")
    for gb in CARD_LINES_GB:
        ax.axhline(gb, color="gray", linestyle="--", linewidth=0.8)
        ax.text(len(names) - 0.5, gb, f"{gb} GB", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(ylabel="GiB", title="Flux-dev at 1024x1024: VRAM per level (planner)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "vram_per_level.png", dpi=120)
    plt.close(fig)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": JSON has no such numbers
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write(out: Path, results: dict, images: dict[str, list[np.ndarray]], prompts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(results))
    grid(images, prompts).save(out / "grid.png")
    plots(out, results)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
