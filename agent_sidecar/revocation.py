"""The sidecar's revocation state: the signed CRLs in force, one per signing authority, plus serials pushed
ahead of them.

Every signing authority publishes its own CRL (each unexpired intermediate lists the leaves it signed;
a root lists the intermediates it withdrew); the issuer sends them all as one CrlSet, with the
intermediates' certificates. A CRL is taken only if its signature verifies against a bundle root or
against an intermediate of the set that itself chains to a bundle root (tessera.chain), and its number
is not lower than the one held for the same authority (the signer's id, tessera.x509svid.authority_id);
anything else is refused (logged, counted) and that authority's last good CRL stays in force (also while
the issuer is unreachable, and across restarts: the CRLs and the intermediates that signed them are kept
in data_dir). A set replaces the one held: an authority it no longer lists (an intermediate that
expired) is dropped, unless one of the set's CRLs was refused (it may have been that authority's).
Pushed revocations take effect at once, before the signed CRL that includes them arrives, and are kept
in data_dir too (they cannot go into crl.pem, which only holds what the issuer signed), so a restart
keeps enforcing them in the sidecar's own checks. Lookups are set membership in the union of every
CRL held (serials are random 159-bit numbers: two authorities never share one).

Taking a new set has three steps so the sidecar's event loop never blocks on it:
`accept_sets` (parse and verify each CRL offered: about 0.35 s at 100,000 entries) and `persist`
(data_dir/intermediates.pem and crl.pem, and output_dir/crl.pem when set, each fsynced) run on a thread,
in that order, so a CRL is on disk before it is served; `install`, which swaps the in-memory state,
runs on the loop, so a pushed revocation handled meanwhile is never overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from cryptography import x509

from agent_sidecar import metrics
from tessera import chain, crl, logs, pem, safefs, x509svid
from tessera.errors import ConfigError

log = logs.get("sidecar.revocation")

# A pushed serial that no CRL lists after this long was left out by the issuer because it expired.
PUSHED_KEEP_SECONDS = 3600
PUSHED_FILE = "revoked-pushed.txt"  # in data_dir: "<serial hex> <unix time pushed>" per line
INTERMEDIATES_FILE = "intermediates.pem"  # in data_dir: the intermediates that signed the CRLs held


@dataclass(frozen=True)
class CrlOffer:
    """A CrlSet as the issuer sent it: every published CRL (DER) and the published intermediates (DER)."""

    crls: tuple[bytes, ...]
    intermediates: tuple[bytes, ...] = ()

    @classmethod
    def from_proto(cls, crl_set) -> "CrlOffer":
        return cls(tuple(crl_set.crls), tuple(crl_set.intermediates))


@dataclass(frozen=True)
class CrlSetTaken:
    """The complete set of CRLs to hold after an offer was judged: authority id -> CRL."""

    held: Mapping[str, crl.Accepted]


class RevocationState:
    def __init__(self, bundle: Callable[[], Sequence[x509.Certificate]], data_dir: Path,
                 output_dir: Path | None = None):
        self._bundle = bundle
        self.saved = data_dir / "crl.pem"
        self.saved_intermediates = data_dir / INTERMEDIATES_FILE
        self.saved_pushed = data_dir / PUSHED_FILE
        self.output_dir = output_dir
        self.held: Mapping[str, crl.Accepted] = {}  # authority id -> CRL in force; replaced whole, never mutated
        self.crl_serials: frozenset[str] = frozenset()  # the union of every held CRL's serials
        self.pushed: dict[str, float] = {}  # revoked by a pushed event, not yet in a CRL we hold (-> when)
        self.seq = 0  # last revocation sequence number seen on the current sync stream (0: none yet)
        self.refused = 0  # CRLs refused (bad signature, unknown signer, lower number)

    # -- lookups ------------------------------------------------------------------------

    def is_revoked(self, serial_hex: str) -> bool:
        return serial_hex in self.crl_serials or serial_hex in self.pushed

    def crls(self) -> list[bytes]:
        """For the Workload API's `crl` fields: every CRL in force, in a stable order."""
        return [a.der for _, a in sorted(self.held.items())]

    def number(self, authority: str) -> int | None:
        a = self.held.get(authority)
        return a.number if a is not None else None

    # -- updates --------------------------------------------------------------------------

    def load_saved(self) -> None:
        """The pushed serials and the CRLs kept from the last run (those that still verify)."""
        self._load_pushed()
        try:
            data = safefs.read_regular(self.saved, "data_dir")
        except FileNotFoundError:
            return
        try:
            ders = tuple(crl.der(c) for c in crl.load_all(data))
        except crl.CrlError as e:
            log.warning("ignoring the saved CRLs", path=str(self.saved), error=str(e))
            return
        intermediates: tuple[bytes, ...] = ()
        try:
            intermediates = tuple(pem.der_concat([c]) for c in
                                  x509.load_pem_x509_certificates(safefs.read_regular(self.saved_intermediates,
                                                                                      "data_dir")))
        except FileNotFoundError:
            pass
        except ValueError as e:
            log.warning("ignoring the saved intermediates", path=str(self.saved_intermediates), error=str(e))
        taken = self.accept_sets([CrlOffer(ders, intermediates)])
        if taken is not None:
            self.install(taken)

    def apply(self, offer: CrlOffer, persist: bool = True) -> bool:
        """Accept, install and persist a set in one go; False if nothing changed. For callers that may block
        (start-up, tests); the sidecar's loop uses the steps."""
        taken = self.accept_sets([offer])
        if taken is None or not self.install(taken):
            return False
        if persist:
            self.persist(taken)
        return True

    def trusted_intermediates(self, offered: Iterable[bytes]) -> list[x509.Certificate]:
        """The offered intermediates that a bundle root signed (CA certificates; their dates do not matter to
        their CRLs' authenticity, see tessera.chain); the others are logged and left out."""
        roots = tuple(self._bundle())
        trusted = []
        for data in offered:
            try:
                cert = x509.load_der_x509_certificate(data)
                chain.check_intermediate(cert, roots, dates=False)
            except ValueError as e:  # ChainError is one
                log.warning("not trusting an intermediate offered with the CRLs", error=str(e))
                continue
            trusted.append(cert)
        return trusted

    def accept(self, data: bytes, signers: Sequence[x509.Certificate]) -> crl.Accepted:
        """Parse and verify one CRL against the one held from its authority (blocks; no state changes but the
        refusal count)."""
        try:
            return crl.accept(data, signers, self.held)
        except Exception as e:  # CrlError, or whatever a signed but malformed CRL raises deeper down
            self.refused += 1
            log.warning("refused a CRL; keeping the last good one of its authority", error=str(e))
            raise e if isinstance(e, crl.CrlError) else crl.CrlError(f"unreadable CRL: {e}") from e

    def accept_sets(self, offers: Sequence[CrlOffer]) -> CrlSetTaken | None:
        """Of sets offered together, the set of CRLs to hold; None when it is the set already held (blocks).

        Each CRL is judged against the set in force, not against the other offers: one older than another
        offer's CRL from the same authority is passed over, not refused (a fetch may answer after a newer
        set was pushed). The authorities kept are those any of the offers lists: a stale fetch answered
        with a newer push must not drop an authority the push just added. If a CRL is refused, no
        authority is dropped.
        """
        # Every trust domain has an authority publishing a CRL: a set with none is an issuer not ready, not news.
        offers = [o for o in offers if o.crls]
        if not offers:
            return None
        roots = list(self._bundle())
        held = self.held
        taken: dict[str, crl.Accepted] = {}
        clean = True  # no CRL offered was refused
        for offer in offers:
            signers = roots + self.trusted_intermediates(offer.intermediates)
            for data in offer.crls:
                try:
                    a = self.accept(data, signers)
                except crl.CrlError:
                    clean = False
                    continue
                if a.authority not in taken or a.number > taken[a.authority].number:
                    taken[a.authority] = a
        if not clean:
            # A refused CRL may have been an authority's the set seems to drop: keep every last good one.
            for authority, a in held.items():
                taken.setdefault(authority, a)
        if taken.keys() == held.keys() and all(taken[k] is held[k] for k in taken):
            return None
        return CrlSetTaken(taken)

    def install(self, taken: CrlSetTaken) -> bool:
        """Put a set in force; False if nothing changes. An authority's CRL installed since the set was taken
        and newer than the set's stays (only the loop installs, so this guards the rule, not a race)."""
        new = dict(taken.held)
        for authority, a in new.items():
            current = self.held.get(authority)
            if current is not None and current.number > a.number:
                new[authority] = current
        if new.keys() == self.held.keys() and all(new[k] is self.held[k] for k in new):
            return False
        dropped = sorted(self.held.keys() - new.keys())
        self.held = new
        self.crl_serials = frozenset().union(*(a.serials for a in new.values()))
        cutoff = time.time() - PUSHED_KEEP_SECONDS
        self.pushed = {s: t for s, t in self.pushed.items() if s not in self.crl_serials and t > cutoff}
        metrics.set_crls({k: a.number for k, a in new.items()}, len(self.crl_serials))
        log.info("CRLs applied", numbers={k[:16]: a.number for k, a in sorted(new.items())},
                 entries=len(self.crl_serials), dropped=[k[:16] for k in dropped])
        return True

    def persist(self, taken: CrlSetTaken) -> None:
        """Keep a set across restarts (the intermediates first: a CRL is checked with them when it is read
        back), and publish its CRLs as output_dir/crl.pem (blocks)."""
        roots = {pem.der_concat([c]) for c in self._bundle()}
        signers = {pem.der_concat([a.signer]): a.signer for a in taken.held.values()}
        intermediates = [c for d, c in sorted(signers.items()) if d not in roots]
        safefs.atomic_write(self.saved_intermediates, pem.certs_pem(intermediates), 0o644)
        text = _crl_pem(taken.held)
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

    def begin_stream(self) -> None:
        """A new sync stream (maybe to another issuer) starts with the full state: its CRL set covers every
        revocation committed before it, and the stream carries each one after. So the stream's first
        revocation is the new baseline, not a gap from the last one seen before the outage (those in between
        are in the CRL set), and a sequence lower than before (a database restored from a backup) still has
        its gaps noticed."""
        self.seq = 0

    def note_revocation(self, seq: int, serials: Iterable[str]) -> bool:
        """Apply a pushed revocation; True if revocations were missed on this stream (fetch the CRL)."""
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
        if self.held:
            safefs.atomic_write(self.output_dir / "crl.pem", _crl_pem(self.held), 0o644)


def _crl_pem(held: Mapping[str, crl.Accepted]) -> bytes:
    """Every CRL in PEM, one after another, in a stable order: what openssl -CRLfile and nginx ssl_crl read."""
    return crl.pem_all(a.crl for _, a in sorted(held.items()))

