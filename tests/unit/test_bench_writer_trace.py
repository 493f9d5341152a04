"""bench.writer_trace's summary of a stream's spans (the device calls counted apart)."""

from __future__ import annotations

from bench import writer_trace

MIB = 1 << 20


def test_summary_counts_each_device_call_with_its_bytes_and_flush_overlap() -> None:
    spans: list[writer_trace.Span] = [
        ("sync", 0, 0.10, 0.20),
        ("zero", 4 * MIB, 0.00, 0.01),  # before the flush
        ("zero", 2 * MIB, 0.15, 0.25),  # during it: held up
        ("pwrite", 10 * MIB, 0.30, 0.31),
        ("pread", 16 * MIB, 0.31, 0.33),
    ]
    out = writer_trace.summary(spans, 0.4)
    zero = out["zero"]
    assert isinstance(zero, dict)
    assert zero["n"] == 2 and zero["mib"] == 6.0 and zero["during_sync_n"] == 1
    assert zero["max_s"] == 0.1 and zero["total_s"] == 0.11
    pwrite, pread = out["pwrite"], out["pread"]
    assert isinstance(pwrite, dict) and isinstance(pread, dict)
    assert pwrite["mib"] == 10.0 and pread["mib"] == 16.0 and pread["during_sync_n"] == 0
    # the window kinds carry no byte count
    sync = out["sync"]
    assert isinstance(sync, dict) and "mib" not in sync
