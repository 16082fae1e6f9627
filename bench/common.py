"""Shared helpers of the benchmarks: lab commands, the results file, the machine's state, stats."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "latest.json"
PG_BIN = "/usr/lib/postgresql/15/bin"


def barman(*args: str, check: bool = True) -> str:
    return subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), *args], check=check, capture_output=True,
                          text=True).stdout


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None)
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "mem_mib": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def stats(xs: list[float]) -> dict[str, float | int | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(xs), "min": round(min(xs), 3), "median": round(statistics.median(xs), 3),
            "max": round(max(xs), 3)}


def save_section(name: str, data: dict[str, Any]) -> Path:
    """Replace one section of bench/results/latest.json (the other benchmarks' sections are kept)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads(RESULTS.read_text())
        if not isinstance(doc, dict) or "sections" not in doc:
            doc = {"sections": {}}
    except (OSError, ValueError):
        doc = {"sections": {}}
    doc["machine"] = machine()
    doc["sections"][name] = {"when": datetime.now(UTC).isoformat(), **data}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(RESULTS)
    return RESULTS


def drop_section(name: str) -> None:
    """Remove a section of bench/results/latest.json (e.g. the partial one once the final is written)."""
    try:
        doc = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return
    if doc.get("sections", {}).pop(name, None) is not None:
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(RESULTS)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
