"""The benchmark's command line: ``scripts/bench.py [options]`` (``scripts/bench.sh`` installs the peers first).

Run (from the repository root, as root, with /dev/fuse)::

    scripts/bench.sh --quick                  # 256 MiB, one run
    scripts/bench.sh --sizes 1GiB,4GiB --repeat 3
    scripts/bench.sh --only local_save,upload_floor,s3ckptfs_write --s3ckptfs-options upload_concurrency=4

``--s3ckptfs-options`` may be given several times: the s3ckptfs write is then
measured once per option set (to compare upload policies in one run, e.g.
``-o upload_nice=0`` against ``-o upload_nice=19``); the reads use the first.

Results go to ``--out`` (default ``bench-results/``): ``bench.json`` (every
sample), ``bench.md`` (the tables printed at the end) and ``bench.png``.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from s3ckptfs import devserver

from . import __doc__ as package_doc
from .common import Janitor, install_signal_handlers, log, parse_size
from .context import Bench
from .measurements import MEASUREMENTS, run_size, select_measurements, with_write_variants
from .peers import discover_tools, make_client, transfer_config, tune_transfer, version_line
from .report import SizeResult, write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=(package_doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Measurements (--only takes these names; the letters and names of earlier runs work too):\n"
        + "\n".join(f"  {m.key:24} {m.label}" for m in MEASUREMENTS))
    parser.add_argument("--sizes", default="1GiB", help="comma-separated state dict sizes (default 1GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--only", help="comma-separated measurements to run (names listed below)")
    parser.add_argument("--s3ckptfs-options", action="append", metavar="K=V,...",
                        help="passed to s3ckptfs mount as -o; give it several times to measure the write "
                             "with each (the reads use the first)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256MiB, one repeat")
    parser.add_argument("--tune-transfer", action="store_true",
                        help="choose the boto3 part size and threads by trying a few (per size)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch directory (default: a new one under $TMPDIR); it must have room "
                             "for about 4x the largest size")
    parser.add_argument("--keep-work-dir", action="store_true", help="do not delete the scratch directory")
    parser.add_argument("--warm-memory", action="store_true",
                        help="fault in and free 1.25x the size's memory before each timed step, for VMs "
                             "that hand freed memory back to their host (see workload.warm_free_memory)")
    parser.add_argument("--keep-page-cache", action="store_true",
                        help="do not drop the page cache before timed steps (a check that the benchmark "
                             "runs, on a shared machine; reads are then not cold and timings mean little)")
    parser.add_argument("--link-rate", metavar="RATE", nargs="?", const="100MB", default=None,
                        help="reach the server through a bandwidth-limited link (s3ckptfs/linkproxy.py, one "
                             "token bucket per direction shared by all connections), e.g. 50MB; default "
                             "100MB. The s3ckptfs mounts and the upload floor go through it")
    args = parser.parse_args(argv)
    if args.link_rate is not None:
        from s3ckptfs.linkproxy import parse_rate
        try:
            args.link_bytes_per_second = parse_rate(args.link_rate)
        except ValueError as exc:
            parser.error(f"--link-rate: {exc}")
    if args.quick:
        args.sizes, args.repeat = "256MiB", 1
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.s3ckptfs_options = args.s3ckptfs_options or [""]
    if args.repeat < 1 or not args.size_list:
        parser.error("--repeat must be at least 1 and --sizes must name a size")
    return args


def make_work_dir(args: argparse.Namespace, janitor: Janitor) -> Path:
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="s3ckptfs-bench-", dir=args.work_dir))
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="s3ckptfs-bench-"))
    if not args.keep_work_dir:
        janitor.add(f"remove {work_dir}", lambda: shutil.rmtree(work_dir, ignore_errors=True))
    return work_dir


def start_server(work_dir: Path, janitor: Janitor) -> devserver.SeaweedServer:
    log("starting SeaweedFS")
    server = devserver.start(work_dir / "seaweedfs")
    janitor.add("stop SeaweedFS", server.stop)
    return server


def start_link(server: devserver.SeaweedServer, rate: str, janitor: Janitor) -> str:
    """The link proxy in a process of its own (its threads must not compete for the benchmark's GIL);
    its endpoint URL."""
    log(f"starting a {rate}/s link to SeaweedFS")
    process = subprocess.Popen([sys.executable, "-m", "s3ckptfs.linkproxy", "--target",
                                f"127.0.0.1:{server.s3_port}", "--rate", rate], stdout=subprocess.PIPE, text=True)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    janitor.add("stop the link proxy", stop)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    return f"http://127.0.0.1:{port}"


def run(args: argparse.Namespace, janitor: Janitor, command: str) -> int:
    """Every size, every selected measurement, then the report; 1 if any measurement failed."""
    measurements = with_write_variants(select_measurements(args.only), args.s3ckptfs_options)
    tools = discover_tools()
    for tool, reason in tools.missing.items():
        if any(m.tool == tool for m in measurements):
            log(f"skipping {tool}: {reason}")
    work_dir = make_work_dir(args, janitor)
    server = start_server(work_dir, janitor)
    tools.versions["seaweedfs"] = version_line([devserver.find_weed(), "version"])
    client = make_client(server)
    link_url = start_link(server, args.link_rate, janitor) if args.link_rate is not None else None
    link_client = make_client(server, link_url) if link_url else None
    results: dict[int, SizeResult] = {}
    transfer = transfer_config()
    page_cache_dropped = True
    for size in args.size_list:
        b = Bench(size=size, server=server, client=client, transfer=transfer, tools=tools, janitor=janitor,
                  work_dir=work_dir, s3ckptfs_options=args.s3ckptfs_options[0], warm_memory=args.warm_memory,
                  drop_caches=not args.keep_page_cache, link_url=link_url, link_client=link_client)
        if args.tune_transfer:
            b.transfer = tune_transfer(b)
        outcomes = run_size(b, measurements, args.repeat)
        results[size] = SizeResult(b.checkpoint_bytes, outcomes, b.transfer)
        page_cache_dropped &= b.page_cache_dropped
        b.release_state()
        shutil.rmtree(work_dir / "local", ignore_errors=True)
    failed = write_report(args.out, command, args.repeat, args.s3ckptfs_options, tools, results,
                          page_cache_dropped)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ("python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    janitor = Janitor()
    atexit.register(janitor.run_all)
    install_signal_handlers()
    try:
        return run(args, janitor, command)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        janitor.run_all()
