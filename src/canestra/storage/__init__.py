"""Where data lives: local paths or s3:// URIs, S3 options, EU region rules."""
