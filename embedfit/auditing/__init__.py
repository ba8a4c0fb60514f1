"""Auditing a store's images: duplicates, conflicting labels, train/test leaks, label issues and outliers, found
from the stored embeddings (`audit`), fed back into evaluation (`duplicate_groups`, `read_exclusions`) and shown as
a page to act on (`build_audit_report`).

`core` holds the finders and the audit folder (audit.csv, audit.json); `search` the nearest-neighbour search
(exact, or faiss' approximate index for large stores); `page` the HTML page.
"""

from embedfit.auditing.core import (
    KINDS,
    NEAR_DUPLICATE_THRESHOLD,
    AuditConfig,
    AuditResult,
    audit,
    cluster_duplicates,
    components,
    content_keys,
    duplicate_groups,
    exact_duplicates_across,
    exclusion_note,
    is_audit_folder,
    read_audit,
    read_exclusions,
    write_audit,
)
from embedfit.auditing.page import build_audit_report

__all__ = ["KINDS", "NEAR_DUPLICATE_THRESHOLD", "AuditConfig", "AuditResult", "audit", "build_audit_report",
           "cluster_duplicates", "components", "content_keys", "duplicate_groups", "exact_duplicates_across",
           "exclusion_note", "is_audit_folder", "read_audit", "read_exclusions", "write_audit"]
