"""bench/floors.py's arithmetic (the bound on the cores, the ceiling, the verdict) and its
plan of the image writer's device I/O, without a device."""

from __future__ import annotations

import hashlib

import pytest
import zstandard

from bench import floors
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer

MIB = 1 << 20


def test_bound_is_the_sum_over_the_cores_when_no_stage_dominates() -> None:
    assert floors.bound_s({"a": 1.0, "b": 1.0, "c": 1.0}, 2) == pytest.approx(1.5)


def test_bound_is_the_largest_stage_when_one_thread_cannot_be_split() -> None:
    assert floors.bound_s({"decode": 3.0, "hash": 0.5}, 2) == pytest.approx(3.0)
    assert floors.bound_s({"decode": 3.0, "hash": 0.5}, 1) == pytest.approx(3.5)


def test_bound_refuses_no_cores_and_is_zero_for_no_stage() -> None:
    with pytest.raises(ValueError, match="cores"):
        floors.bound_s({"a": 1.0}, 0)
    assert floors.bound_s({}, 2) == 0.0


def test_cpu_floor_figures_per_gib_and_bound() -> None:
    cpu = floors.CpuFloor({"a": 1.0, "b": 0.5}, 2 << 30, 2)
    got = cpu.figures()
    assert got["cpu_s_per_gib"] == {"a": 0.5, "b": 0.25}
    assert got["cpu_sum_s"] == 1.5
    assert got["cpu_floor_s"] == 1.0  # the largest stage beats 1.5 / 2
    assert "kernel" in str(got["note"])


def test_ceiling_is_the_anchor_over_the_larger_floor() -> None:
    assert floors.ceiling(1.2, 1.0, 0.8) == pytest.approx(1.2)
    assert floors.ceiling(1.2, 0.6, 0.8) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        floors.ceiling(1.0, 0.0, 0.0)


def test_verdict_says_whether_the_goal_is_below_the_ceiling() -> None:
    kw = {"measured_ratio": 0.6, "anchor_s": 1.2, "subject_s": 2.0}
    reachable = floors.verdict(goal=0.85, io_floor_s=1.0, cpu_floor_s=0.9, **kw)
    assert reachable["ceiling_ratio"] == 1.2
    assert reachable["goal_below_ceiling"] is True
    assert reachable["bound_by"] == "io"
    assert reachable["subject_over_floor"] == 2.0
    out_of_reach = floors.verdict(goal=0.7, io_floor_s=0.0, cpu_floor_s=2.0, **kw)
    assert out_of_reach["ceiling_ratio"] == 0.6
    assert out_of_reach["goal_below_ceiling"] is False
    assert out_of_reach["bound_by"] == "cpu"


def test_shared_cores_lower_the_ceiling_when_the_io_costs_cpu_too() -> None:
    shared = floors.shared_floor_s(cpu_sum_s=1.7, io_machine_cpu_s=0.9, cores=2)
    assert shared == pytest.approx(1.3)
    got = floors.verdict(
        goal=0.85,
        measured_ratio=0.6,
        anchor_s=1.2,
        subject_s=2.0,
        io_floor_s=1.0,
        cpu_floor_s=0.85,
        shared_s=shared,
    )
    assert got["ceiling_ratio_shared_cores"] == pytest.approx(1.2 / 1.3, abs=1e-3)
    assert got["goal_below_ceiling_shared_cores"] is True
    assert got["ceiling_ratio"] == 1.2


def _image(size: int) -> blockdev.Buffer:
    """`size` bytes of data with zero runs: the first MiB of the body, one scan block in
    the middle of window 0 and the last 2 MiB of the body, and an unaligned tail."""
    buf = blockdev.Buffer(size)
    buf.view[:size] = hashlib.shake_256(b"floors").digest(size)
    head, block = image_writer.HEAD, image_writer.ZERO_BLOCK
    body_end = head + (size - head) // blockdev.ALIGN * blockdev.ALIGN
    for start, end in (
        (head, head + MIB),
        (head + 5 * MIB, head + 5 * MIB + block),
        (body_end - 2 * MIB, body_end),
    ):
        buf.view[start:end] = bytes(end - start)
    return buf


def test_plan_has_the_writers_windows_and_zero_runs() -> None:
    chunk = image_writer.CHUNK
    size = image_writer.HEAD + chunk + 5 * MIB + 1000
    buf = _image(size)
    plan = floors.plan(buf, size)
    head, block = image_writer.HEAD, image_writer.ZERO_BLOCK
    body_end = head + (chunk + 5 * MIB + 1000) // blockdev.ALIGN * blockdev.ALIGN
    assert (plan.head_len, plan.body_end, plan.size) == (head, body_end, size)
    assert [(w.offset, w.length) for w in plan.windows] == [
        (head, chunk),
        (head + chunk, body_end - head - chunk),
    ]
    w0, w1 = plan.windows
    assert [r for r in w0.runs if r[2]] == [(0, MIB, True), (5 * MIB, block, True)]
    # The last window: the last two MiB, then the unaligned rest of a scan block.
    zero1 = [r for r in w1.runs if r[2]]
    assert zero1 and zero1[-1][0] + zero1[-1][1] == w1.length
    assert sum(n for _a, n, _z in w1.runs) == w1.length
    # Every zero run really is zeros, every data run has data, they tile each window.
    for w in plan.windows:
        pos = 0
        for at, n, zero in w.runs:
            assert at == pos
            pos += n
            part = bytes(buf.view[w.offset + at : w.offset + at + n])
            assert (part == bytes(n)) is zero
        assert pos == w.length
    assert plan.zeroed_bytes == sum(n for w in plan.windows for _a, n, z in w.runs if z)
    assert plan.zeroed_bytes >= 3 * MIB


def test_zstd_decode_cpu_refuses_a_blob_of_another_size() -> None:
    raw = bytes(3 * MIB) + b"x" * 100
    blob = zstandard.ZstdCompressor(level=1).compress(raw)
    assert floors.zstd_decode_cpu(blob, len(raw)) >= 0.0
    with pytest.raises(ValueError, match="decodes to"):
        floors.zstd_decode_cpu(blob, len(raw) + 1)


def test_memcmp_and_channel_stages_run_over_every_byte() -> None:
    size = image_writer.HEAD + 8 * MIB + 4096
    buf = _image(size)
    assert floors.memcmp_cpu(buf, size) >= 0.0
    stages = floors.channel_stages(memoryview(bytes(buf.view[:size])), 256 << 10, scale=2.0)
    assert set(stages) == {"aes256gcm_seal", "aes256gcm_open", "tcp_send", "tcp_recv"}
    assert all(v >= 0.0 for v in stages.values())
