"""The causal low-pass path (model.frequency_mix): BSARec's filter at the newest position, and no look-ahead."""

import torch

from seqrank.training.model import EncoderConfig, SequenceEncoder, low_pass_kernel


def test_kernel_equals_bsarec_fft_filter_at_the_newest_position():
    torch.manual_seed(0)
    length, cutoff = 50, 5
    x = torch.randn(3, length, 8)
    spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
    spectrum[:, cutoff // 2 + 1 :, :] = 0
    bsarec_low_pass = torch.fft.irfft(spectrum, n=length, dim=1, norm="ortho")[:, -1]
    ours = (low_pass_kernel(length, cutoff).view(1, length, 1) * x.flip(1)).sum(1)
    torch.testing.assert_close(ours, bsarec_low_pass, atol=1e-5, rtol=1e-5)


def test_mixed_encoder_never_looks_ahead():
    torch.manual_seed(0)
    for backbone in ("gpt2", "llama"):
        model = SequenceEncoder(EncoderConfig(num_items=50, max_len=10, backbone=backbone, frequency_mix=0.7)).eval()
        items = torch.randint(1, 51, (2, 6))
        lengths = torch.tensor([6, 4])
        changed = items.clone()
        changed[0, 5] = (items[0, 5] % 50) + 1
        before, after = model(items, None, lengths), model(changed, None, lengths)
        torch.testing.assert_close(before[0, :5], after[0, :5])
        assert not torch.allclose(before[0, 5], after[0, 5])
        assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == "FrequencyMixedAttention" for m in model.modules())
