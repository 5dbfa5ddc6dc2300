"""LoRAs on the (quantized) Flux transformer: files in the diffusers / PEFT, kohya, XLabs and BFL layouts
(`read_lora`), applied at run time on top of weights that stay in their format (`LoRALinear`) or merged into them
(`engine.lora.merge`), several at once with their weights (`LoRAStack`)."""

from engine.lora.files import read_lora
from engine.lora.runtime import LoRALinear
from engine.lora.stack import MODES, LoRAStack
from engine.lora.updates import LoRA, LoRAUpdate

__all__ = ["LoRA", "LoRALinear", "LoRAStack", "LoRAUpdate", "MODES", "read_lora"]
