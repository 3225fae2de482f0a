"""The benchmark (scripts/ckptbench): its pure parts in-process, and a tiny end-to-end run of s3ckptfs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from s3ckptfs.mounts import mounted_paths

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from ckptbench.common import format_size, parse_size  # noqa: E402
from ckptbench.measurements import MEASUREMENTS, Outcome, select_measurements, with_write_variants  # noqa: E402
from ckptbench.report import compute_ratios, markdown_for_size  # noqa: E402

# A run small enough for a test: s3ckptfs's write, cold and warm load, against the local baselines.
TINY_RUN = ["local_save", "upload_floor", "s3ckptfs_write", "local_load", "s3ckptfs_cold_load",
            "s3ckptfs_warm_load"]


def outcomes_of(medians: dict[str, dict[str, float]]) -> dict[str, Outcome]:
    """Outcomes with one sample per metric, in table order."""
    by_key = {m.key: m for m in MEASUREMENTS}
    outcomes = {}
    for key, sample in medians.items():
        outcome = Outcome(by_key[key])
        outcome.add(sample)
        outcomes[key] = outcome
    return outcomes


def test_sizes_parse_and_print():
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("8MB") == 8_000_000
    assert format_size(4 << 20) == "4MiB"
    assert format_size(1000) == "1000B"


def test_measurements_are_chosen_by_name_or_by_their_earlier_letters_and_keys():
    assert [m.key for m in select_measurements("s3ckptfs_write,local_save")] == ["local_save", "s3ckptfs_write"]
    # Commands recorded in docs/bench/ still run the same measurements.
    assert [m.key for m in select_measurements("h,m,n")] == ["local_load", "s3ckptfs_cold_load",
                                                            "s3ckptfs_warm_load"]
    assert [m.key for m in select_measurements("s3ckptfs_4proc,upload")] == ["upload_floor",
                                                                            "s3ckptfs_four_loaders"]
    assert len(select_measurements(None)) == len(MEASUREMENTS) == 31
    with pytest.raises(SystemExit, match="unknown measurement"):
        select_measurements("z")


def test_each_write_option_set_is_its_own_measurement():
    chosen = with_write_variants(select_measurements("g"), ["", "local_sync=background"])
    assert [m.key for m in chosen] == ["s3ckptfs_write", "s3ckptfs_write@local_sync=background"]
    assert chosen[1].label == "s3ckptfs write [local_sync=background]"


def test_ratios_compare_s3ckptfs_with_the_baselines_and_the_best_peer():
    outcomes = outcomes_of({
        "local_save": {"seconds": 1.0},
        "upload_floor": {"seconds": 8.0},
        "s3ckptfs_write": {"stall": 1.2, "durable": 6.0},
        "local_load": {"seconds": 1.0},
        "download_then_load": {"seconds": 2.5},
        "s3fs_cold_load": {"seconds": 3.0},
        "s3ckptfs_cold_load": {"seconds": 2.0, "downloads": 1.0},
        "s3ckptfs_warm_load": {"seconds": 0.5},
    })
    ratios = {r.name: r.value for r in compute_ratios(outcomes)}
    assert ratios["s3ckptfs stall / local save"] == pytest.approx(1.2)
    assert ratios["s3ckptfs durable / upload floor"] == pytest.approx(0.75)
    assert ratios["s3ckptfs cold load / best peer (boto3 download_file + torch.load)"] == pytest.approx(0.8)
    assert ratios["s3ckptfs warm load / local load"] == pytest.approx(0.5)
    assert not any("loaders" in name for name in ratios)  # not measured: no ratio


def test_the_n_node_case_compares_each_node_with_its_local_save_and_all_with_n_uploads():
    outcomes = outcomes_of({"s3ckptfs_8_nodes": {"local_stall": 0.2, "floor": 2.5, "stall": 0.3, "stall_max": 0.4,
                                                 "durable": 2.0}})
    ratios = {r.name: r.value for r in compute_ratios(outcomes)}
    assert ratios["8 nodes: stall per node / local save per node"] == pytest.approx(1.5)
    assert ratios["8 nodes: all durable / 8 concurrent upload_file"] == pytest.approx(0.8)
    assert not any(name.startswith("4 nodes") for name in ratios)


def test_the_table_shows_every_metric_a_skip_and_the_other_figures_as_notes():
    outcomes = outcomes_of({"local_save": {"seconds": 0.5}, "s3ckptfs_write": {"stall": 0.6, "durable": 4.0,
                                                                              "peak_rss_mib": 120.0}})
    skipped = Outcome(next(m for m in MEASUREMENTS if m.key == "rclone_write"), skipped="rclone not found")
    outcomes["rclone_write"] = skipped
    text = markdown_for_size(1 << 30, 1 << 30, outcomes, repeat=1)
    assert "### 1GiB state dict (1024 MiB checkpoint), median of 1" in text
    assert "| torch.save to local disk | 0.50 | 2.00 | 0.50 |" in text
    assert "| s3ckptfs write: stall | 0.60 |" in text
    assert "| s3ckptfs write: durable | 4.00 |" in text
    assert "| rclone mount write | n/a | | rclone not found |" in text
    assert "| s3ckptfs stall / local save | 1.20 | ≤ 1.25 |" in text
    assert "- s3ckptfs write: peak_rss_mib 120.00 (runs: 120.00)" in text


@pytest.mark.fuse
@pytest.mark.timeout(240)
def test_a_tiny_run_of_s3ckptfs_end_to_end(tmp_path):
    """scripts/bench.py itself, 4 MiB, s3ckptfs only: every step measured, the report written,
    nothing left mounted."""
    out, work = tmp_path / "out", tmp_path / "work"
    with open(tmp_path / "bench.log", "wb") as log:
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "bench.py"), "--sizes", "4MiB", "--repeat", "1",
             "--only", ",".join(TINY_RUN), "--out", str(out), "--work-dir", str(work), "--keep-page-cache"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, timeout=200)
    output = (tmp_path / "bench.log").read_text(errors="replace")
    assert result.returncode == 0, output
    assert not [path for path in mounted_paths() if path.startswith(str(tmp_path))], output
    assert (out / "bench.md").read_text().startswith("Command: `python scripts/bench.py --sizes 4MiB")
    document = json.loads((out / "bench.json").read_text())
    measured = document["sizes"]["4MiB"]["measurements"]
    assert list(measured) == TINY_RUN
    for key, entry in measured.items():
        assert entry["error"] is None and entry["skipped"] is None, (key, entry, output)
    assert set(measured["s3ckptfs_write"]["samples"]) >= {"stall", "durable"}
    assert measured["s3ckptfs_cold_load"]["samples"]["downloads"][0] > 0
    ratios = {r["name"] for r in document["sizes"]["4MiB"]["ratios"]}
    assert {"s3ckptfs stall / local save", "s3ckptfs durable / upload floor",
            "s3ckptfs warm load / local load"} <= ratios
    assert not document["page_cache_dropped"]


def test_incremental_saves_are_compared_with_their_first_save():
    outcomes = outcomes_of({
        "upload_floor": {"seconds": 8.0},
        "copy_floor": {"seconds": 2.0},
        "part_copy_floor": {"seconds": 4.0},
        "s3ckptfs_incremental_50": {"first_durable": 8.0, "durable": 4.0, "stall": 1.0},
        "s3ckptfs_second_name": {"first_durable": 8.0, "durable": 7.0, "after_first": 0.8, "stall": 1.0},
    })
    ratios = {r.name: (r.value, r.goal) for r in compute_ratios(outcomes)}
    assert ratios["s3ckptfs next save, 50% unchanged [dedup=on]: durable / first save durable"] == (0.5, "≤ 0.65")
    assert ratios["s3ckptfs same state, second name [dedup=on]: complete after the first / first durable"] == \
        (pytest.approx(0.1), "≤ 0.15")
    # against what the server itself needs: half the bytes sent (4 s), half copied (2 s)
    assert ratios["s3ckptfs next save, 50% unchanged [dedup=on]: durable / what this server allows"] == \
        (pytest.approx(4.0 / 6.0), "report")
    assert ratios["s3ckptfs same state, second name [dedup=on]: complete after the first / server-side copy floor"] \
        == (pytest.approx(0.4), "report")
