"""Generic fixtures: cached tiny models (built once per session, never mutated by tests) and inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from moeprune.arch.tiny import tiny_model

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_cache():
    """``tiny_cache(arch, dtype=torch.float32)``: a shared tiny model; deepcopy before mutating it."""
    cache: dict[tuple[str, torch.dtype], torch.nn.Module] = {}

    def get(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if (arch, dtype) not in cache:
            cache[(arch, dtype)] = tiny_model(arch, dtype=dtype)
        return cache[(arch, dtype)]

    return get


@pytest.fixture
def fresh_tiny(tiny_cache):
    """``fresh_tiny(arch)``: a private deep copy of the cached tiny model."""
    return lambda arch, dtype=torch.float32: copy.deepcopy(tiny_cache(arch, dtype))


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    """A fixed ``[2, 9]`` batch of token ids (ids 0-2 are pad/bos/eos in the tiny configs)."""
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(3))
