"""Checkpoint benchmark: s3ckptfs against the usual ways of getting torch checkpoints into and out of S3.

One run starts its own SeaweedFS server (``s3ckptfs.devserver``), builds one
deterministic state dict per size (float32 tensors of 4 MiB each) and measures,
on that same state dict, every way of saving it to S3 and loading it back
(``measurements.MEASUREMENTS``; docs/benchmark.md describes each). Before each
timed step the page cache is dropped (when permitted), so every read is cold.
Each repeat of a measurement gets its own bucket, deleted afterwards, and each
mount its own mountpoint and cache dir under the work dir. Everything mounted
is unmounted and every process started is stopped, on success, error, Ctrl-C
or SIGTERM.

Modules, by job:
  common        units, logging, MeasurementError, the janitor that undoes everything started
  workload      the state dict, timed save and load, page-cache control, concurrent loaders
  context       ``Bench``: what one size's measurements share (server, buckets, scratch dirs)
  peers         each tool compared: how it is found, configured, mounted and stopped
  measurements  the measurements, named by what they measure, and the order they run in
  report        tables, ratios, bench.md / bench.json / bench.png
  cli           the command line (``scripts/bench.py``, run by ``scripts/bench.sh``)
"""
