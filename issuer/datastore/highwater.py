"""The issuer refuses to go backwards: a high-water mark of its database's counters, kept in data_dir.

The database keeps four kinds of counter that only ever grow: the change feed position, the revocation seq, the
audit seq and each authority's CRL number (core.models.Heads). An issuer keeps the highest of each it has seen
committed in `data_dir/high-water.json` (mode 0600, replaced atomically through tessera.safefs): it reads the
database's heads at start, every REFRESH seconds while it runs (so the mark follows the other issuers on a shared
database too) and at stop; and each CRL number it takes is written before that CRL goes out, because sidecars
refuse a CRL numbered lower than one they hold, so no number a sidecar may hold can be missing from the mark.

At start, before the store is opened (nothing created, migrated or written yet), the database's heads are compared
with the mark. A database behind it was restored from an older backup, or is another or an empty one named by
mistake: the issuer refuses to start with one line saying what is behind and by how much (DatabaseBehind).

Started once with `--accept-restored-database`, it continues from that database (`accept`):
- an audit event (`datastore.restore_accepted`) records what was behind, in the chain the database holds;
- every CRL number the mark saw is moved past, in the same transaction, so the sidecars accept the CRLs signed
  from now on (a lower number would be refused, and revocations made from now on would not reach their crl.pem);
- the audit file is set aside when the database lost audit records (the file holds them: evidence of what the
  restore lost, and it no longer matches the database's chain); a new file is written from the database;
- the revocation seqs the database lost are logged: those revocations must be made again;
- the database's heads become the new mark.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from issuer.core.models import ISSUER, AuditEvent, Heads
from issuer.datastore.interface import Datastore
from tessera import logs, safefs
from tessera.errors import ConfigError

log = logs.get("issuer.datastore.highwater")
_fail_log = logs.Throttled(log, window=60, level="error")  # the database down: one line a minute

FILE_NAME = "high-water.json"
REFRESH = 1.0  # seconds between reads of the database's heads while the issuer runs
OVERRIDE_FLAG = "--accept-restored-database"


class DatabaseBehind(ConfigError):
    """The database is behind this issuer's high-water mark: the issuer does not start on it."""


@dataclass(frozen=True)
class Lag:
    """One counter the database holds lower than the mark saw."""

    what: str  # "audit seq", "revocation seq", "change feed position", "CRL number of <authority>"
    seen: int  # the mark
    now: int  # the database

    def __str__(self) -> str:
        return f"{self.what} {self.now} < {self.seen} ({self.seen - self.now} behind)"


def lags(mark: Heads, db: Heads) -> list[Lag]:
    """Every counter of `db` below `mark`, the audit seq first."""
    out = [Lag(what, seen, now) for what, seen, now in (
        ("audit seq", mark.audit_seq, db.audit_seq),
        ("revocation seq", mark.revocation_seq, db.revocation_seq),
        ("change feed position", mark.change_position, db.change_position)) if now < seen]
    for authority, seen in sorted(mark.crl_numbers.items()):
        now = db.crl_numbers.get(authority, 0)
        if now < seen:
            out.append(Lag(f"CRL number of authority {authority[:16]}", seen, now))
    return out


def highest(a: Heads, b: Heads) -> Heads:
    crl = dict(a.crl_numbers)
    for authority, n in b.crl_numbers.items():
        crl[authority] = max(n, crl.get(authority, 0))
    return Heads(max(a.change_position, b.change_position), max(a.revocation_seq, b.revocation_seq),
                 max(a.audit_seq, b.audit_seq), crl)


def _count(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a whole number >= 0")
    return value


def parse(data: bytes) -> Heads:
    """A mark as written by `_write`; ValueError if it is anything else."""
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("crl_numbers"), dict):
        raise ValueError("not an object with crl_numbers")
    return Heads(_count(d.get("change_position"), "change_position"), _count(d.get("revocation_seq"), "revocation_seq"),
                 _count(d.get("audit_seq"), "audit_seq"),
                 {str(k): _count(v, "a CRL number") for k, v in d["crl_numbers"].items()})


class HighWater:
    """This issuer's mark (see the module's docstring)."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()  # the mark and its file
        self.mark = self._load()  # None: no mark yet (a new data_dir, or one from before marks were kept)
        self._store: Datastore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._went_back = False  # logged once that the database went backwards under a running issuer

    def _load(self) -> Heads | None:
        try:
            data = safefs.read_regular(self.path, "data_dir")
        except FileNotFoundError:
            return None
        try:
            return parse(data)
        except ValueError as e:
            raise ConfigError(f"{self.path} is not a high-water mark ({e}); it is what keeps this issuer from "
                              "starting on an older database: restore it, or move it away knowing the database "
                              "is current") from None

    def _write(self, heads: Heads) -> None:
        """Under self._lock."""
        data = json.dumps(dataclasses.asdict(heads), sort_keys=True).encode() + b"\n"
        safefs.atomic_write(self.path, data, 0o600, what="data_dir")
        self.mark = heads

    # -- at start -------------------------------------------------------------------------------------------

    def check(self, db: Heads, accept: bool) -> list[Lag]:
        """What of `db` is behind the mark; DatabaseBehind (one line) if anything is and `accept` is not given."""
        behind = lags(self.mark, db) if self.mark is not None else []
        if behind and not accept:
            raise DatabaseBehind(
                f"the database is behind this issuer's high-water mark ({self.path}): "
                f"{', '.join(map(str, behind))}; it was restored from an older backup, or is another database. "
                f"Nothing was changed. To continue from it (revocations made since that backup must be made again), "
                f"start once with {OVERRIDE_FLAG}")
        return behind

    def accept(self, store: Datastore, behind: list[Lag], set_aside_audit_file: Callable[[], Path | None]) -> None:
        """Continue from a database that is behind the mark (the operator said so): see the module's docstring.
        `set_aside_audit_file` renames the audit file (if any) out of the way and says where it went."""
        assert self.mark is not None and behind
        mark, db = self.mark, store.heads()
        floors = {a: n for a, n in mark.crl_numbers.items() if db.crl_numbers.get(a, 0) < n}
        lost = [db.revocation_seq + 1, mark.revocation_seq] if db.revocation_seq < mark.revocation_seq else []
        set_aside = set_aside_audit_file() if db.audit_seq < mark.audit_seq else None
        details = {"behind": {lag.what: {"seen": lag.seen, "database": lag.now} for lag in behind},
                   "crl_numbers_raised_to": floors, "lost_revocation_seqs": lost,
                   "audit_file_set_aside": str(set_aside) if set_aside else ""}
        store.raise_crl_numbers(floors, AuditEvent(
            "datastore.restore_accepted", ISSUER, "allow", subject=str(self.path),
            reason=f"started with {OVERRIDE_FLAG} on a database behind the high-water mark", details=details))
        log.warning("started on a database behind the high-water mark: continuing from it", behind=list(map(str, behind)),
                    crl_numbers_raised_to={a[:16]: n for a, n in floors.items()})
        if lost:
            log.warning(f"revocations {lost[0]} to {lost[1]} were made after the backup and are not in the database: "
                        "make them again (revoke the same entries, serials, SPIFFE IDs, owners or sidecars)",
                        lost_revocation_seqs=lost,
                        where_listed=str(set_aside) if set_aside else "the audit file or an export made before")
        if set_aside:
            log.warning("the audit file holds records the database lost; set aside, a new one is written from the "
                        "database", set_aside=str(set_aside), lost_audit_seqs=[db.audit_seq + 1, mark.audit_seq])
        with self._lock:
            # Not `highest`: the database's lower heads are the new normal; its CRL numbers are past the mark's now.
            self._write(highest(Heads(crl_numbers=mark.crl_numbers), store.heads()))

    # -- while running --------------------------------------------------------------------------------------

    def attach(self, store: Datastore) -> None:
        """Follow `store` from now on; the mark is brought up to its heads at once."""
        self._store = store
        self.refresh()

    def note_crl_numbers(self, numbers: dict[str, int]) -> None:
        """CRL numbers just taken, written to the mark before the CRLs carrying them go out. A mark that cannot be
        written (a full disk) is logged, not raised: the CRLs still go out, and the next refresh writes the numbers
        from the database."""
        try:
            self._advance(Heads(crl_numbers=numbers))
        except OSError as e:
            _fail_log.log("write", "cannot write the high-water mark; retrying from the database", path=str(self.path),
                          error=str(e))

    def _advance(self, heads: Heads) -> None:
        with self._lock:
            new = heads if self.mark is None else highest(self.mark, heads)
            if new != self.mark:
                self._write(new)

    def refresh(self) -> None:
        """Bring the mark up to the database's heads."""
        assert self._store is not None
        heads = self._store.heads()
        if self.mark is not None and not self._went_back:
            behind = lags(self.mark, heads)
            if behind:  # restored under a running issuer: the mark keeps what was seen; the next start refuses
                self._went_back = True
                log.error("the database went backwards while the issuer ran (restored under it?); the mark keeps what "
                          "was seen, and the next start refuses it", behind=list(map(str, behind)))
        self._advance(heads)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="high-water", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the database down or a full disk: the next read tries again
                _fail_log.log("refresh", "updating the high-water mark failed; retrying", error=str(e) or repr(e))

    def stop(self) -> None:
        """Stop following, with a last read of the heads (a clean stop leaves the mark current)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._store is not None:
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - stopping anyway; the mark holds what was seen before
                log.warning("last update of the high-water mark failed", error=str(e) or repr(e))
            self._store = None
