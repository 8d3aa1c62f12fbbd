"""Device and precision choice of the encoder replica. No GPU here: CUDA availability and GPU ids are passed in
(mocked), and the bf16 GPU path is only checked to be chosen here; scripts/gpu_check.py runs it on a GPU."""

import numpy as np
import pytest
import torch

from seqrank.serving.encoder import BF16_MIN_WIDTH, Placement, choose_placement, torch_threads, weight_dtype
from seqrank.training.model import EncoderConfig, SequenceEncoder, encode_histories


@pytest.mark.parametrize(
    "cuda_available, assigned_gpus, expected",
    [
        (True, 1, Placement("cuda", "auto")),  # a GPU replica on a GPU node
        (True, 0, Placement("cpu", "fp32")),  # num_gpus: 0 on a GPU node: stay off the GPU
        (False, 1, Placement("cpu", "fp32")),  # a GPU was assigned but torch cannot see one (CPU-only wheel)
        (False, 0, Placement("cpu", "fp32")),
    ],
)
def test_gpu_only_when_given_a_gpu_that_torch_sees(cuda_available, assigned_gpus, expected):
    assert choose_placement(cuda_available, assigned_gpus) == expected


@pytest.mark.parametrize(
    "precision, hidden_size, expected",
    [
        ("auto", 64, None),  # the default model is launch-bound on a GPU: fp32
        ("auto", BF16_MIN_WIDTH, torch.bfloat16),
        ("bf16", 64, torch.bfloat16),
        ("fp32", 512, None),
    ],
)
def test_gpu_weights_are_bf16_where_asked_or_wide(precision, hidden_size, expected):
    assert weight_dtype(Placement("cuda", precision), hidden_size) is expected
    assert weight_dtype(choose_placement(False, 1, precision), hidden_size) is None  # a CPU replica: always fp32


def test_bf16_weights_give_float32_vectors_close_to_fp32():
    """The path a bf16 GPU replica takes (weights cast, no autocast), run here on the CPU."""
    torch.manual_seed(0)
    model = SequenceEncoder(EncoderConfig(num_items=50, num_behaviors=2, hidden_size=32, num_layers=2, num_heads=2,
                                          intermediate_size=64)).eval()
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 51, n) for n in (1, 5, 12)]
    behaviors = [rng.integers(1, 3, len(h)) for h in histories]
    reference = encode_histories(model, histories, behaviors)
    vectors = encode_histories(model.to(torch.bfloat16), histories, behaviors)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    relative = np.linalg.norm(vectors - reference) / np.linalg.norm(reference)
    assert 1e-4 < relative < 3e-2  # bf16 rounding, not a different function


@pytest.mark.parametrize("cpus, threads", [(1.0, 1), (4.0, 4), (0.5, 1), (2.7, 2)])
def test_torch_threads_follow_the_replica_cpus(cpus, threads):
    assert torch_threads(cpus) == threads
