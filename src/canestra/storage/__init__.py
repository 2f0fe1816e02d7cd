"""Where data lives: local paths or s3:// URIs, S3 options, EU region rules."""

# The modules other packages import.
__all__ = ["files", "lock", "regions", "s3"]
