"""The contribution ledger (SQLite): exact integer sums, exact removal, signed audit chain.

Modules, one concern each (shared by every model family whose aggregate is a weighted sum):

- :mod:`~server.ledger.records`: errors, rejection reasons, the row dataclasses;
- :mod:`~server.ledger.validation`: checks on untrusted input (ids, metadata, tensors);
- :mod:`~server.ledger.families`: what differs per model family (``"delta"``: a TAFT Δw;
  ``"stats"``: exact-head sufficient statistics): checks, stored bytes, weight, composed model;
- :mod:`~server.ledger.accumulators`: exact fixed-point sums of named arrays;
- :mod:`~server.ledger.storage`: the SQLite file, transactions, permissions, erasure;
- :mod:`~server.ledger.audit`: hash chain, Ed25519-signed heads, the head file;
- :mod:`~server.ledger.contributions`: :class:`Ledger` (add / replace / remove / retract / readmit, reads);
- :mod:`~server.ledger.verification`: ``Ledger.verify``;
- :mod:`~server.ledger.export`: the composed model + manifest, and checking an export.
"""
from server.ledger.accumulators import Accumulators, arrays_digest
from server.ledger.audit import GENESIS_HASH
from server.ledger.contributions import WEIGHTINGS, Ledger, ledger_file_paths, signing_key_path
from server.ledger.export import export, verify_export
from server.ledger.families import FAMILIES
from server.ledger.records import (
    REASONS, Contribution, LedgerCorrupt, LedgerError, ModelVersion, RejectedContribution, Site, VerifyReport,
)
from server.ledger.storage import SCHEMA_VERSION
from server.ledger.validation import CONTRIBUTION_META, MAX_META_BYTES, MAX_META_DEPTH, MAX_NUM_EXAMPLES

__all__ = [
    "Accumulators", "CONTRIBUTION_META", "FAMILIES", "Contribution", "GENESIS_HASH", "Ledger", "LedgerCorrupt", "LedgerError",
    "MAX_META_BYTES", "MAX_META_DEPTH", "MAX_NUM_EXAMPLES", "ModelVersion", "REASONS", "RejectedContribution",
    "SCHEMA_VERSION", "Site", "VerifyReport", "WEIGHTINGS", "arrays_digest", "export", "ledger_file_paths", "signing_key_path", "verify_export",
]
