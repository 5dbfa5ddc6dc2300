"""`LoRAStack`: the LoRAs applied to one Flux transformer, each with its weight, in runtime or merge mode."""

from __future__ import annotations

from torch import nn

from engine.lora.merge import merged_linear
from engine.lora.runtime import LoRALinear, module_device
from engine.lora.updates import LoRA, LoRAUpdate

MODES = ("runtime", "merge")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class LoRAStack:
    """LoRAs applied to `model` (a Flux), in order, each with a weight; every change takes effect on the model at once.

    runtime: each targeted Linear is wrapped in a `LoRALinear` holding the factors of every LoRA that touches it; the
    base weights stay as they are, and a weight change only rewrites the wrappers' scales.
    merge: each targeted Linear is replaced by a merged copy (`engine.lora.merge`: lossy on quantized weights); the
    originals wait in CPU memory, so that a weight change re-merges from them and `clear()` puts them back.

    The modulation Linears are targeted like any other, so modulations precomputed afterwards include their LoRAs.
    A caller that placed the model places it again after any change: new modules appear, and block streaming's
    staged copies would keep the old weights."""

    def __init__(self, model: nn.Module, mode: str = "runtime"):
        self.model = model
        self.mode = check_mode(mode)
        self.loras: list[LoRA] = []
        self.weights: list[float] = []
        self._originals: dict[str, nn.Module] = {}  # module name -> the Linear a LoRA replaced

    def add(self, lora: LoRA, weight: float = 1.0) -> None:
        self._change(self.loras + [lora], self.weights + [float(weight)], self.mode)

    def set_weights(self, weights) -> None:
        """One weight per LoRA, in the order they were added."""
        weights = [float(w) for w in weights]
        if len(weights) != len(self.loras):
            raise ValueError(f"{len(weights)} LoRA weight(s) given for {len(self.loras)} loaded LoRA(s)")
        if self.mode == "merge":
            self._change(self.loras, weights, self.mode)
            return
        self.weights = weights
        for module in self.model.modules():
            if isinstance(module, LoRALinear):
                module.set_weights(weights)

    def set_mode(self, mode: str) -> None:
        if check_mode(mode) != self.mode:
            self._change(self.loras, self.weights, mode)

    def clear(self) -> None:
        self._change([], [], self.mode)

    @property
    def nbytes(self) -> int:
        """Bytes the LoRA factors take in the model (runtime mode; merged LoRAs take none)."""
        return sum(m.lora_nbytes for m in self.model.modules() if isinstance(m, LoRALinear))

    def describe(self) -> list[dict]:
        return [{"name": lora.name, "weight": weight, "format": lora.format, "file": lora.path}
                for lora, weight in zip(self.loras, self.weights)]

    # ---------------------------------------------------------------------------------------------- applying

    def _change(self, loras: list[LoRA], weights: list[float], mode: str) -> None:
        """Apply this set, or leave the model as it was when that fails (a merge that cannot requantize)."""
        before = (self.loras, self.weights, self.mode)
        self._restore()
        try:
            self.loras, self.weights, self.mode = loras, weights, mode
            self._apply()
        except BaseException:
            self._restore()
            self.loras, self.weights, self.mode = before
            self._apply()
            raise

    def _apply(self) -> None:
        by_module: dict[str, list[tuple[LoRAUpdate, int]]] = {}
        for index, lora in enumerate(self.loras):
            for update in lora.updates:
                by_module.setdefault(update.module, []).append((update, index))
        dtype = self.model.dtype
        for name, updates in by_module.items():
            original = self.model.get_submodule(name)
            if self.mode == "runtime":
                replacement = LoRALinear(original, updates, self.weights, dtype)
            else:
                device = module_device(original)
                merged = merged_linear(name, original, [(u, self.weights[i]) for u, i in updates])
                replacement = merged.to(device)
                original.to("cpu")
            self._originals[name] = original
            self._set(name, replacement)

    def _restore(self) -> None:
        for name, original in self._originals.items():
            self._set(name, original)
        self._originals = {}

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, module)
