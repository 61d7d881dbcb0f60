"""torch_threads sets torch's thread count inside the block and restores it, also on error."""

from __future__ import annotations

import pytest
import torch

from asymflow.threads import torch_threads


def test_the_thread_count_is_set_inside_and_restored_after_an_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="boom"), torch_threads(target):
        assert torch.get_num_threads() == target
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
