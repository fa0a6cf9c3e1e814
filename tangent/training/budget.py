"""A site's durable privacy budget: sequential composition of (ε, δ) over every contribution.

The record is one JSON file in the site's state directory (``privacy-budget.json``), created
once by :meth:`PrivacyBudget.create` (by the deploy scripts, or by the site at its first DP
request). It is state, not cache: a missing, unreadable, foreign or rolled-back record refuses
training (:class:`BudgetMissing`) — it never reads as "nothing spent yet".

**Append-only, hash-chained, sealed.** The record's entries only grow: a reservation and its
settlement are two entries, and each entry carries the sha256 of the one before (the first, of
the record's header: site, budgets, creation time). A second file, ``privacy-budget.seal``
written at creation and after every entry, holds the number of entries and the newest hash. At
every read the chain is recomputed and must extend the sealed head, so deleting the record,
truncating it, or editing a spent ε refuses, and so does deleting the seal. What this does not
stop: whoever can write the state directory can delete *both* files (the site then starts a new
record, as at its first start) or rewrite both consistently — there is no key. It catches
accidents and casual edits, not the site's own root (deploy/README.md, threat model).

Check and record are one step. :meth:`PrivacyBudget.reserve` takes an exclusive ``flock``,
re-reads the record, refuses if the planned (ε, δ) no longer fits and appends a *reserve*
entry, all before any training step; :meth:`PrivacyBudget.settle` later appends the (ε, δ)
actually spent for it. A process that dies in between leaves the reservation charged: the site
may have computed on its data, so the conservative reading is "spent". Concurrent requests
(threads or processes on the same file) are serialised by the lock, so they can never overspend
together. Every write goes to a 0600 temporary file that is fsynced and renamed over the file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

#: relative tolerance for float sums at the budget's edge (ε values come from an accountant)
_TOLERANCE = 1e-9

#: the total ε of a site that requires DP but names no budget: without a total the server could
#: ask for contributions forever and average the noise away
DEFAULT_EPSILON_BUDGET = 8.0


class BudgetExhausted(RuntimeError):
    """Training would spend more ε or δ than the site's budget allows."""


class BudgetMissing(RuntimeError):
    """The site has a budget but its record is missing, unreadable or not this site's."""


class PrivacyBudget:
    """The (ε, δ) a site has spent, in ``path``; the budget itself lives in the record.

    ``epsilon_cap``/``delta_cap``: a lower budget the site's node config sets (the smaller of the
    record's and the cap applies; a node config can lower the budget, never raise it).
    """

    VERSION = 3
    FILE_NAME = "privacy-budget.json"
    SEAL_SUFFIX = ".seal"

    def __init__(self, path: str | os.PathLike, site_id: str, *, epsilon_cap: float | None = None,
                 delta_cap: float | None = None):
        self.path = Path(path)
        self.site_id = str(site_id)
        self.epsilon_cap = epsilon_cap
        self.delta_cap = delta_cap

    @property
    def seal_path(self) -> Path:
        """The second file: entry count and newest hash of the record (``privacy-budget.seal``)."""
        return self.path.with_suffix(self.SEAL_SUFFIX)

    def started(self) -> bool:
        """Has this site ever had a record here (the record or its seal exists)?"""
        return self.path.exists() or self.seal_path.exists()

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | os.PathLike, site_id: str, epsilon_budget: float,
               delta_budget: float | None = None) -> "PrivacyBudget":
        """Initialise a site's record and its seal (the directory is created 0700). Refuses if
        either exists: re-creating would reset what was spent."""
        epsilon_budget = float(epsilon_budget)
        if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be a positive finite number, got {epsilon_budget}")
        if delta_budget is not None:
            delta_budget = float(delta_budget)
            if not 0 < delta_budget < 1:
                raise ValueError(f"delta_budget must be in (0, 1), got {delta_budget}")
        budget = cls(path, site_id)
        budget.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with budget._locked():
            if budget.started():
                raise FileExistsError(f"{budget.path}: a privacy-budget record (or its seal) already "
                                      "exists; creating a new one would forget what was spent")
            budget._write({"version": cls.VERSION, "site-id": budget.site_id,
                           "epsilon-budget": epsilon_budget, "delta-budget": delta_budget,
                           "created": time.time(), "entries": []})
        return budget

    # ------------------------------------------------------------------ reading
    def state(self) -> dict:
        """The record: budgets and every entry (reserve and settle). Raises BudgetMissing."""
        return self._read()

    def charges(self) -> dict[str, dict]:
        """Per contribution id, what it is charged: its newest entry (reserved or settled)."""
        return _charges(self._read())

    @property
    def epsilon_budget(self) -> float:
        return float(self._read()["epsilon-budget"])

    @property
    def delta_budget(self) -> float | None:
        value = self._read()["delta-budget"]
        return None if value is None else float(value)

    @property
    def spent(self) -> tuple[float, float]:
        """(Σ ε, Σ δ) charged so far, reservations included."""
        return _totals(self._read())

    @property
    def remaining_epsilon(self) -> float:
        record = self._read()
        return max(_limit(record["epsilon-budget"], self.epsilon_cap) - _totals(record)[0], 0.0)

    def check(self, epsilon: float, delta: float) -> None:
        """Raise BudgetExhausted if (ε, δ) more would not fit (no lock: a pre-flight check before
        touching data; :meth:`reserve` decides)."""
        _check_fits(self._read(), self.site_id, epsilon, delta, self.epsilon_cap, self.delta_cap)

    # ------------------------------------------------------------------ spending
    def reserve(self, contribution_id: str, epsilon: float, delta: float, **meta) -> None:
        """Charge a planned (ε, δ) under ``contribution_id``, atomically with the check."""
        _check_value("epsilon", epsilon)
        _check_value("delta", delta)
        with self._locked():
            record = self._read()
            if contribution_id in _charges(record):
                raise ValueError(f"contribution {contribution_id!r} is already recorded")
            _check_fits(record, self.site_id, epsilon, delta, self.epsilon_cap, self.delta_cap)
            _append(record, {"id": contribution_id, "state": "reserved", "epsilon": float(epsilon),
                             "delta": float(delta), "time": time.time(), **meta})
            self._write(record)

    def settle(self, contribution_id: str, epsilon: float, delta: float, **meta) -> None:
        """Charge the (ε, δ) actually spent for a reservation (a new entry; the reservation stays
        in the chain). The charge is what was spent, even if it exceeds the reservation (it cannot
        by construction: the plan is computed from the same (σ, q, steps))."""
        _check_value("epsilon", epsilon)
        _check_value("delta", delta)
        with self._locked():
            record = self._read()
            charge = _charges(record).get(contribution_id)
            if charge is None or charge["state"] != "reserved":
                raise ValueError(f"no open reservation {contribution_id!r} in {self.path}")
            _append(record, {"id": contribution_id, "state": "settled", "epsilon": float(epsilon),
                             "delta": float(delta), "time": time.time(), **meta})
            self._write(record)

    # ------------------------------------------------------------------ files
    def _read(self) -> dict:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise BudgetMissing(f"site {self.site_id!r} has a privacy budget but its record "
                                f"{self.path} does not exist; refusing to train (a missing record "
                                "is never read as 'nothing spent'). Restore it from a backup "
                                "that includes its seal") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BudgetMissing(f"privacy-budget record {self.path} is unreadable ({err}); "
                                "refusing to train") from err
        problem = _malformed(record, self.site_id) or self._unsealed(record)
        if problem:
            raise BudgetMissing(f"privacy-budget record {self.path} {problem}; refusing to train")
        return record

    def _unsealed(self, record: dict) -> str | None:
        """Why the record's chain does not extend its seal (None: it does)."""
        hashes = _chain(record)
        if hashes is None:
            return "has a broken hash chain (an entry was edited or removed)"
        try:
            seal = json.loads(self.seal_path.read_text())
        except FileNotFoundError:
            return f"has no seal {self.seal_path.name} (deleted?)"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"has an unreadable seal ({err})"
        if not isinstance(seal, dict) or seal.get("genesis") != hashes[0]:
            return "does not match its seal (replaced by another record)"
        count = seal.get("entries")
        if not isinstance(count, int) or count < 0 or count > len(hashes) - 1:
            return f"has fewer entries than its seal records ({len(hashes) - 1} < {count}): rolled back"
        if hashes[count] != seal.get("head"):
            return "does not extend its sealed entries (rewritten)"
        return None  # entries beyond the seal: a crash between the two writes; sealed at the next

    def _write(self, record: dict) -> None:
        hashes = _chain(record)
        self._replace(self.path, record)
        self._replace(self.seal_path, {"version": self.VERSION, "site-id": self.site_id, "genesis": hashes[0],
                                       "entries": len(hashes) - 1, "head": hashes[-1]})

    def _replace(self, path: Path, document: dict) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    @contextmanager
    def _locked(self):
        if not self.path.parent.is_dir():
            raise BudgetMissing(f"state directory {self.path.parent} of the privacy-budget record "
                                "does not exist; refusing to train")
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_HEADER = ("version", "site-id", "epsilon-budget", "delta-budget", "created")


def _digest(previous: str, document: dict) -> str:
    return hashlib.sha256((previous + json.dumps(document, sort_keys=True)).encode()).hexdigest()


def _chain(record: dict) -> list[str] | None:
    """[genesis, hash of entry 1, …]; None when an entry's ``prev``/``hash`` do not match."""
    hashes = [_digest("", {key: record.get(key) for key in _HEADER})]
    for entry in record["entries"]:
        body = {key: value for key, value in entry.items() if key != "hash"}
        if body.get("prev") != hashes[-1] or entry.get("hash") != _digest(hashes[-1], body):
            return None
        hashes.append(entry["hash"])
    return hashes


def _append(record: dict, entry: dict) -> None:
    body = entry | {"seq": len(record["entries"]), "prev": _chain(record)[-1]}
    record["entries"].append(body | {"hash": _digest(body["prev"], body)})


def _malformed(record, site_id: str) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    if record.get("version") != PrivacyBudget.VERSION:
        return f"has unknown version {record.get('version')!r}"
    if record.get("site-id") != site_id:
        return f"belongs to site {record.get('site-id')!r}, not {site_id!r}"
    eps, delta = record.get("epsilon-budget"), record.get("delta-budget")
    if not isinstance(eps, (int, float)) or not eps > 0:
        return f"has no valid epsilon-budget ({eps!r})"
    if delta is not None and (not isinstance(delta, (int, float)) or not 0 < delta < 1):
        return f"has an invalid delta-budget ({delta!r})"
    entries = record.get("entries")
    if not isinstance(entries, list) or not all(
            isinstance(c, dict) and isinstance(c.get("epsilon"), (int, float))
            and isinstance(c.get("delta"), (int, float)) and c.get("epsilon") >= 0
            and c.get("delta") >= 0 and c.get("state") in ("reserved", "settled") for c in entries):
        return "has malformed entries"
    return None


def _charges(record: dict) -> dict[str, dict]:
    charges: dict[str, dict] = {}
    for entry in record["entries"]:
        charges[entry["id"]] = entry
    return charges


def _totals(record: dict) -> tuple[float, float]:
    charges = _charges(record).values()
    return (math.fsum(c["epsilon"] for c in charges), math.fsum(c["delta"] for c in charges))


def _limit(budget: float | None, cap: float | None) -> float:
    values = [float(v) for v in (budget, cap) if v is not None]
    return min(values) if values else math.inf


def _check_fits(record: dict, site_id: str, epsilon: float, delta: float,
                epsilon_cap: float | None, delta_cap: float | None) -> None:
    spent_eps, spent_delta = _totals(record)
    eps_limit = _limit(record["epsilon-budget"], epsilon_cap)
    delta_limit = _limit(record["delta-budget"], delta_cap)
    if spent_eps + epsilon > eps_limit * (1 + _TOLERANCE):
        raise BudgetExhausted(
            f"site {site_id!r}: privacy budget exhausted — spent ε={spent_eps:.4g} of "
            f"{eps_limit:.4g}, this contribution would add ε={epsilon:.4g} "
            f"(remaining {max(eps_limit - spent_eps, 0.0):.4g}); refusing to train")
    if spent_delta + delta > delta_limit * (1 + _TOLERANCE):
        raise BudgetExhausted(
            f"site {site_id!r}: δ budget exhausted — spent δ={spent_delta:.3g} of "
            f"{delta_limit:.3g}, this contribution would add δ={delta:.3g}; refusing to train")


def _check_value(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {name} {value!r}")
