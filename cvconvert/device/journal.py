"""The journal of requests: what the device reserved and sent, kept until the answer is recorded.

A request goes through four steps, each a transaction on the device state (cvconvert.device.state):

1. reserve: the guard records the images and fools to send (no logits yet), the pool marks the fools
   used, the journal entry keeps the x about to be sent and its secret keys; then state.json commits.
2. send (outside any lock).
3. a failure that proves nothing left the device (`release`): fools back to the pool, the images removed
   from the guard, the entry deleted, as if the request never happened. Any other failure keeps the entry:
   a retry sends the identical x and decodes with the stored key (the same x tells the cloud nothing new),
   never a fresh key or fool.
4. an answer (`commit`): the logits go into the guard's cache, the entry is deleted.

A crash anywhere leaves parts written *ahead* of state.json; `_recover` finishes or undoes what the crash
interrupted the next time the state is opened, and refuses a part that is missing or rolled back.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from ..errors import CvError
from .state import NO_RESEND, DeviceState, check_pool, pack_bits

ANSWERED_TOO = "its answer was recorded meanwhile"


class Journal:
    """Requests of one model (its guard, its pool) in one device state folder."""

    def __init__(self, state: DeviceState, guard, pool=None, model: str = ""):
        self.state, self.guard, self.pool, self.model = state, guard, pool, model[:16]
        self.entries: dict[str, dict] = {}  # rid -> entry, this model's listed entries (loaded by transaction)

    # -- the transaction and recovery -----------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self):
        """The state locked, checked and recovered; parts written inside carry the next generation."""
        with self.state.transaction() as st:
            self.guard.stamp = st["generation"] + 1
            if self._recover(st):
                self._save(st)
                self.guard.stamp = st["generation"] + 1
            yield st

    def _mine(self, st: dict) -> list[str]:
        return [rid for rid, rec in st["pending"].items() if rec.get("model") == self.model]

    def _recover(self, st: dict) -> bool:
        """Refuse missing or rolled-back parts; finish what a crash interrupted. True when st changed."""
        self._check_guard(st)
        self.entries = {rid: self.state.read_entry(rid) for rid in self._mine(st)}
        released = [int(i) for e in self.entries.values() if e.get("released", 0) for i in e.get("fools", [])]
        if self.pool is not None:
            ledger = self.pool._ledger()
            check_pool(st, self.pool.pool_id, self.pool.path / "ledger.npy", ledger, released)
            self._check_known_pool(st, ledger)
        # a pool seen for the first time is recorded before any fool is taken from it, so that a crash
        # after the ledger's write never reads as a pool the state has no record of
        changed = self.pool is not None and self.pool.pool_id not in st["pools"]
        answered = self._answered() if self.entries else set()
        for rid, entry in list(self.entries.items()):
            if entry.get("released", 0):
                self._undo(st, rid, entry)
                changed = True
            elif not entry.get("abandoned", 0) and all(int(s) in answered for s in entry["seq"]):
                st["pending"].pop(rid)  # answered, but the crash came before the entry was deleted
                self.entries.pop(rid)
                changed = True
        for rid in self.state.stray_entries(st):
            entry = self.state.read_entry(rid)
            if str(entry.get("model", "")) != self.model:
                continue
            if int(entry["generation"]) > st["generation"]:  # reserved, never committed: never sent
                self._undo(st, rid, entry)
            else:
                self.state.delete_entry(rid)  # committed as answered; only the file's removal was lost
            changed = True
        return self._forget_orphans(st) or changed

    def _check_guard(self, st: dict) -> None:
        name = self.guard.path.name if self.guard.path is not None else None
        rec = st["guards"].get(name) if name else None
        if rec is None:
            return
        got = self.guard.stored_generation()
        if got is None:
            raise CvError(f"the guard index {self.guard.path} is missing (deleted or moved?): it is this device's "
                          "memory of what it has sent; put it back (or restore it from a backup taken after the "
                          f"last request); {NO_RESEND}")
        if got < int(rec):
            raise CvError(f"the guard index {self.guard.path} is older than the device state (restored from a "
                          f"backup, or rolled back): put the newer file back; {NO_RESEND}")

    def _check_known_pool(self, st: dict, ledger) -> None:
        """A pool with used fools that the state has never seen, and no guard: the state folder was lost."""
        if self.pool.pool_id in st["pools"] or not ledger.any() or self.guard.stored_generation() is not None:
            return
        legacy = self.pool.path / "guard.npz"
        hint = (f"an older cvconvert kept the guard in {legacy}: move it to {self.guard.path}" if legacy.is_file()
                else f"restore the state folder {self.state.root} from where it went")
        raise CvError(f"the fool pool {self.pool.path} has {int(ledger.sum())} used fool(s) but the device state "
                      f"{self.state.root} has no record of it (deleted or replaced?), so this device no longer knows "
                      f"which images it has sent: {hint}; {NO_RESEND}")

    def _answered(self) -> set:
        """Index keys of images whose answer the guard has recorded."""
        state = self.guard._load() if self.guard.path is not None else None
        if state is None or not len(state["seq"]) or not state["logits"].shape[1]:
            return set()
        ok = ~np.isnan(state["logits"]).any(1)
        return {int(s) for s in state["seq"][ok]}

    def _forget_orphans(self, st: dict) -> bool:
        """Guard reservations written after the last commit that no entry holds: never sent, drop them."""
        got = self.guard.stored_generation()
        if got is None or got <= st["generation"]:
            return False
        # every model's pending entries hold their guard keys (the guard is one per device, the entries
        # loaded here are this model's only)
        held = {int(s) for rid in st["pending"] for s in self._entry(rid)["seq"]}
        orphans = self.guard.pending_keys() - held
        self.guard.forget(orphans)
        return bool(orphans)

    def _entry(self, rid: str) -> dict:
        return self.entries[rid] if rid in self.entries else self.state.read_entry(rid)

    def _undo(self, st: dict, rid: str, entry: dict) -> None:
        """Release a reservation that never left the device (idempotent: a crash may repeat it)."""
        self.guard.forget(list(entry["seq"]) + list(entry.get("fool_keys", [])))
        if self.pool is not None and len(entry.get("fools", [])):
            self.pool.release(entry["fools"])
        st["pending"].pop(rid, None)
        self.entries.pop(rid, None)
        self._note_parts(st)
        self.state.delete_entry(rid)

    def _note_parts(self, st: dict) -> None:
        """Record in st the generation the guard is written at and the pool's ledger."""
        written = self.guard.stored_generation()  # what is on disk (a transaction may not have written it)
        if written is not None:
            st["guards"][self.guard.path.name] = written
        if self.pool is not None:
            ledger = self.pool._ledger()
            st["pools"][self.pool.pool_id] = {"ledger": pack_bits(ledger), "count": int(len(ledger)),
                                              "path": str(self.pool.path.resolve())}

    def _save(self, st: dict) -> None:
        self._note_parts(st)
        self.state.save(st)

    # -- the steps of a request ------------------------------------------------------------------------
    def lookup(self, seq: int):
        """(rid, entry, row) of the pending image with guard key `seq`, or None."""
        for rid, entry in self.entries.items():
            rows = np.flatnonzero(entry["seq"] == seq)
            if len(rows):
                return rid, entry, int(rows[0])
        return None

    def record(self, st: dict, x, key, seq, fool_keys, fools, names) -> str:
        """Step 1's end: the entry of a reservation, then the commit. Call inside `transaction`."""
        rid = self.state.new_id()
        self.state.write_entry(rid, x=np.asarray(x, np.float32), key=np.asarray(key, np.float32),
                               seq=np.asarray(seq, np.int64), fool_keys=np.asarray(fool_keys, np.int64),
                               fools=np.asarray(fools, np.int64), names=np.asarray(names, dtype=str),
                               generation=np.int64(st["generation"] + 1), model=np.asarray(self.model))
        st["pending"][rid] = {"model": self.model, "images": int(len(seq)), "created": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pool": self.pool.pool_id if self.pool is not None else None}
        self._save(st)
        self.entries[rid] = self.state.read_entry(rid)
        return rid

    def release(self, rid: str) -> None:
        """Step 3, nothing sent: give everything back. The entry is first marked, so a crash half-way
        is finished by the next `_recover` rather than leaving the images blocked."""
        with self.transaction() as st:
            entry = self.entries.get(rid)
            if entry is None:
                return
            self.state.write_entry(rid, **{**entry, "released": np.int64(1)})
            self._undo(st, rid, entry)
            self._save(st)

    def commit(self, answers: dict) -> None:
        """Step 4: answers {guard key: logits row} into the guard's cache, then the answered rows leave
        their entries. CvError (disk full, ...) leaves the entries in place: a retry asks again."""
        with self.transaction() as st:
            seqs = np.array(sorted(answers), np.int64)
            self.guard.store_logits(seqs, np.stack([answers[int(s)] for s in seqs]))
            done = []
            for rid, entry in list(self.entries.items()):
                if entry.get("abandoned", 0):
                    continue
                left = ~np.isin(entry["seq"], seqs)
                if not left.any():
                    done.append(rid)
                    st["pending"].pop(rid, None)
                elif not left.all():
                    keep = {k: (v[left] if k in ("x", "key", "seq", "names") else v) for k, v in entry.items()}
                    self.state.write_entry(rid, **keep)
                    st["pending"][rid]["images"] = int(left.sum())
            self._save(st)
            for rid in done:
                self.entries.pop(rid, None)
                self.state.delete_entry(rid)

    def abandon(self, rid: str) -> None:
        """Give a pending request up: its x and key are deleted, its images stay blocked for good."""
        with self.transaction() as st:
            entry = self.entries.get(rid)
            if entry is None:
                raise CvError(f"no pending request {rid!r} (see `cvconvert fools status`)")
            keep = {k: v for k, v in entry.items() if k not in ("x", "key")}
            self.state.write_entry(rid, **keep, abandoned=np.int64(1))
            st["pending"][rid]["abandoned"] = True
            self._save(st)

    def pending(self) -> list[dict]:
        """This model's pending requests (after recovery): id, images, names, abandoned."""
        with self.transaction() as st:
            return [{"id": rid, **st["pending"][rid], "names": [str(n) for n in e.get("names", [])],
                     "abandoned": bool(e.get("abandoned", 0))} for rid, e in self.entries.items()]


class NoJournal:
    """No device state (an in-memory guard, a library caller's test): the same steps, nothing on disk."""

    entries: dict = {}

    def __init__(self, guard):
        self.guard = guard

    @contextlib.contextmanager
    def transaction(self):
        yield {}

    def lookup(self, seq: int):
        return None

    def record(self, st, x, key, seq, fool_keys, fools, names) -> str:
        self._keys = list(seq) + list(fool_keys)
        return "memory"

    def release(self, rid: str) -> None:
        self.guard.forget(getattr(self, "_keys", []))

    def commit(self, answers: dict) -> None:
        seqs = np.array(sorted(answers), np.int64)
        self.guard.store_logits(seqs, np.stack([answers[int(s)] for s in seqs]))

    def pending(self) -> list[dict]:
        return []
