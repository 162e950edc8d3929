"""S3 access for a region's bucket; credentials are resolved here, from references."""

from __future__ import annotations

import boto3
from botocore.config import Config

from eagle_dr.config import S3Config


def client(cfg: S3Config):
    return boto3.client(
        "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region_name,
        aws_access_key_id=cfg.access_key.resolve() if cfg.access_key else None,
        aws_secret_access_key=cfg.secret_key.resolve() if cfg.secret_key else None,
        # The bucket's CA when it is a private one; verification stays on either way.
        verify=cfg.ca_file or True,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
