"""GDPR: audit records, erasure, retention purge, the record of processing."""
