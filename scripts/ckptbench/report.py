"""What a run reports: the tables (printed and ``bench.md``), every sample (``bench.json``),
the chart (``bench.png``), and the ratios that say how s3ckptfs compares.

Everything here is a pure function of the outcomes except the writers at the end.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from .common import GiB, MiB, format_size, log
from .measurements import LISTING_OBJECTS, TIME_METRICS, Outcome
from .peers import RCLONE_FLAGS, S3FS_OPTIONS, Tools
from .workload import CONCURRENT_LOADERS


@dataclass
class SizeResult:
    """What one size's run produced."""

    checkpoint_bytes: int | None
    outcomes: dict[str, Outcome]
    transfer: TransferConfig


@dataclass
class Ratio:
    name: str
    value: float
    goal: str


def _server_bound(outcomes: dict[str, Any], unchanged: float) -> float | None:
    """The time the server needs for a save with ``unchanged`` of its bytes copied: the changed part
    sent at the upload floor's rate, the rest copied at the part copy floor's (one after the other:
    on one machine both take the server's CPU)."""
    floor = _median(outcomes, "upload_floor", "seconds")
    copies = _median(outcomes, "part_copy_floor", "seconds")
    if floor is None or copies is None:
        return None
    return (1 - unchanged) * floor + unchanged * copies


def _median(outcomes: dict[str, Outcome], key: str, metric: str) -> float | None:
    outcome = outcomes.get(key)
    return outcome.median(metric) if outcome else None


def compute_ratios(outcomes: dict[str, Outcome]) -> list[Ratio]:
    """s3ckptfs against the baselines and peers measured in the same run (medians)."""
    ratios: list[Ratio] = []

    def add(name: str, numerator: float | None, denominator: float | None, goal: str) -> None:
        if numerator is not None and denominator:
            ratios.append(Ratio(name, numerator / denominator, goal))

    for key, outcome in outcomes.items():
        if not key.startswith("s3ckptfs_write"):
            continue
        name = outcome.measurement.label.replace(" write", "")
        stall = outcome.median("stall")
        durable = outcome.median("durable")
        add(f"{name} stall / local save", stall, _median(outcomes, "local_save", "seconds"), "≤ 1.25")
        add(f"{name} stall / local save + fsync", stall, _median(outcomes, "local_save_fsync", "seconds"), "report")
        add(f"{name} durable / upload floor", durable, _median(outcomes, "upload_floor", "seconds"), "≤ 1.15")
        add(f"{name} durable / save then upload", durable, _median(outcomes, "save_then_upload", "seconds"), "< 1")
        add(f"{name} durable / s3torchconnector durable", durable,
            _median(outcomes, "s3torchconnector_write", "durable"), "report")
        add(f"{name} durable / rclone durable", durable, _median(outcomes, "rclone_write", "durable"), "< 1")
        add(f"{name} durable / s3fs-fuse durable", durable, _median(outcomes, "s3fs_write", "durable"), "< 1")

    floor = _median(outcomes, "upload_floor", "seconds")
    goals = {"s3ckptfs_incremental_0": "≤ 1.0", "s3ckptfs_incremental_50": "≤ 0.65",
             "s3ckptfs_incremental_90": "≤ 0.3", "s3ckptfs_second_name": "≤ 0.15"}
    for key, goal in goals.items():
        outcome = outcomes.get(key)
        if outcome is None:
            continue
        label, first = outcome.measurement.label, outcome.median("first_durable")
        if key == "s3ckptfs_second_name":
            add(f"{label}: complete after the first / first durable", outcome.median("after_first"), first, goal)
            add(f"{label}: complete after the first / server-side copy floor", outcome.median("after_first"),
                _median(outcomes, "copy_floor", "seconds"), "report")
        else:
            add(f"{label}: durable / what this server allows", outcome.median("durable"),
                _server_bound(outcomes, float(key.rsplit("_", 1)[1]) / 100), "report")
        add(f"{label}: durable / first save durable", outcome.median("durable"), first,
            "report" if key == "s3ckptfs_second_name" else goal)
        add(f"{label}: durable / upload floor", outcome.median("durable"), floor, "report")
        add(f"{label}: first save durable / upload floor", first, floor, "report")
    next_goals = {"s3ckptfs_next_50": "≤ 0.60", "s3ckptfs_next_90": "≤ 0.30", "s3ckptfs_next_same": "≤ 0.25",
                  "s3ckptfs_next_0": "report"}
    for key, outcome in outcomes.items():
        base = key.split("@", 1)[0]
        if base in next_goals:
            label = outcome.measurement.label
            add(f"{label}: durable / first save durable (median of per-run ratios)", outcome.median("ratio"), 1.0,
                next_goals[base] if "@" not in key else "report")
            add(f"{label}: durable / upload floor", outcome.median("durable"), floor, "report")
            if "@" in key and base in outcomes:   # a variant against the first option set
                add(f"{label}: durable / [{outcomes[base].measurement.label}] durable", outcome.median("durable"),
                    outcomes[base].median("durable"), "report")
    copies = _median(outcomes, "copy_floor", "seconds")
    add("server-side copy floor / upload floor", copies, floor, "report")
    add("server-side part copy floor / upload floor", _median(outcomes, "part_copy_floor", "seconds"), floor,
        "report")
    off = outcomes.get("s3ckptfs_second_name_off")
    on = outcomes.get("s3ckptfs_second_name")
    if off is not None and on is not None:
        for metric in ("stall", "after_first"):
            add(f"second name, dedup on / off: {metric}", on.median(metric), off.median(metric), "report")

    for count in (4, 8):
        nodes = outcomes.get(f"s3ckptfs_{count}_nodes")
        if nodes is not None:
            add(f"{count} nodes: stall per node / local save per node", nodes.median("stall"),
                nodes.median("local_stall"), "report")
            add(f"{count} nodes: all durable / {count} concurrent upload_file", nodes.median("durable"),
                nodes.median("floor"), "report")

    cold = _median(outcomes, "s3ckptfs_cold_load", "seconds")
    peers = {key: _median(outcomes, key, "seconds")
             for key in ("rclone_cold_load", "s3fs_cold_load", "download_then_load", "s3torchconnector_read")}
    peers = {key: value for key, value in peers.items() if value is not None}
    if peers:
        best = min(peers, key=peers.__getitem__)
        add(f"s3ckptfs cold load / best peer ({outcomes[best].measurement.label})", cold, peers[best], "≤ 1.2")
    add("s3ckptfs warm load / local load", _median(outcomes, "s3ckptfs_warm_load", "seconds"),
        _median(outcomes, "local_load", "seconds"), "≤ 1.2")
    four = _median(outcomes, "s3ckptfs_four_loaders", "seconds")
    local_four = _median(outcomes, "local_four_loaders", "seconds")
    add(f"s3ckptfs {CONCURRENT_LOADERS} loaders / 1 loader", four, cold, "≤ 1.5")
    add(f"local disk {CONCURRENT_LOADERS} loaders / 1 loader (this machine's bound)",
        local_four, _median(outcomes, "local_load", "seconds"), "report")
    add(f"s3ckptfs {CONCURRENT_LOADERS} loaders / local disk {CONCURRENT_LOADERS} loaders", four, local_four,
        "report")
    add(f"s3ckptfs listing of {LISTING_OBJECTS:,} objects / boto3 list_objects_v2",
        _median(outcomes, "s3ckptfs_metadata", "seconds"), _median(outcomes, "s3ckptfs_metadata", "boto3 list"),
        "report")
    return ratios


def markdown_for_size(size: int, checkpoint_size: int | None, outcomes: dict[str, Outcome],
                      repeat: int) -> str:
    """One size's table of medians (with every run), its ratios, and notes on other metrics."""
    lines = [f"### {format_size(size)} state dict"
             + (f" ({checkpoint_size / MiB:.0f} MiB checkpoint)" if checkpoint_size else "")
             + f", median of {repeat}", "",
             "| measurement | seconds (median) | GiB/s | runs |", "|---|---:|---:|---|"]
    notes: list[str] = []
    for outcome in outcomes.values():
        label = outcome.measurement.label
        if outcome.skipped or (outcome.error and not outcome.samples):
            reason = outcome.skipped or outcome.error
            lines.append(f"| {label} | n/a | | {reason.splitlines()[0][:160] if reason else ''} |")
            continue
        if outcome.error:
            notes.append(f"{label}: stopped after an error: {outcome.error.splitlines()[0][:200]}")
        for metric, values in outcome.samples.items():
            if metric not in TIME_METRICS:
                notes.append(f"{label}: {metric} {statistics.median(values):.2f} "
                             f"(runs: {' '.join(f'{v:.2f}' for v in values)})")
                continue
            median = statistics.median(values)
            name = label if metric == "seconds" else f"{label}: {metric}"
            rate = (checkpoint_size or size) / GiB / median if median else 0.0
            runs = " ".join(f"{v:.2f}" for v in values)
            lines.append(f"| {name} | {median:.2f} | {rate:.2f} | {runs} |")
    ratios = compute_ratios(outcomes)
    if ratios:
        lines += ["", "| ratio | value | goal |", "|---|---:|---:|"]
        lines += [f"| {r.name} | {r.value:.2f} | {r.goal} |" for r in ratios]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def markdown(command: str, results: dict[int, SizeResult], repeat: int, page_cache_dropped: bool) -> str:
    """The whole report as printed and written to bench.md."""
    text = f"Command: `{command}`\n\n" + "\n".join(
        markdown_for_size(size, result.checkpoint_bytes, result.outcomes, repeat)
        for size, result in results.items())
    if not page_cache_dropped:
        text += "\nThe page cache was not dropped before each step (not permitted, or --keep-page-cache): reads may have been served from memory.\n"
    return text


def json_document(meta: dict[str, Any], results: dict[int, SizeResult]) -> dict[str, Any]:
    """Every sample, median and ratio of the run, with ``meta`` (machine, tools, command)."""
    sizes = {}
    for size, result in results.items():
        outcomes = result.outcomes
        sizes[format_size(size)] = {
            "state_dict_bytes": size,
            "checkpoint_bytes": result.checkpoint_bytes,
            "transfer_config": {"multipart_chunksize": result.transfer.multipart_chunksize,
                                "max_concurrency": result.transfer.max_concurrency},
            "measurements": {
                key: {
                    "label": o.measurement.label,
                    "samples": o.samples,
                    "median": {metric: o.median(metric) for metric in o.samples},
                    "skipped": o.skipped,
                    "error": o.error,
                }
                for key, o in outcomes.items()
            },
            "ratios": [{"name": r.name, "value": r.value, "goal": r.goal} for r in compute_ratios(outcomes)],
        }
    return {**meta, "sizes": sizes}


def chart_rows(outcomes: dict[str, Outcome]) -> list[tuple[str, float, str]]:
    """(label, median seconds, side) of every timed metric, in table order."""
    rows = []
    for outcome in outcomes.values():
        for metric in TIME_METRICS:
            median = outcome.median(metric)
            if median is None:
                continue
            label = outcome.measurement.label + ("" if metric == "seconds" else f": {metric}")
            rows.append((label, median, outcome.measurement.side))
    return rows


def write_chart(path: Path, results: dict[int, SizeResult], repeat: int) -> str | None:
    """Horizontal bar chart of the medians, one panel per size and side; None or the reason it was not made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    panels = [(size, side, [row for row in chart_rows(result.outcomes) if row[2] == side])
              for size, result in results.items() for side in ("write", "read")]
    panels = [p for p in panels if p[2]]
    if not panels:
        return "nothing measured"
    heights = [0.6 + 0.35 * len(rows) for _, _, rows in panels]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, (size, side, rows) in zip(axes[:, 0], panels):
        labels = [r[0] for r in rows][::-1]
        values = [r[1] for r in rows][::-1]
        colours = ["tab:orange" if label.startswith("s3ckptfs") else "tab:blue" for label in labels]
        bars = axis.barh(labels, values, color=colours)
        axis.bar_label(bars, fmt="%.2f s", padding=3, fontsize=8)
        axis.set_title(f"{format_size(size)}: {side} (median of {repeat}, seconds, lower is better)", fontsize=10)
        axis.tick_params(axis="y", labelsize=8)
        axis.set_xlim(0, max(values) * 1.18)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write_report(out: Path, command: str, repeat: int, s3ckptfs_options: list[str], tools: Tools,
                 results: dict[int, SizeResult], page_cache_dropped: bool) -> bool:
    """Print the tables and write bench.md, bench.json and bench.png to ``out``; whether any measurement failed."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(command, results, repeat, page_cache_dropped)
    print(text)
    (out / "bench.md").write_text(text)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)},
        "repeat": repeat,
        "s3ckptfs_options": s3ckptfs_options,
        "page_cache_dropped": page_cache_dropped,
        "rclone_flags": RCLONE_FLAGS,
        "s3fs_options": S3FS_OPTIONS,
        "tools": tools.versions,
        "skipped_tools": tools.missing,
    }
    (out / "bench.json").write_text(json.dumps(json_document(meta, results), indent=2))
    problem = write_chart(out / "bench.png", results, repeat)
    if problem:
        log(f"no chart: {problem}")
    log(f"results in {out}/ (bench.json, bench.md{'' if problem else ', bench.png'})")
    return any(o.error for result in results.values() for o in result.outcomes.values())
