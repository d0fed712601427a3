"""Shared fixtures: tiny models built from a config (no download) and small real tasks."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and several test processes
# on a 2-core machine thrash when each spins two OpenMP threads.
torch.set_num_threads(int(os.environ.get("TL_SKILL_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_gpt2():
    from tl_skill import load_model

    return load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    from tl_skill import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_bert():
    from tl_skill import load_model

    return load_model("tiny-bert", device="cpu")


@pytest.fixture(scope="session", params=["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-gemma3", "tiny-gemma2"])
def tiny_model(request):
    from tl_skill import load_model

    return load_model(request.param, device="cpu")


@pytest.fixture(scope="session")
def small_task():
    """rotten_tomatoes cut to 160 train / 60 dev / 60 test examples."""
    from tl_skill import load_task
    from tl_skill.data import subsample

    return subsample(load_task("rotten_tomatoes"), {"train": 160, "dev": 60, "test": 60})


@pytest.fixture(scope="session")
def small_multiclass_task():
    """5-class BBC News cut to 150 / 60 / 60 examples."""
    from tl_skill import load_task
    from tl_skill.data import subsample

    return subsample(load_task("bbc_news"), {"train": 150, "dev": 60, "test": 60})


def interrupted(monkeypatch, target, attr: str, when: int, fn, *args, **kwargs):
    """Call `fn(*args, **kwargs)` with `target.attr` raising KeyboardInterrupt on its `when`-th call.

    Asserts that the interrupt reached the caller; `target.attr` is restored afterwards.
    """
    import pytest

    real = getattr(target, attr)
    calls = []

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == when:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(target, attr, interrupting)
    try:
        with pytest.raises(KeyboardInterrupt):
            fn(*args, **kwargs)
    finally:
        monkeypatch.setattr(target, attr, real)
