"""`python -m engine.generate` end to end on a tiny diffusers folder: a PNG with its parameters, the same pixels for the
same seed, and one line with exit status 2 (nothing written) for bad input."""

import json
import os
import stat

import pytest
import torch
from PIL import Image

from engine.generate import main
from tests.lora_fixtures import random_factors, write
from tests.test_pipeline import write_diffusers_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    return write_diffusers_folder(tmp_path_factory.mktemp("dev"), guidance=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_png_with_parameters_and_is_deterministic(folder, tmp_path, capsys):
    args = ["a red circle", "--model", folder, "--width", 64, "--height", 48, "--steps", 2, "--seed", 5,
            "--device", "cpu"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "a.png")
    assert code == 0, err
    assert "s/step" in out and "total" in out
    image = Image.open(tmp_path / "a.png")
    assert image.size == (64, 48)
    params = json.loads(image.text["flux-quant-engine"])
    assert params["prompt"] == "a red circle" and params["seed"] == 5 and params["steps"] == 2
    assert params["width"] == 64 and params["height"] == 48 and params["guidance"] == 3.5
    assert params["files"]["transformer"] == "transformer" and params["version"]
    assert str(tmp_path.parent) not in image.text["flux-quant-engine"]  # file names, not this machine's folders
    assert "Seed: 5" in image.text["parameters"] and image.text["parameters"].startswith("a red circle\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.png").st_mode) == 0o666 & ~umask

    code, _, err = run(capsys, *args, "--out", tmp_path / "b.png")
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_num_images_and_prompts_file_write_numbered_files(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--prompts-file", prompts, "--num-images", 2, "--model", folder, "--width", 32,
                       "--height", 32, "--steps", 1, "--device", "cpu", "--out", out)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["flux-00000.png", "flux-00001.png", "flux-00002.png", "flux-00003.png"]
    seeds = [json.loads(Image.open(out / n).text["flux-quant-engine"])["seed"] for n in names]
    assert seeds == [0, 1, 0, 1]


def test_plan_without_a_gpu_for_a_named_budget(folder, capsys):
    code, out, err = run(capsys, "--model", folder, "--plan", "--vram", "8", "--width", 1024, "--height", 1024)
    assert code == 0, err
    assert "predicted peak" in out and "budget 8.00 GiB" in out


@pytest.mark.parametrize("argv, message", [
    (["x", "--width", "70"], "--width must be a positive multiple of 16"),
    (["x", "--steps", "0"], "--steps must be at least 1"),
    (["x", "--model", "missing.gguf"], "--model missing.gguf: no such file or directory"),
    (["x", "--device", "tpu"], "--device 'tpu'"),
    (["x", "--bogus"], "unrecognized arguments: --bogus"),
    (["x", "--dtype", "int8"], "invalid choice"),
    ([], "no prompt"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code, out, err = run(capsys, *argv, "--out", tmp_path / "o")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_single_file_model_needs_its_companions(folder, tmp_path, capsys):
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    code, _, err = run(capsys, "x", "--model", weights, "--out", tmp_path / "o")
    assert code == 2 and "also pass --ae, --clip, --t5" in err


def test_schnell_model_ignores_guidance_with_a_warning(tmp_path_factory, capsys, tmp_path):
    schnell = write_diffusers_folder(tmp_path_factory.mktemp("schnell"), guidance=False)
    code, _, err = run(capsys, "x", "--model", schnell, "--guidance", "5", "--width", 32, "--height", 32,
                       "--steps", 1, "--device", "cpu", "--out", tmp_path / "s.png")
    assert code == 0
    assert "--guidance is ignored" in err
    assert json.loads(Image.open(tmp_path / "s.png").text["flux-quant-engine"])["guidance"] == 0.0


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Two kohya LoRAs for the tiny folder's transformer (hidden 64): one on double block 0's image qkv, one on single
    block 0's linear2."""
    folder = tmp_path_factory.mktemp("loras")
    generator = torch.Generator().manual_seed(0)
    files = []
    for name, (n_out, n_in) in {"qkv": (192, 64), "linear2": (64, 320)}.items():
        module = "double_blocks_0_img_attn_qkv" if name == "qkv" else "single_blocks_0_linear2"
        down, up = random_factors(n_out, n_in, 4, generator)
        files.append(write({f"lora_unet_{module}.lora_down.weight": down, f"lora_unet_{module}.lora_up.weight": up},
                           folder / f"{name}.safetensors"))
    return files


@pytest.mark.parametrize("mode", ["runtime", "merge"])
def test_loras_are_applied_and_listed_in_the_png(folder, lora_files, tmp_path, capsys, mode):
    args = ["a red circle", "--model", folder, "--width", 32, "--height", 32, "--steps", 1, "--device", "cpu"]
    code, _, err = run(capsys, *args, "--out", tmp_path / "plain.png")
    assert code == 0, err
    qkv, linear2 = lora_files
    code, out, err = run(capsys, *args, "--lora", f"{qkv}:0.5", "--lora", linear2, "--lora-mode", mode,
                         "--out", tmp_path / "lora.png")
    assert code == 0, err
    assert "LoRA qkv (kohya) on 1 Linear(s) at weight 0.5" in out
    image = Image.open(tmp_path / "lora.png")
    params = json.loads(image.text["flux-quant-engine"])
    assert [(lora["name"], lora["weight"]) for lora in params["loras"]] == [("qkv", 0.5), ("linear2", 1.0)]
    assert [lora["file"] for lora in params["loras"]] == [qkv.name, linear2.name]
    assert params["lora_mode"] == mode
    assert "LoRA: qkv:0.5, LoRA: linear2:1" in image.text["parameters"]
    assert image.tobytes() != Image.open(tmp_path / "plain.png").tobytes()


def test_bad_lora_flags_are_one_line_and_exit_2(folder, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    write({"unknown.weight": torch.zeros(2)}, junk)
    for argv, message in [
        (["--lora", tmp_path / "missing.safetensors"], "missing.safetensors: no such file"),
        (["--lora", f"{junk}:strong"], "the weight after ':' must be a number, got 'strong'"),
        (["--lora", junk], "1 key(s) not understood as a Flux transformer LoRA: unknown.weight"),
        (["--lora-mode", "fuse"], "invalid choice: 'fuse'"),
    ]:
        code, _, err = run(capsys, "x", "--model", folder, "--device", "cpu", *argv, "--out", tmp_path / "o")
        assert code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
