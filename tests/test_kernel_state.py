"""kernels.state: the scratch buffers, tables and device properties the kernels keep, sized and freed through one API."""

import numpy as np
import torch

from kernels import formats, state
from kernels.reference import iquants as iquants_reference
from kernels.reference import nf4 as nf4_reference


def test_scratch_is_reused_grown_counted_and_released():
    state.release()
    assert state.held_bytes() == 0
    small = state.scratch(100, "cpu", torch.float16)
    assert small.shape == (100,) and small.dtype == torch.float16
    again = state.scratch(50, "cpu", torch.float16)
    assert again.data_ptr() == small.data_ptr()  # the same memory, not a new allocation
    assert state.held_bytes("cpu") == 200
    state.reserve_scratch(1000, "cpu", torch.float16)
    assert state.held_bytes() == 2000 and state.scratch(1000, "cpu", torch.float16).shape == (1000,)
    state.scratch(10, "cpu", torch.float32)  # one buffer per dtype
    assert state.held_bytes() == 2040
    state.release("cpu")
    assert state.held_bytes() == 0


def test_tables_are_the_registry_code_books_built_once_per_device():
    state.release()
    nf4 = state.table("nf4", "cpu")
    assert nf4.dtype == torch.float32 and state.table("nf4", torch.device("cpu")) is nf4
    # the one code book that the reference (the oracle) reads too
    assert np.array_equal(nf4.numpy(), nf4_reference.NF4_VALUES)
    assert state.table("iq4", "cpu").tolist() == list(iquants_reference.KVALUES.astype(np.float32))
    assert state.held_bytes() == 2 * 16 * 4
    built = []
    state.constants("test", "cpu", lambda d: built.append(d) or {"a": torch.zeros(3)})
    state.constants("test", "cpu", lambda d: built.append(d) or {"a": torch.zeros(3)})
    assert built == [torch.device("cpu")] and state.held_bytes() == 2 * 16 * 4 + 12
    state.release()
    assert state.held_bytes() == 0 and len(formats.NF4_VALUES) == 16


def test_devices_are_keyed_with_their_index():
    assert state.device_key("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        assert state.device_key("cuda") == torch.device("cuda", current)
        assert state.multiprocessor_count("cuda") == torch.cuda.get_device_properties(current).multi_processor_count
