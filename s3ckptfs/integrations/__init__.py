"""Callbacks for training frameworks, built on ``s3ckptfs.sync``.

Each module imports its framework, so import the one you use:

    from s3ckptfs.integrations.lightning import DurableCheckpoints      # Lightning
    from s3ckptfs.integrations.transformers import DurableCheckpoints   # Hugging Face Trainer

Both make the last checkpoint durable (complete in S3) at the end of training
and when the scheduler stops the job with SIGTERM, and log how long it took.
"""
