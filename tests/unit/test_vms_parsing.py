"""Pure helpers of the VM manager: event stream parsing, foreign VMM argv reading."""

from __future__ import annotations

import json

from smechvisord import procs
from smechvisord.vms import _option_value, _size_mb, foreign_doc, parse_events


def pretty(event: str, source: str = "vm") -> str:
    # v42's event monitor: serde_json::to_string_pretty, then a blank line.
    obj = {
        "timestamp": {"secs": 1, "nanos": 2},
        "source": source,
        "event": event,
        "properties": None,
    }
    return json.dumps(obj, indent=2) + "\n\n"


def test_pretty_printed_event_stream() -> None:
    text = pretty("booting") + pretty("booted") + pretty("shutdown", "vmm")
    events = parse_events(text)
    assert [(e["source"], e["event"]) for e in events] == [
        ("vm", "booting"),
        ("vm", "booted"),
        ("vmm", "shutdown"),
    ]


def test_tail_starting_mid_object_and_torn_end() -> None:
    text = pretty("paused") + pretty("shutdown", "vmm")
    cut = text[text.index('"secs"') :]  # starts inside the first object's timestamp
    torn = text + '{\n  "timestamp": {'  # a write cut short
    assert [e.get("event") for e in parse_events(cut)][-1] == "shutdown"
    assert [e["event"] for e in parse_events(torn)] == ["paused", "shutdown"]
    assert parse_events("") == []
    assert parse_events("garbage } {") == []


def test_option_values_from_a_foreign_argv() -> None:
    argv = [
        "cloud-hypervisor",
        "--cpus",
        "boot=4,max=8",
        "--memory=size=2G,shared=on",
        "--disk",
        "path=/a.img,readonly=on",
        "path=/b.img",
        "--api-socket",
        "path=/s",
    ]
    assert _option_value(argv, "--cpus", "boot") == "4"
    assert _option_value(argv, "--cpus", "max") == "8"
    assert _option_value(argv, "--memory", "size") == "2G"
    assert _option_value(argv, "--disk", "path") == "/a.img"
    assert _option_value(argv, "--net", "tap") is None
    assert [_size_mb(x) for x in ("2G", "512M", "1048576K", str(2**30), "", "12X", None)] == [
        2048,
        512,
        1024,
        1024,
        None,
        None,
        None,
    ]


def test_foreign_doc_shape() -> None:
    st = procs.ProcStat(pid=42, state="S", start_ticks=1, cpu_ticks=0, rss_bytes=3 * 2**20)
    doc = foreign_doc(
        42, ["/usr/bin/cloud-hypervisor", "--cpus", "boot=2", "--memory", "size=1024M"], st, 1.5
    )
    assert doc["managed"] is False and doc["id"] == "pid-42"
    assert doc["cpus"] == 2 and doc["memory_mb"] == 1024 and doc["rss_mb"] == 3.0


def test_cpu_sampler_forgets_processes_that_are_gone() -> None:
    sampler = procs.CpuSampler()
    for pid in (10, 11):
        sampler.percent(procs.ProcStat(pid=pid, state="S", start_ticks=5, cpu_ticks=0, rss_bytes=0))
    sampler.retain({11})
    assert sorted(sampler._last) == [(11, 5)]
