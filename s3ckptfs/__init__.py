"""s3ckptfs: mount an S3 prefix as a local checkpoint directory.

Writes land in a local cache at disk speed and stream to S3 as parallel
multipart uploads while the file is still being written; an object appears in
S3 only once complete. Reads come back with parallel ranged GETs.
"""

__version__ = "0.1.0"
