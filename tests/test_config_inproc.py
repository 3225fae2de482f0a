"""Configuration and command-line validation, in process: no server, no mount.

The parsing functions of config.py directly, and ``cli.main`` for the refusals
that happen before the daemon would touch S3 (bad URL, options, config file,
mountpoint, cache dir). Contract of a refusal, as test_cli_errors.py states it
for the ones that need the server: a non-zero exit and exactly one line on
stderr that starts with ``s3ckptfs: error: `` and names the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s3ckptfs import cli, daemon
from s3ckptfs.config import (GiB, KiB, MiB, Options, environment_options, load_config_file, parse_options,
                             parse_s3_url, parse_size, split_mount_options)
from s3ckptfs.errors import ConfigError

PREFIX = "s3ckptfs: error: "
DEAD_ENDPOINT = "http://127.0.0.1:9"   # should a check ever get as far as S3: refused at once, never AWS


# -- parsing functions -------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("8MiB", 8 * MiB), ("512M", 512 * MiB), ("2G", 2 * GiB), ("1.5KiB", 1536), ("100", 100),
    ("3mb", 3_000_000), (" 4 kib ", 4 * KiB),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12XB", "lots", "", "-1M", "1.2.3", "M"])
def test_parse_size_refuses_and_names_the_option(text):
    with pytest.raises(ConfigError, match="option part_size"):
        parse_size(text, "option part_size")


@pytest.mark.parametrize("url, expected", [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://my-bucket/runs/llama", ("my-bucket", "runs/llama/")),
    ("s3://b.c.d/a/b/", ("b.c.d", "a/b/")),
])
def test_parse_s3_url(url, expected):
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", ["http://x", "s3://", "s3://Bad_Bucket!", "just-a-bucket", "s3:///prefix",
                                 "s3://ab", "s3://a..b/x", "s3://bucket/a//b"])
def test_parse_s3_url_refuses(url):
    with pytest.raises(ConfigError):
        parse_s3_url(url)


def test_parse_options_types_sizes_and_booleans():
    options = parse_options(["write_mode=sync,part_size=16MiB", "checksums=false", "allow-other",
                             "metadata_ttl=0.5", "upload_concurrency=8"])
    assert options.write_mode == "sync"
    assert options.part_size == 16 * MiB
    assert options.checksums is False
    assert options.allow_other is True
    assert options.metadata_ttl == 0.5
    assert options.upload_concurrency == 8
    assert parse_options([]) == Options()


@pytest.mark.parametrize("item, named", [
    ("no_such_option=1", "no_such_option"),
    ("write_mode", "write_mode"),
    ("write_mode=bogus", "write_mode"),
    ("upload_concurrency=many", "upload_concurrency"),
    ("upload_concurrency=0", "upload_concurrency"),
    ("part_size=12XB", "part_size"),
    ("part_size=1MiB", "part_size"),
    ("cache_size=lots", "cache_size"),
    ("metadata_ttl=soon", "metadata_ttl"),
    ("local_sync=later", "local_sync"),
    ("passthrough=always", "passthrough"),
    ("checksums=maybe", "checksums"),
    ("read_block=1KiB", "read_block"),
    ("metrics_port=70000", "metrics_port"),
])
def test_parse_options_refuses_and_names_the_option(item, named):
    with pytest.raises(ConfigError, match=named):
        parse_options([item])


def test_split_mount_options_separates_mount_keys_flags_and_tunables():
    mount, rest = split_mount_options(["rw,noatime,_netdev,x-systemd.automount,cache_dir=/var/c",
                                       "sync,part_size=16MiB", "endpoint-url=http://e:1"])
    assert mount == {"cache_dir": "/var/c", "endpoint_url": "http://e:1"}
    assert rest == ["write_mode=sync", "part_size=16MiB"]
    assert parse_options(rest).write_mode == "sync"


@pytest.mark.parametrize("items, named", [(["ro"], "read-only"), (["cache_dir"], "cache_dir"),
                                          (["region="], "region")])
def test_split_mount_options_refuses(items, named):
    with pytest.raises(ConfigError, match=named):
        split_mount_options(items)


def test_environment_options():
    found = environment_options({"S3CKPTFS_WRITE_MODE": "sync", "S3CKPTFS_PART_SIZE": "16MiB", "OTHER": "1"})
    assert sorted(found) == ["part_size=16MiB", "write_mode=sync"]


def test_load_config_file(tmp_path):
    path = tmp_path / "mount.toml"
    path.write_text('source = "s3://b/p"\nmountpoint = "/mnt/ckpt"\n[options]\nwrite_mode = "sync"\n'
                    'checksums = false\npart_size = "16MiB"\n')
    mount, options = load_config_file(path)
    assert mount == {"source": "s3://b/p", "mountpoint": "/mnt/ckpt"}
    parsed = parse_options(options)
    assert (parsed.write_mode, parsed.checksums, parsed.part_size) == ("sync", False, 16 * MiB)


@pytest.mark.parametrize("content, expected", [
    ('source = "s3://b/p"\nbogus = 1\n', "unknown key 'bogus'"),
    ('[options]\nwrite_mode = "sometimes"\n', "write_mode"),
    ('[options]\nnot_an_option = 1\n', "unknown option 'not_an_option'"),
    ('source = [1\n', "not valid TOML"),
    ('source = 3\n', "'source' must be a string"),
    ('options = 3\n', "must be a table"),
])
def test_load_config_file_refuses_naming_key_and_file(tmp_path, content, expected):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match="bad.toml") as info:
        load_config_file(path)
    assert expected in str(info.value)


def test_load_config_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "absent.toml")


# -- the command line, in process --------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    """No S3CKPTFS_* options from the environment, and no AWS endpoint other than a dead one."""
    for name in list(os.environ):
        if name.startswith("S3CKPTFS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``cli.main(argv)``: (exit code, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, stderr: str, keywords: list[str]) -> str:
    assert code != 0, stderr
    lines = stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(PREFIX), stderr
    assert any(word.lower() in lines[0].lower() for word in keywords), (keywords, stderr)
    return lines[0]


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """An empty mountpoint and a cache dir path."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    return mountpoint, tmp_path / "cache"


def mount_argv(url: str, mountpoint: Path, cache: Path, *extra: str) -> list[str]:
    return ["mount", url, str(mountpoint), "--cache-dir", str(cache), "--endpoint-url", DEAD_ENDPOINT, *extra]


@pytest.mark.parametrize("url", ["http://x", "s3://", "s3://Bad_Bucket!", "just-a-bucket", "s3:///prefix"])
def test_cli_malformed_url(clean_env, capsys, places, url):
    code, err = run_main(mount_argv(url, *places), capsys)
    assert_one_error_line(code, err, ["url", "bucket", "s3://"])
    assert not daemon.is_mounted(places[0])


def test_cli_unknown_option(clean_env, capsys, places):
    code, err = run_main(mount_argv("s3://bucket/p", *places, "-o", "no_such_option=1"), capsys)
    assert_one_error_line(code, err, ["no_such_option"])


@pytest.mark.parametrize("key, value", [
    ("write_mode", "bogus"), ("upload_concurrency", "many"), ("upload_concurrency", "0"), ("part_size", "12XB"),
    ("cache_size", "lots"), ("metadata_ttl", "soon"), ("local_sync", "later"),
])
def test_cli_bad_option_value(clean_env, capsys, places, key, value):
    code, err = run_main(mount_argv("s3://bucket/p", *places, "-o", f"{key}={value}"), capsys)
    assert_one_error_line(code, err, [key])


def test_cli_option_without_value(clean_env, capsys, places):
    code, err = run_main(mount_argv("s3://bucket/p", *places, "-o", "write_mode"), capsys)
    assert_one_error_line(code, err, ["write_mode", "key=value", "option"])


def test_cli_bad_option_from_the_environment(clean_env, capsys, places, monkeypatch):
    monkeypatch.setenv("S3CKPTFS_WRITE_MODE", "sometimes")
    code, err = run_main(mount_argv("s3://bucket/p", *places), capsys)
    assert_one_error_line(code, err, ["write_mode"])


def test_cli_mount_without_source(clean_env, capsys, places):
    code, err = run_main(["mount"], capsys)
    assert_one_error_line(code, err, ["s3://BUCKET", "MOUNTPOINT"])


def test_cli_usage_error_is_one_line(clean_env, capsys):
    code, err = run_main(["mount", "s3://b/p", "/mnt", "--no-such-flag"], capsys)
    assert code == 2
    assert_one_error_line(code, err, ["--no-such-flag", "unrecognized"])


@pytest.mark.parametrize("content, expected", [
    ('source = "s3://b/p"\nbogus = 1\n', "unknown key 'bogus'"),
    ('[options]\nwrite_mode = "sometimes"\n', "write_mode"),
    ('[options]\nnot_an_option = 1\n', "unknown option 'not_an_option'"),
    ('source = [1\n', "not valid TOML"),
])
def test_cli_bad_config_file_is_one_line_naming_key_and_file(clean_env, capsys, tmp_path, content, expected):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    code, err = run_main(["mount", "--config", str(config)], capsys)
    line = assert_one_error_line(code, err, [expected])
    assert "bad.toml" in line or "TOML" in line


def test_cli_mountpoint_missing(clean_env, capsys, tmp_path):
    mountpoint = tmp_path / "absent"
    code, err = run_main(mount_argv("s3://bucket/p", mountpoint, tmp_path / "cache"), capsys)
    assert_one_error_line(code, err, ["mountpoint", "mount point"])
    assert not mountpoint.exists(), "a missing mount point must not be created"


def test_cli_mountpoint_is_file(clean_env, capsys, tmp_path):
    mountpoint = tmp_path / "file"
    mountpoint.write_text("not a directory\n")
    code, err = run_main(mount_argv("s3://bucket/p", mountpoint, tmp_path / "cache"), capsys)
    assert_one_error_line(code, err, ["mountpoint", "mount point", "directory"])
    assert mountpoint.read_text() == "not a directory\n"


def test_cli_mountpoint_not_empty(clean_env, capsys, places):
    mountpoint, cache = places
    (mountpoint / "keep.txt").write_text("mine\n")
    code, err = run_main(mount_argv("s3://bucket/p", mountpoint, cache), capsys)
    assert_one_error_line(code, err, ["not empty", "non-empty", "nonempty"])
    assert (mountpoint / "keep.txt").read_text() == "mine\n"


def test_cli_cache_dir_not_writable(clean_env, capsys, places, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")  # root ignores modes; a file as parent stops it
    code, err = run_main(mount_argv("s3://bucket/p", places[0], blocker / "cache"), capsys)
    assert_one_error_line(code, err, ["cache"])


def test_cli_cache_dir_inside_mountpoint(clean_env, capsys, places):
    mountpoint, _ = places
    code, err = run_main(mount_argv("s3://bucket/p", mountpoint, mountpoint / "cache"), capsys)
    assert_one_error_line(code, err, ["cache"])


def test_cache_dir_in_use_is_refused(tmp_path):
    """The lock a daemon holds on its cache dir keeps a second one off (in process: two CacheDirs)."""
    from s3ckptfs.cache import CacheDir

    first = CacheDir(tmp_path / "cache")
    first.prepare()
    try:
        with pytest.raises(ConfigError, match="in use"):
            CacheDir(tmp_path / "cache").prepare()
    finally:
        first.release()
    second = CacheDir(tmp_path / "cache")
    second.prepare()  # free again once released
    second.release()
