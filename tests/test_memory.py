"""No (N, N) tensor on the chunked and blocked paths: peak memory stays O(N * window).

At N = 16384 a single (N, N) float32 score matrix is 1 GiB (and a bool mask 256 MiB). We reset
the process's peak resident set size with the lab's probe (:func:`swa_lib.lab.cost.peak_memory`)
and check that a forward and backward pass raise the peak by far less.
PyTorch's CPU allocator returns large blocks to the operating system, so the RSS peak tracks
what the call allocates.
"""

import pytest
import torch

import swa_lib
from swa_lib.lab.cost import can_measure_cpu_memory, peak_memory

N = 16384
BUDGET = 128 * 2**20  # bytes: 1/8 of one (N, N) float32 matrix


pytestmark = pytest.mark.skipif(not can_measure_cpu_memory(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")


@pytest.mark.parametrize("backend", ["blocked", "chunked"])
def test_forward_and_backward_stay_far_below_one_n_by_n_matrix(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, N, 16, generator=gen).requires_grad_() for _ in range(3))

    def step():
        out = swa_lib.sliding_window_attention(q, k, v, (16, 16), backend=backend)
        out.sum().backward()

    step()  # warm up (first-call allocations of the library and autograd)
    used = peak_memory(step)
    assert used < BUDGET, f"{backend}: peak RSS grew by {used / 2**20:.0f} MiB (one (N, N) fp32 matrix is {N * N * 4 / 2**20:.0f} MiB)"


def test_the_measurement_sees_a_dense_matrix():
    """The same probe does notice an (N, N) allocation, so the test above can fail."""
    used = peak_memory(lambda: torch.ones(N, N // 4).sum())  # 256 MiB
    assert used > BUDGET
