"""Model FLOPs utilisation and the manifest's wall-time split."""

import pytest

from bam_pipeline.model.counting import device_peak_tflops, mfu
from bam_pipeline.training.throughput import PhaseTimer, peak_tflops


def test_known_devices_and_utilisation():
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0 and device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H200") == 989.0 and device_peak_tflops("Some CPU") is None
    # 10,000 tokens/s at 6e10 training FLOPs per token on 2 devices of 600 TFLOP/s: 0.5
    assert mfu(10_000, 6e10, 600.0, devices=2) == pytest.approx(0.5)
    assert peak_tflops(123.0) == 123.0


def test_wall_time_split_adds_up():
    timer = PhaseTimer(tokens_per_batch=1024, train_flops_per_token=1e6, peak=None)
    timer.seconds.update(train=6.0, validation=1.5)
    timer.add_checkpoint(0.5)
    assert timer.split(total=10.0, publish=1.0) == {"train_s": 6.0, "validation_s": 1.5, "checkpoint_s": 0.5,
                                                     "publish_s": 1.0, "other_s": 1.0, "total_s": 10.0}
