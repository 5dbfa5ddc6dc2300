"""Prompt adherence of the shipped demo model on combinations it never saw: `python -m bench.demo_eval`.

Every held-out (color, shape, background) prompt is generated with several seeds through the public pipeline (the
shipped files, the real loaders) and judged against the synthetic world's own ground truth:
- background color: the median of the image border, nearest palette color;
- object color: the median of the pixels that differ from the background, nearest palette color;
- shape: the object mask against each shape rendered by the world's own renderer at the mask's centre and a range
  of sizes; the best intersection-over-union wins;
- shape, any aspect: the same with each shape's template stretched to the mask's bounding box, so a square drawn as
  a rectangle or a circle drawn as an ellipse still counts as what it most resembles (reported next to the strict
  one, not instead of it).
The judge is checked on rendered ground-truth scenes first (`judge_accuracy`); accuracies are per attribute. The Q8_0
GGUF and the BF16 safetensors it came from make the same images (PSNR reported).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench import demo_world
from engine.pipeline import to_pil

PALETTE = np.array(list(demo_world.COLORS.values()), dtype=np.float32)
NAMES = list(demo_world.COLORS)
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Judgement:
    background: str
    color: str | None  # None: no object found
    shape: str | None
    shape_any_aspect: str | None = None
    stray_pixels: int = 0  # pixels unlike the background outside the object's region, ignored by the verdicts


TEMPLATE_SIDE = 64


def box_templates() -> dict[str, np.ndarray]:
    """Each shape cropped to its own bounding box, as float coverage (TEMPLATE_SIDE-pixel renders)."""
    templates = {}
    for shape in demo_world.SHAPES:
        mask = demo_world.shape_mask(shape, TEMPLATE_SIDE / 2, TEMPLATE_SIDE / 2, TEMPLATE_SIDE - 2, TEMPLATE_SIDE)
        ys, xs = np.nonzero(mask > 0.5)
        templates[shape] = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return templates


BOX_TEMPLATES = box_templates()


def shape_in_box(mask: np.ndarray) -> str:
    """The shape whose template, stretched to the mask's bounding box, overlaps the mask best (IoU)."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    best, best_iou = None, -1.0
    for shape, template in BOX_TEMPLATES.items():
        stretched = np.asarray(Image.fromarray(template).resize((x1 - x0, y1 - y0), Image.BILINEAR)) > 0.5
        iou = (stretched & box).sum() / max((stretched | box).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def nearest_color(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def object_mask(differs: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of the pixels that differ from the background: the object. A decoded image can
    carry a few stray pixels elsewhere (an autoencoder's speck in a corner), which would otherwise stretch the
    object's bounding box across the picture and misplace every template."""
    from skimage.measure import label

    regions = label(differs, connectivity=2)
    if regions.max() == 0:
        return differs
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == sizes.argmax()


def judge(image: np.ndarray) -> Judgement:
    """What a (H, W, 3) uint8 image shows, by the world's rules."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3),
                             pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=-1))
    differs = distance > 60.0  # palette colors are at least ~90 apart; anti-aliased edges fall on either side
    mask = object_mask(differs)
    stray = int(differs.sum() - mask.sum())
    if mask.sum() < 12:
        return Judgement(background, None, None, stray_pixels=stray)
    color = nearest_color(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    best, best_iou = None, -1.0
    for shape in demo_world.SHAPES:
        for scale in np.linspace(0.8, 1.3, 11):
            # a triangle's and star's bounding box is smaller than the circumscribed diameter `size`
            size = extent * scale * (1.0 if shape in ("circle", "square") else 1.1)
            if shape == "triangle":  # the centroid of an upward triangle sits below its box centre
                centre_y = cy + size * 0.125
            else:
                centre_y = cy
            template = demo_world.shape_mask(shape, cx, centre_y, size, image.shape[0]) > 0.5
            iou = (template & mask).sum() / max((template | mask).sum(), 1)
            if iou > best_iou:
                best, best_iou = shape, iou
    return Judgement(background, color, best, shape_in_box(mask), stray)


def judge_accuracy(count: int = 200, seed: int = 1) -> dict[str, float]:
    """The judge on rendered ground truth (should be ~1.0 for every attribute)."""
    rng = np.random.default_rng(seed)
    scenes = [demo_world.random_scene(rng, demo_world.all_combinations()) for _ in range(count)]
    verdicts = [judge(demo_world.render(s)) for s in scenes]
    return score(scenes, verdicts)


def autoencoder_accuracy(ae, count: int = 200, seed: int = 2) -> dict[str, float]:
    """The judge on held-out scenes as the shipped model was last trained on (centred objects) passed through the
    shipped autoencoder (encode, decode): the ceiling the transformer's samples can reach, since they are decoded by
    the same decoder."""
    rng = np.random.default_rng(seed)
    scenes = [demo_world.random_scene(rng, demo_world.held_out_combinations(), centred=True) for _ in range(count)]
    pixels = torch.stack([torch.from_numpy(demo_world.render(s)).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    with torch.inference_mode():
        images = to_pil(ae.decode(ae.encode(pixels)))
    return score(scenes, [judge(np.asarray(im)) for im in images])


def score(scenes, verdicts) -> dict[str, float]:
    n = len(scenes)
    return {"background": sum(v.background == s.background for s, v in zip(scenes, verdicts)) / n,
            "color": sum(v.color == s.color for s, v in zip(scenes, verdicts)) / n,
            "shape": sum(v.shape == s.shape for s, v in zip(scenes, verdicts)) / n,
            "shape, any aspect": sum(v.shape_any_aspect == s.shape for s, v in zip(scenes, verdicts)) / n}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def generate(pipe, prompts: list[str], seeds: list[int], steps: int | None,
             guidance: float | None = None, true_cfg: float | None = None) -> list[np.ndarray]:
    images = []
    for prompt, seed in tqdm(list(zip(prompts, seeds)), desc="generating", dynamic_ncols=True):
        images.append(np.asarray(pipe(prompt, seed=seed, steps=steps, guidance=guidance, true_cfg=true_cfg,
                                      progress=False)[0]))
    return images


def grid(images: list[np.ndarray], columns: int) -> np.ndarray:
    rows = [np.concatenate(images[i:i + columns], axis=1) for i in range(0, len(images), columns)]
    rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
    return np.concatenate(rows, axis=0)


def main(argv=None) -> None:
    from PIL import Image

    from engine.demo import load_pipeline

    parser = argparse.ArgumentParser(prog="python -m bench.demo_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per held-out combination (default 4: 112 images)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the demo's own)")
    parser.add_argument("--guidance", type=float, help="distilled guidance scale (default: the demo's own)")
    parser.add_argument("--true-cfg", type=float,
                        help="classifier-free guidance against the empty prompt, two passes a step (default: the "
                             "demo's own)")
    parser.add_argument("--write", action="store_true",
                        help="write bench/results/demo-eval.md and demo-eval-grid.png (else only print)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    combinations = demo_world.held_out_combinations()
    prompts, seeds, scenes = [], [], []
    for c, s, b in combinations:
        for seed in range(args.seeds):
            prompts.append(demo_world.Scene(c, s, b, 0, 0, 0).prompt)
            seeds.append(seed)
            scenes.append(demo_world.Scene(c, s, b, 0, 0, 0))
    start = time.perf_counter()
    q8 = load_pipeline(device="cpu", dtype=torch.float32, prompt_cache=False)
    q8_images = generate(q8, prompts, seeds, args.steps, args.guidance, args.true_cfg)
    seconds = time.perf_counter() - start
    bf16 = load_pipeline(device="cpu", dtype=torch.float32, prompt_cache=False, transformer="transformer_bf16")
    bf16_images = generate(bf16, prompts[::args.seeds], seeds[::args.seeds], args.steps, args.guidance,
                           args.true_cfg)
    psnrs = [psnr(a, b) for a, b in zip(q8_images[::args.seeds], bf16_images)]

    truth = judge_accuracy()
    ceiling = autoencoder_accuracy(q8.ae)
    verdicts = [judge(im) for im in q8_images]
    accuracy = score(scenes, verdicts)
    stray = [v.stray_pixels for v in verdicts if v.stray_pixels]
    lines = [
        "# Demo model: prompt adherence on held-out combinations",
        "",
        f"Measured by `python -m bench.demo_eval --seeds {args.seeds}` on the shipped demo model (a "
        f"{q8.defaults.width}x{q8.defaults.height} toy Flux, not Flux-dev), CPU, fp32 compute.",
        f"{len(prompts)} images: {len(combinations)} (color, shape, background) combinations never seen in training "
        f"x {args.seeds} seeds, {q8.defaults.steps if args.steps is None else args.steps} steps, distilled guidance "
        f"{q8.defaults.guidance if args.guidance is None else args.guidance}, true CFG "
        f"{q8.defaults.true_cfg if args.true_cfg is None else args.true_cfg}, "
        f"transformer {Path(q8.files['transformer']).name}; {seconds:.0f} s in all.",
        "",
        "| attribute | accuracy | judge on ground-truth renders | judge on renders through the autoencoder |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {accuracy[k]:.3f} | {truth[k]:.3f} | {ceiling[k]:.3f} |" for k in accuracy),
        "",
        "The last column is the ceiling for generated images: held-out scenes (200) rendered, encoded and decoded by "
        "the shipped autoencoder, then judged.",
        "",
        f"The judge reads the object as the largest connected region unlike the background. Pixels unlike the "
        f"background outside it (specks, a second object) are ignored by the verdicts and counted here: "
        f"{len(stray)} of {len(verdicts)} images have any"
        + (f", at most {max(stray)} pixels (of {q8_images[0].shape[0] * q8_images[0].shape[1]})." if stray else "."),
        "",
        f"Q8_0 GGUF vs the BF16 safetensors it was converted from, same prompts and seeds ({len(psnrs)} images): "
        f"PSNR mean {np.mean(psnrs):.1f} dB, worst {min(psnrs):.1f} dB.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        (RESULTS / "demo-eval.md").write_text(report)
        picture = grid(q8_images[::args.seeds], columns=7)
        Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(
            RESULTS / "demo-eval-grid.png")
        print("wrote bench/results/demo-eval.md and bench/results/demo-eval-grid.png")


if __name__ == "__main__":
    main()
