"""The peak-memory meter measures real memory, and the summary is what the records say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.training.reporting import MIB, PeakMemoryMeter, ReportSummary


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc needed")
def test_cpu_peak_sees_a_temporary_allocation():
    meter = PeakMemoryMeter(torch.device("cpu"))
    meter.start()
    block = np.ones(200 * MIB // 8)  # 200 MiB, touched
    del block
    result = meter.stop()
    assert result["peak_rss_delta_bytes"] >= 190 * MIB
    assert "clear_refs" in result["memory_method"]
    # A second window without the allocation does not see the old peak (the high-water mark was reset).
    meter.start()
    second = meter.stop()
    assert second["peak_rss_delta_bytes"] < 50 * MIB


def test_summary_table_and_line():
    summary = ReportSummary(
        steps=3, total_seconds=2.0, median_step_seconds=0.5, trained_tokens=1000, tokens_per_second=500.0,
        final_loss=1.25, device="cpu", world_size=1,
        memory={"peak_memory_bytes": 1536 * MIB, "peak_rss_delta_bytes": 512 * MIB, "memory_method": "x"},
    )
    table = summary.table()
    assert "1,536.0 MiB" in table and "512.0 MiB" in table and "500 tok/s" in table and "1.2500" in table
    assert summary.one_line() == "peak memory 1.61 GB, 500 tok/s, 2 s"
