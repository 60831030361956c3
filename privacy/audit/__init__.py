"""Signed, hash-chained audit logs (server and sites), their verification and the report."""

from privacy.audit.log import AuditLog, AuditLogError, Entry, read_entries
from privacy.keys import load_or_create_key, load_public_key, public_fingerprint

__all__ = ["AuditLog", "AuditLogError", "Entry", "load_or_create_key", "load_public_key",
           "public_fingerprint", "read_entries"]
