import math

import pytest
import torch

from engine.sampling import denoise, get_noise, get_schedule, image_ids, pack, prepare, unpack


@pytest.mark.parametrize("steps", [1, 4, 20, 28, 50])
@pytest.mark.parametrize("width,height", [(256, 256), (512, 768), (1024, 1024), (1360, 768), (2048, 2048)])
def test_schedule_matches_bfl_formulas(steps, width, height):
    seq_len = math.ceil(height / 16) * math.ceil(width / 16)
    mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
    for shift in (True, False):
        got = get_schedule(steps, seq_len, shift=shift)
        assert len(got) == steps + 1
        for i, t in enumerate(got):
            plain = 1 - i / steps
            if shift:
                want = 0.0 if plain == 0 else math.exp(mu) / (math.exp(mu) + (1 / plain - 1))
            else:
                want = plain
            assert abs(t - want) <= 1e-12, (i, t, want)


def test_pack_is_bfl_rearrange_and_unpack_inverts_it():
    x = torch.randn(2, 16, 6, 10)
    packed = pack(x)
    assert packed.shape == (2, 15, 64)
    # b c (h ph) (w pw) -> b (h w) (c ph pw), written out element by element
    for h in range(3):
        for w in range(5):
            for c in range(16):
                for ph in range(2):
                    for pw in range(2):
                        assert packed[1, h * 5 + w, c * 4 + ph * 2 + pw] == x[1, c, 2 * h + ph, 2 * w + pw]
    assert torch.equal(unpack(packed, 48, 80), x)


def test_ids_and_prepare():
    ids = image_ids(2, 4, 6)
    assert ids.shape == (2, 6, 3)
    assert ids[0, :, 0].eq(0).all()
    assert ids[0, :, 1].tolist() == [0, 0, 0, 1, 1, 1] and ids[0, :, 2].tolist() == [0, 1, 2, 0, 1, 2]
    out = prepare(torch.zeros(2, 16, 4, 6), torch.ones(1, 7, 8), torch.ones(1, 5))
    assert out["txt"].shape == (2, 7, 8) and out["vec"].shape == (2, 5)
    assert out["txt_ids"].shape == (2, 7, 3) and not out["txt_ids"].any()


def test_noise_is_seeded_on_the_cpu_and_rounds_sizes_up():
    a = get_noise(2, 200, 136, "cpu", torch.float32, seed=7)
    assert a.shape == (2, 16, 26, 18)
    want = torch.randn(2, 16, 26, 18, generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(a, want)
    assert not torch.equal(a, get_noise(2, 200, 136, "cpu", torch.float32, seed=8))


def test_denoise_is_the_euler_loop_and_true_cfg_mixes_velocities():
    calls = []

    def model(img, img_ids, txt, txt_ids, y, timesteps, guidance, modulations=None, step=None):
        calls.append(float(timesteps[0]))
        return txt.mean() * torch.ones_like(img) + timesteps[:, None, None]

    img = torch.zeros(1, 4, 64)
    ts = [1.0, 0.75, 0.25, 0.0]
    txt, neg = torch.full((1, 3, 8), 2.0), torch.full((1, 3, 8), -1.0)
    out = denoise(model, img, None, txt, None, None, ts)
    want = sum((b - a) * (2.0 + a) for a, b in zip(ts[:-1], ts[1:]))
    assert torch.allclose(out, torch.full_like(img, want))
    calls.clear()
    out = denoise(model, img, None, txt, None, None, ts, true_cfg=3.0, negative=(neg, None))
    want = sum((b - a) * ((-1.0 + a) + 3.0 * ((2.0 + a) - (-1.0 + a))) for a, b in zip(ts[:-1], ts[1:]))
    assert torch.allclose(out, torch.full_like(img, want))
    assert calls == [1.0, 1.0, 0.75, 0.75, 0.25, 0.25]
