"""The demo's training script: its checkpoints resume exactly, and the shipped checkpoint of its finished stages
belongs to the configuration it trains with (the resume command in bench/demo_checkpoint/README.md depends on it)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from bench.train_demo import DemoConfig, load_training_state, save_training_state

CHECKPOINT = Path(__file__).parent.parent / "bench" / "demo_checkpoint"


def test_shipped_checkpoint_has_the_training_configuration():
    assert json.loads((CHECKPOINT / "config.json").read_text()) == asdict(DemoConfig())


def _steps(model, optimizer, count, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        loss = model(torch.randn(8, 4, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_state_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    _steps(model, optimizer, 3, seed=1)
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    save_training_state(tmp_path / "state.safetensors", model, optimizer, 3, {f"ema.{k}": v for k, v in ema.items()})

    resumed = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=5.0)  # the saved learning rate must win
    step, extra = load_training_state(tmp_path / "state.safetensors", resumed, resumed_optimizer)
    assert step == 3
    assert all(torch.equal(extra[f"ema.{k}"], v) for k, v in ema.items())

    _steps(model, optimizer, 2, seed=2)
    _steps(resumed, resumed_optimizer, 2, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))
