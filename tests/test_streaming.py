"""Block streaming: a Flux whose blocks are streamed gives exactly the resident model's output (CPU: synchronous
copies through the same slots; CUDA: copies on a second stream, overlapping compute, within two blocks of VRAM)."""

import dataclasses
import time

import pytest
import torch

from engine.memory import GiB, plan_memory
from engine.module_tensors import tensor_places, unique_tensors
from engine.streaming import apply_plan, stream_blocks
from flux_model import Flux, FluxConfig
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear

TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=128, mlp_ratio=4.0,
                  num_heads=2, depth=2, depth_single_blocks=4, axes_dim=[8, 28, 28], theta=10_000, qkv_bias=True,
                  guidance_embed=True)


def tiny_flux(quantize: bool = True) -> Flux:
    """A random tiny Flux whose block Linears are QuantLinears when `quantize` (FP8 bytes: a QTensor as a GGUF's
    would be, decoded by the torch codecs; the Triton interpreter would make the test minutes long)."""
    torch.manual_seed(0)
    model = Flux(TINY).to(torch.bfloat16).eval().requires_grad_(False)
    if quantize:
        for name, module in list(model.named_modules()):
            if name.startswith(("double_blocks.", "single_blocks.")) and isinstance(module, torch.nn.Linear):
                parent, _, leaf = name.rpartition(".")
                weight = QTensor.quantize(module.weight.float(), "F8_E4M3")
                setattr(model.get_submodule(parent), leaf, QuantLinear(weight, module.bias))
    return model


def inputs(batch=1, h=8, w=8, txt_len=16, steps=2, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    img = torch.randn(batch, h * w, 64, generator=generator)
    txt = torch.randn(batch, txt_len, 64, generator=generator)
    img_ids = torch.zeros(batch, h * w, 3)
    img_ids[..., 1] = torch.arange(h).repeat_interleave(w)
    img_ids[..., 2] = torch.arange(w).repeat(h)
    txt_ids = torch.zeros(batch, txt_len, 3)
    y = torch.randn(batch, 32, generator=generator)
    tensors = [t.to(device) for t in (img, img_ids, txt, txt_ids)]
    return tensors, (torch.linspace(1, 0, steps), y.to(device), torch.full((batch,), 3.5, device=device))


def run_steps(model, tensors, modulations, steps):
    return [model(*tensors, modulations=modulations, step=s) for s in range(steps)]


def resident_run(model, steps, offload=None):
    """Inputs, precomputed modulations (weights then offloaded to `offload`, if given) and the resident outputs."""
    tensors, vec_inputs = inputs()
    mods = model.precompute_modulations(*vec_inputs)
    if offload is not None:
        model.offload_modulation_weights(offload)
    return tensors, mods, run_steps(model, tensors, mods, steps)


def test_streamed_blocks_give_identical_outputs_on_cpu():
    model = tiny_flux()
    tensors, mods, expected = resident_run(model, 2, offload="cpu")

    streamed = ["double_blocks.1", "single_blocks.0", "single_blocks.2", "single_blocks.3"]
    handle = stream_blocks(model, streamed, "cpu")
    assert handle.slot_bytes > 0
    for _ in range(2):  # the second round starts from blocks prefetched at the end of the first
        got = run_steps(model, tensors, mods, 2)
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
    # between forwards a streamed block holds its CPU home copies, not slot memory
    block = model.get_submodule("single_blocks.2")
    slot_ptrs = {slot.buffer.data_ptr() for slot in handle._slots}
    for place in tensor_places(block):
        t = place.get()
        assert not any(p <= t.data_ptr() < p + handle.slot_bytes for p in slot_ptrs)
    handle.remove()
    assert all(torch.equal(e, g) for e, g in zip(expected, run_steps(model, tensors, mods, 2)))


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_streamed_blocks_stay_in_their_slots(n):
    model = tiny_flux(quantize=False)
    tensors, mods, expected = resident_run(model, 2)
    handle = stream_blocks(model, [f"single_blocks.{i}" for i in range(n)], "cpu")
    loads = []
    original = handle._load
    handle._load = lambda i, slot: (loads.append(i), original(i, slot))
    assert all(torch.equal(e, g) for e, g in zip(expected, run_steps(model, tensors, mods, 2)))
    assert sorted(loads) == list(range(n))  # each copied once, never evicted


def test_unknown_block_name_is_refused():
    with pytest.raises(ValueError, match="single_blocks.9"):
        stream_blocks(tiny_flux(quantize=False), ["single_blocks.9"], "cpu")


def test_apply_plan_streams_what_the_plan_streams():
    model = tiny_flux()
    tensors, mods, expected = resident_run(model, 1, offload="meta")
    plan = plan_memory(model, width=128, height=128, txt_len=16, num_steps=1, budget=GiB, device="cpu")
    plan = dataclasses.replace(plan, streamed_single=(1, 3))  # a tiny model always fits: pretend two did not
    handle = apply_plan(model, plan, "cpu")
    assert len(handle._blocks) == 2
    assert all(torch.equal(e, g) for e, g in zip(expected, run_steps(model, tensors, mods, 1)))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _time_steps(model, tensors, mods, steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    run_steps(model, tensors, mods, steps)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def flux_dev_blocks_on_cuda(depth: int, depth_single: int) -> Flux:
    """Flux-dev-sized blocks with random Q8_0 weights on the GPU."""
    config = FluxConfig.dev()
    config.depth, config.depth_single_blocks = depth, depth_single
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Flux(config).to(torch.bfloat16).eval().requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.startswith(("double_blocks.", "single_blocks.")) and isinstance(module, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            weight = QTensor.quantize(module.weight.float() * 0.02, "Q8_0")
            setattr(model.get_submodule(parent), leaf, QuantLinear(weight, module.bias))
    return model


@cuda
def test_cuda_streaming_is_exact_bounded_and_overlapped():
    """4 double + 8 single Flux-dev blocks at 1024x1024: streaming half of them gives the resident output, needs at
    most the two staging slots beyond the resident part, and runs within 1.15x the resident step time."""
    model = flux_dev_blocks_on_cuda(4, 8)
    tensors, vec_inputs = inputs(h=64, w=64, txt_len=512, steps=4, device="cuda")
    mods = model.precompute_modulations(*vec_inputs)
    model.offload_modulation_weights("meta")
    torch.cuda.empty_cache()

    torch.cuda.reset_peak_memory_stats()
    expected = run_steps(model, tensors, mods, 2)
    resident_peak = torch.cuda.max_memory_allocated()
    resident_time = _time_steps(model, tensors, mods, 4)
    del expected[1:]

    streamed = ["double_blocks.1", "double_blocks.3"] + [f"single_blocks.{i}" for i in range(0, 8, 2)]
    streamed_bytes = sum(t.numel() * t.element_size() for name in streamed
                         for t in unique_tensors(model.get_submodule(name)))
    handle = stream_blocks(model, streamed, "cuda")
    torch.cuda.reset_peak_memory_stats()
    got = run_steps(model, tensors, mods, 2)
    assert torch.equal(expected[0], got[0])
    assert torch.cuda.max_memory_allocated() <= resident_peak - streamed_bytes + handle.slot_bytes + 2**20
    assert _time_steps(model, tensors, mods, 4) <= 1.15 * resident_time


def test_kernel_layout_repacks_every_quantized_linear_but_the_skipped():
    from engine.streaming import to_kernel_layout

    layers = [QuantLinear(QTensor.quantize(torch.randn(16, 256), fmt)) for fmt in ("Q8_0", "F8_E4M3", "NF4", "Q4_0")]
    before = [layer.weight.dequantize() for layer in layers]
    to_kernel_layout([torch.nn.Sequential(*layers)], skip=[layers[3].raw])
    assert [layer.layout for layer in layers] == ["planes", "blocks", "planes", "blocks"]
    for layer, weight in zip(layers, before):
        assert torch.equal(layer.weight.dequantize(), weight)
