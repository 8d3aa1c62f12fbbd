"""Device and dtype choice of the encoder replica. No GPU here: CUDA availability and GPU ids are passed in
(mocked), and the bf16 path is only checked to be chosen, not run."""

import pytest
import torch

from serving.encoder import Placement, choose_placement, torch_threads


@pytest.mark.parametrize(
    "cuda_available, assigned_gpus, expected",
    [
        (True, 1, Placement("cuda", torch.bfloat16)),  # a GPU replica on a GPU node
        (True, 0, Placement("cpu", None)),  # num_gpus: 0 on a GPU node: stay off the GPU
        (False, 1, Placement("cpu", None)),  # a GPU was assigned but torch cannot see one (CPU-only wheel)
        (False, 0, Placement("cpu", None)),
    ],
)
def test_gpu_and_bf16_only_when_given_a_gpu_that_torch_sees(cuda_available, assigned_gpus, expected):
    assert choose_placement(cuda_available, assigned_gpus) == expected


@pytest.mark.parametrize("cpus, threads", [(1.0, 1), (4.0, 4), (0.5, 1), (2.7, 2)])
def test_torch_threads_follow_the_replica_cpus(cpus, threads):
    assert torch_threads(cpus) == threads
