"""Command line: ``s3ckptfs mount | unmount | sync | status | cleanup``.

Every user error is one line on stderr, ``s3ckptfs: error: ...``, and a
non-zero exit (2 for usage, 1 for everything else); nothing is left mounted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import control, mounts
from .config import (LOG_LEVELS, MountConfig, default_cache_dir, environment_options, load_config_file,
                     parse_duration, parse_options, parse_s3_url, split_mount_options)
from .errors import ConfigError

PROG = "s3ckptfs"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by mount and watch (each also has a key in the config file)."""
    parser.add_argument("--config", help="TOML file with the settings (the command line wins)")
    parser.add_argument("--cache-dir", help="local cache (default: /var/cache/s3ckptfs/<bucket>-<hash>)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    parser.add_argument("--region", help="S3 region")
    parser.add_argument("--profile", help="AWS profile for credentials")
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="key=value,...",
                        help="options, e.g. -o write_mode=sync,upload_concurrency=8")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mount an S3 prefix as a checkpoint directory.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = sub.add_parser("mount", help="mount s3://BUCKET[/PREFIX] at MOUNTPOINT")
    mount.add_argument("source", metavar="s3://BUCKET[/PREFIX]", nargs="?")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    _add_daemon_arguments(mount)
    mount.add_argument("--foreground", "-f", action="store_true", help="stay attached (systemd uses this)")

    watch = sub.add_parser("watch", help="without FUSE: upload files closed in LOCAL_DIR to s3://BUCKET[/PREFIX]")
    watch.add_argument("mountpoint", metavar="LOCAL_DIR", nargs="?")
    watch.add_argument("source", metavar="s3://BUCKET[/PREFIX]", nargs="?")
    _add_daemon_arguments(watch)
    watch.add_argument("--delete", action="store_true", help="mirror deletes of local files to S3")
    watch.add_argument("--settle", type=float, default=1.0,
                       help="seconds a closed file waits before upload, to follow a rename (default 1)")
    watch.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS)

    unmount = sub.add_parser("unmount", help="wait for pending uploads, then unmount")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.add_argument("--force", action="store_true", help="do not wait for pending uploads")

    sync = sub.add_parser("sync", help="wait until everything written so far is in S3")
    sync.add_argument("mountpoint", metavar="MOUNTPOINT")
    sync.add_argument("path", nargs="?", help="only files under this path")
    sync.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="give up waiting after SECONDS (exit 1, listing what is pending; uploads go on)")

    status = sub.add_parser("status", help="show pending and failed uploads")
    status.add_argument("mountpoint", metavar="MOUNTPOINT")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    cleanup = sub.add_parser("cleanup", help="abort multipart uploads under s3://BUCKET[/PREFIX] older than an age")
    cleanup.add_argument("source", metavar="s3://BUCKET[/PREFIX]")
    cleanup.add_argument("--older-than", default="1d", metavar="DURATION",
                         help="only uploads started longer ago than this (default 1d; e.g. 90m, 12h, 2d)")
    cleanup.add_argument("--dry-run", action="store_true", help="list what would be aborted, abort nothing")
    cleanup.add_argument("--endpoint-url", help="S3 endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    cleanup.add_argument("--region", help="S3 region")
    cleanup.add_argument("--profile", help="AWS profile for credentials")
    return parser


def configure_logging(level: str, to_file: bool = False) -> None:
    # journald stamps each line itself; a log file needs its own time stamps.
    stamp = "%(asctime)s " if to_file or not os.environ.get("JOURNAL_STREAM") else ""
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format=f"{stamp}%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def mount_config(args: argparse.Namespace) -> MountConfig:
    """Settings from the config file, then the environment, then the command line (which wins)."""
    from_options, option_items = split_mount_options(args.options)
    config_path = args.config or from_options.pop("config", None)
    from_file, file_options = load_config_file(config_path) if config_path else ({}, [])

    def pick(name: str) -> str | None:
        cli_value = getattr(args, name, None)
        if name == "mountpoint" and not cli_value:
            cli_value = from_file.get("local_dir")  # watch mode's name for it
        return cli_value or from_options.get(name) or from_file.get(name)

    source, mountpoint_arg = pick("source"), pick("mountpoint")
    if not source or not mountpoint_arg:
        raise ConfigError(f"{args.command} needs s3://BUCKET[/PREFIX] and "
                          f"{'LOCAL_DIR' if args.command == 'watch' else 'MOUNTPOINT'} (arguments or --config)")
    bucket, prefix = parse_s3_url(source)
    options = parse_options(file_options + environment_options() + option_items)
    log_level = pick("log_level") or "info"
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level '{log_level}' is not one of {', '.join(LOG_LEVELS)}")
    mountpoint = Path(os.path.abspath(mountpoint_arg))
    cache_arg = pick("cache_dir")
    cache_dir = Path(os.path.abspath(cache_arg)) if cache_arg else default_cache_dir(bucket, prefix)
    return MountConfig(bucket=bucket, prefix=prefix, mountpoint=mountpoint, cache_dir=cache_dir,
                       endpoint_url=pick("endpoint_url"), region=pick("region"), profile=pick("profile"),
                       options=options, log_level=log_level)


def cmd_mount(args: argparse.Namespace, argv: list[str]) -> int:
    from . import daemon  # boto3 and FUSE: only what mounts needs them (sync, status stay light)

    config = mount_config(args)
    if args.foreground:
        configure_logging(config.log_level, to_file=daemon.READY_FD_ENV in os.environ)
        return daemon.run(config)
    # The local checks here, for a message before anything starts; S3 is checked once, by the
    # daemon (its answer comes back through the ready pipe): twice would double a restart's wait
    # for an S3 that does not answer.
    daemon.preflight(config, s3=False)
    daemon.start_background([a for a in argv if a not in ("--foreground", "-f")], config)
    return 0


def _mountpoint(path: str) -> str:
    """The mountpoint (or watched directory) of a running daemon."""
    mountpoint = os.path.abspath(path)
    if not mounts.is_mounted(mountpoint) and control.read_info(mountpoint) is None:
        raise ConfigError(f"{mountpoint} is not mounted (nor watched)")
    return mountpoint


def _show_progress(progress: dict) -> None:
    if not sys.stderr.isatty():
        return
    done, total = progress.get("bytes_done", 0), progress.get("bytes_total", 0)
    copied = progress.get("bytes_copied", 0)
    print(f"\r{progress.get('files', 0)} file(s) pending, {done / 2**20:.0f} / {total / 2**20:.0f} MiB uploaded"
          + (f" ({copied / 2**20:.0f} MiB of it copied in S3, not sent)" if copied else ""),
          end="", file=sys.stderr, flush=True)


def _sync(mountpoint: str, path: str | None, timeout: float | None = None) -> list[dict]:
    """Failed files ([] when all is in S3); TimeoutError once ``timeout`` seconds have passed."""
    started = time.monotonic()
    answer = control.request(mountpoint, {"cmd": "sync", "path": path or "/"}, _show_progress, timeout=timeout)
    if sys.stderr.isatty():
        print(f"\rsynced in {time.monotonic() - started:.1f}s" + " " * 40, file=sys.stderr)
    if "failed" not in answer:
        raise ConfigError(answer.get("error", "sync failed"))
    return answer["failed"]


def cmd_sync(args: argparse.Namespace) -> int:
    mountpoint = _mountpoint(args.mountpoint)
    path = None
    if args.path:
        real = os.path.abspath(args.path)
        if real != mountpoint and not real.startswith(mountpoint.rstrip("/") + "/"):
            raise ConfigError(f"{args.path} is not inside {mountpoint}")
        path = "/" + real[len(mountpoint):].strip("/")
    try:
        failed = _sync(mountpoint, path, args.timeout)
    except TimeoutError:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return _report_timeout(mountpoint, path or "/", args.timeout)
    for failure in failed:
        print(f"{PROG}: error: {failure['path']} is not in S3: {failure['error']}", file=sys.stderr)
    return 1 if failed else 0


def _report_timeout(mountpoint: str, under: str, timeout: float) -> int:
    """After ``sync --timeout``: one line per file under ``under`` still not in S3, then the verdict."""
    answer = control.request(mountpoint, {"cmd": "status"}, timeout=30)
    prefix = under.rstrip("/") + "/"
    for item in answer.get("pending", []):
        if item["state"] != "open" and (under == "/" or item["path"] == under or item["path"].startswith(prefix)):
            print(f"{PROG}: error: {item['path']} is not in S3 yet ({item['state']}, "
                  f"{item['uploaded'] / 2**20:.1f}/{item['size'] / 2**20:.1f} MiB uploaded"
                  + (f"; {item['error']}" if item.get("error") else "") + ")", file=sys.stderr)
    return _fail(f"sync timed out after {timeout:g}s; the uploads go on")


def cmd_unmount(args: argparse.Namespace) -> int:
    mountpoint = _mountpoint(args.mountpoint)
    info = control.read_info(mountpoint) or {}
    if not args.force:
        failed = _sync(mountpoint, None)
        if failed:
            for failure in failed:
                print(f"{PROG}: error: {failure['path']} is not in S3: {failure['error']}", file=sys.stderr)
            return _fail("not unmounted: uploads failed (data kept in the cache); use --force to unmount anyway")
    result = mounts.unmount(mountpoint, timeout=None)
    if result.returncode != 0:
        if not args.force:
            return _fail(f"cannot unmount {mountpoint}: {result.stderr.strip() or 'busy'}")
        mounts.unmount(mountpoint, lazy=True, timeout=None)
    pid = info.get("pid")
    if pid:  # the daemon finishes its last uploads after the unmount: wait for it
        mounts.wait_gone(pid, 600)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    mountpoint = _mountpoint(args.mountpoint)
    answer = control.request(mountpoint, {"cmd": "status"}, timeout=30)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    pending = answer.get("pending", [])
    print(f"{mountpoint}: {len(pending)} file(s) not yet in S3; "
          f"{answer.get('objects_committed', 0)} object(s) uploaded since mount")
    s3 = answer.get("s3") or {}
    if s3.get("answering") is False:
        since = time.strftime("%H:%M:%S", time.localtime(s3.get("since", 0)))
        print(f"S3 not answering since {since} ({s3.get('error')}): answering from kept listings, "
              "uploads wait")
    if answer.get("dedup"):
        sent, copied = answer.get("part_bytes_sent", 0), answer.get("part_bytes_copied", 0)
        print(f"parts since mount: {sent / 2**20:.1f} MiB sent, {copied / 2**20:.1f} MiB copied in S3 (dedup)")
    if pending:
        print(f"{'STATE':8} {'UPLOADED':>20} {'AGE':>8}  PATH")
        for item in pending:
            done = f"{item['uploaded'] / 2**20:.1f}/{item['size'] / 2**20:.1f} MiB"
            copied = f"  ({item['copied'] / 2**20:.1f} MiB copied)" if item.get("copied") else ""
            print(f"{item['state']:8} {done:>20} {item['age']:>7.0f}s  {item['path']}{copied}")
            if item.get("error"):
                print(f"{'':8} error: {item['error']}")
    return 1 if any(item["state"] in ("failed", "conflict") for item in pending) else 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Abort old multipart uploads under the prefix (cleanup.py); one line for each, then a summary."""
    from .cleanup import LeftUpload, abort_older  # boto3: only what needs it
    from .errors import S3Error
    from .s3client import S3Client

    bucket, prefix = parse_s3_url(args.source)
    older_than = parse_duration(args.older_than, "--older-than")
    where = f"s3://{bucket}/{prefix}"
    now = time.time()

    def report(upload: LeftUpload, error: S3Error | None) -> None:
        if error is None:
            print(f"{'would abort' if args.dry_run else 'aborted'} {upload.describe(now)}")
        else:
            print(f"{PROG}: error: cannot abort {upload.describe(now)}: {error}", file=sys.stderr)

    try:
        client = S3Client(bucket, endpoint_url=args.endpoint_url, region=args.region, profile=args.profile,
                          retry_attempts=3, connect_timeout=5, read_timeout=30)
        aborted, failed = abort_older(client, prefix, older_than, now=now, dry_run=args.dry_run, report=report)
    except S3Error as err:
        raise ConfigError(f"cannot list the multipart uploads under {where}: {err}") from None
    print(f"{len(aborted)} multipart upload(s) older than {args.older_than} "
          f"{'to abort' if args.dry_run else 'aborted'} under {where}"
          + (f"; {len(failed)} could not be aborted" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("s3://"):
        # mount(8) -t fuse.s3ckptfs (an fstab line) runs "s3ckptfs SOURCE MOUNTPOINT -o OPTIONS".
        argv = ["mount", *argv]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            return cmd_mount(args, argv)
        if args.command == "watch":
            config = mount_config(args)
            configure_logging(config.log_level)
            from . import daemon

            return daemon.run_watch(config, settle=args.settle, delete=args.delete)
        if args.command == "unmount":
            return cmd_unmount(args)
        if args.command == "sync":
            return cmd_sync(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "cleanup":
            return cmd_cleanup(args)
    except ConfigError as exc:
        return _fail(str(exc))
    except control.ControlError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return 2
