"""The sidecar's revocation state: the last good signed CRL, plus serials pushed ahead of it.

A CRL is applied only if its signature verifies against the trust bundle and its
CRL number is not lower than the one held; anything else is refused and the last
good CRL stays in force (also while the issuer is unreachable, and across
restarts: it is kept in data_dir). Pushed revocations take effect at once, before
the signed CRL that includes them arrives, and are kept in data_dir too (they cannot
go into crl.pem, which only holds what the issuer signed), so a restart keeps
enforcing them in the sidecar's own checks. Lookups are set membership.

Taking a new CRL has three steps so the sidecar's event loop never blocks on it:
`accept_newest` (parse and verify each CRL offered: about 0.35 s at 100,000 entries)
and `persist` (data_dir/crl.pem, and output_dir/crl.pem when set, each fsynced) run on
a thread, in that order, so a CRL is on disk before it is served; `install`, which swaps
the in-memory state, runs on the loop, so a pushed revocation handled meanwhile is never
overwritten.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cryptography import x509

from agent_sidecar import metrics
from tessera import crl, logs, pem, safefs, x509svid
from tessera.errors import ConfigError

log = logs.get("sidecar.revocation")

# A pushed serial that no CRL lists after this long was left out by the issuer because it expired.
PUSHED_KEEP_SECONDS = 3600
PUSHED_FILE = "revoked-pushed.txt"  # in data_dir: "<serial hex> <unix time pushed>" per line


class RevocationState:
    def __init__(self, bundle: Callable[[], Sequence[x509.Certificate]], data_dir: Path,
                 output_dir: Path | None = None):
        self._bundle = bundle
        self.saved = data_dir / "crl.pem"
        self.saved_pushed = data_dir / PUSHED_FILE
        self.output_dir = output_dir
        self.der: bytes = b""
        self.number: int | None = None
        self.crl_serials: frozenset[str] = frozenset()
        self.pushed: dict[str, float] = {}  # revoked by a pushed event, not yet in a CRL we hold (-> when)
        self.seq = 0  # last revocation sequence number seen
        self.refused = 0  # CRLs refused (bad signature or lower number)

    # -- lookups ------------------------------------------------------------------------

    def is_revoked(self, serial_hex: str) -> bool:
        return serial_hex in self.crl_serials or serial_hex in self.pushed

    def crls(self) -> list[bytes]:
        """For the Workload API's `crl` fields."""
        return [self.der] if self.der else []

    # -- updates --------------------------------------------------------------------------

    def load_saved(self) -> None:
        """The pushed serials and the CRL kept from the last run (the CRL if it still verifies)."""
        self._load_pushed()
        try:
            data = safefs.read_regular(self.saved, "data_dir")
        except FileNotFoundError:
            return
        try:
            self.apply(data, persist=False)
        except crl.CrlError as e:
            log.warning("ignoring the saved CRL", path=str(self.saved), error=str(e))

    def apply(self, data: bytes, persist: bool = True) -> bool:
        """Accept, install and persist a CRL in one go; False if it is the one already held, CrlError if it
        must be refused. For callers that may block (start-up, tests); the sidecar's loop uses the steps."""
        accepted = self.accept(data)
        if accepted is None or not self.install(accepted):
            return False
        if persist:
            self.persist(accepted)
        return True

    def accept(self, data: bytes) -> crl.Accepted | None:
        """Parse and verify a CRL against the one held (blocks; no state changes but the refusal count)."""
        try:
            return crl.accept(data, self._bundle(), self.number, self.der)
        except Exception as e:  # CrlError, or whatever a signed but malformed CRL raises deeper down
            self.refused += 1
            log.warning("refused a CRL; keeping the last good one", error=str(e), current_number=self.number)
            raise e if isinstance(e, crl.CrlError) else crl.CrlError(f"unreadable CRL: {e}") from e

    def accept_newest(self, offers: Sequence[bytes]) -> crl.Accepted | None:
        """Of CRLs offered together, the newest one to take; None when none is newer than the one in force.

        Each is judged against the CRL in force, not against the others: one older than another
        offer is passed over, not refused (a fetch may answer after a newer CRL was pushed).
        """
        newest = None
        for data in offers:
            try:
                accepted = self.accept(data)
            except crl.CrlError:
                continue  # refused and logged
            if accepted is not None and (newest is None or accepted.number > newest.number):
                newest = accepted
        return newest

    def install(self, accepted: crl.Accepted) -> bool:
        """Put an accepted CRL in force; False if a CRL at least as new was installed since it was accepted."""
        if self.number is not None and accepted.number <= self.number:
            return False
        self.der, self.number = accepted.der, accepted.number
        self.crl_serials = accepted.serials
        cutoff = time.time() - PUSHED_KEEP_SECONDS
        self.pushed = {s: t for s, t in self.pushed.items() if s not in self.crl_serials and t > cutoff}
        metrics.set_crl(accepted.number, len(self.crl_serials))
        log.info("CRL applied", number=accepted.number, entries=len(self.crl_serials))
        return True

    def persist(self, accepted: crl.Accepted) -> None:
        """Keep an installed CRL across restarts, and publish it as output_dir/crl.pem (blocks)."""
        text = crl.pem(accepted.crl)
        safefs.atomic_write(self.saved, text, 0o644)
        if self.output_dir is not None:
            safefs.atomic_write(self.output_dir / "crl.pem", text, 0o644)

    def _load_pushed(self) -> None:
        try:
            lines = safefs.read_regular(self.saved_pushed, "data_dir").decode().splitlines()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            log.warning("ignoring the saved pushed revocations", path=str(self.saved_pushed), error=str(e))
            return
        cutoff = time.time() - PUSHED_KEEP_SECONDS
        for line in lines:
            try:
                serial, pushed_at = line.split()
                n, t = int(serial, 16), float(pushed_at)
            except ValueError:
                continue  # a line this code did not write: skipped, its neighbours kept
            if t > cutoff:
                self.pushed[x509svid.serial_hex(n)] = t

    def save_pushed(self, pushed: dict[str, float]) -> None:
        """Keep pushed serials (a copy of `pushed` taken on the loop) across restarts (blocks)."""
        text = "".join(f"{s} {t:.0f}\n" for s, t in pushed.items())
        safefs.atomic_write(self.saved_pushed, text.encode(), 0o600)

    def note_revocation(self, seq: int, serials: Iterable[str]) -> bool:
        """Apply a pushed revocation; True if revocations were missed (fetch the CRL)."""
        gap = self.seq != 0 and seq > self.seq + 1
        self.seq = max(self.seq, seq)
        now = time.time()
        self.pushed.update((s, now) for s in serials if s not in self.crl_serials)
        return gap

    def write_bundle(self, bundle_der: bytes) -> None:
        if self.output_dir is not None and bundle_der:
            safefs.atomic_write(self.output_dir / "bundle.pem", pem.certs_pem(pem.split_der(bundle_der)), 0o644)

    def write_outputs(self, bundle_der: bytes) -> None:
        """bundle.pem and crl.pem in output_dir, e.g. at start."""
        if self.output_dir is None:
            return
        safefs.make_dir(self.output_dir, "output_dir", 0o755)  # readers (nginx) need it; only we write it
        self.write_bundle(bundle_der)
        if self.der:
            safefs.atomic_write(self.output_dir / "crl.pem", crl.pem(crl.load(self.der)), 0o644)
