"""The device's private state: one folder ($CVCONVERT_STATE_DIR, else ~/.local/state/cvconvert; mode 0700,
files 0600), one generation number, and the journal of requests whose answer is not recorded yet.

    STATE/state.json            generation G; per guard file the generation it was last written at; per
                                fool pool a copy of its ledger; the pending requests (the journal's index)
    STATE/guard.npz             the query guard, one for every model version (written with its generation)
    STATE/journal/<id>.npz      one request: the x sent, its secret keys, the guard keys of its images and
                                fools, the pool indices of its fools (0600: the keys never leave this folder)

Why a generation: the device must never send an image again with a fresh key or fool, and it only knows what
it sent from these files. A part that is missing or older than state.json says (a guard deleted, a pool folder
restored from a backup, a ledger rolled back) would make it send again, so it is refused in one line. Parts
are written before state.json and may be *ahead* of it after a crash (a ledger with more fools used, a guard
with more entries): that is safe and accepted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import uuid
from pathlib import Path

import numpy as np

from ..errors import CvError
from .artifacts import atomic_write, locked

STATE_ENV = "CVCONVERT_STATE_DIR"
STATE_FILE = "state.json"
JOURNAL_DIR = "journal"
STATE_FORMAT = "cvconvert-device-state"
NO_RESEND = "cvconvert refuses to send rather than risk sending an image again"


def state_dir() -> Path:
    """The device's private folder ($CVCONVERT_STATE_DIR, else ~/.local/state/cvconvert)."""
    root = os.environ.get(STATE_ENV) or os.path.join(os.path.expanduser("~"), ".local", "state", "cvconvert")
    return Path(root)


GUARD_FILE = "guard.npz"


def guard_path(features_sha256: str | None = None, root: Path | None = None) -> Path:
    """The device's one guard index, inside the state folder: shared by every pool and model version (issue
    19: the cloud's memory spans model versions, so the device's must too); the argument is kept for callers."""
    return Path(root or state_dir()) / GUARD_FILE


def disk_error(path, exc: OSError, what: str = "write") -> CvError:
    """A one-line CvError for an OSError on a state file: names the file and says what to do."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full: free some space and run the command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (read-only?): make it writable by this user (chmod u+w) and run the command again"
    else:
        why = f"{exc.strerror or 'I/O error'}: fix the file system and run the command again"
    return CvError(f"cannot {what} {path}: {why}")


def pack_bits(ledger: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(ledger, np.uint8))).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n]


class DeviceState:
    """The state folder: `transaction()` locks it and yields the loaded state.json, `save` commits a new
    generation, `journal_*` read and write the request files."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else state_dir()
        self.file = self.root / STATE_FILE
        self.journal = self.root / JOURNAL_DIR
        try:
            for d in (self.root, self.journal):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                if d.stat().st_mode & 0o077:
                    os.chmod(d, 0o700)
        except OSError as exc:
            raise disk_error(self.root, exc, "create the device state folder") from None

    # -- state.json ------------------------------------------------------------------------------------
    def load(self) -> dict:
        """state.json, or a new state when there is none (and no journal or guard says there should be)."""
        if not self.file.exists():
            leftovers = sorted(p.name for p in self.root.glob("guard*.npz")) + sorted(
                p.name for p in self.journal.glob("*.npz"))
            if leftovers:
                raise CvError(f"the device state {self.file} is missing although {self.root} holds {leftovers[0]}: "
                              f"restore state.json from where it went; {NO_RESEND}")
            return {"format": STATE_FORMAT, "id": uuid.uuid4().hex, "generation": 0, "guards": {}, "pools": {},
                    "pending": {}}
        try:
            state = json.loads(self.file.read_text())
            ok = state.get("format") == STATE_FORMAT and isinstance(state.get("generation"), int)
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise CvError(f"the device state {self.file} is damaged or unreadable: restore it from a backup taken "
                          f"after the last request; {NO_RESEND}")
        for key in ("guards", "pools", "pending"):
            state.setdefault(key, {})
        return state

    def save(self, state: dict) -> None:
        """Commit: state.json with the next generation (call after every part it describes is written)."""
        state["generation"] = int(state["generation"]) + 1

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        try:
            atomic_write(self.file, write, mode=0o600)
        except OSError as exc:
            state["generation"] -= 1
            raise disk_error(self.file, exc) from None

    @contextlib.contextmanager
    def transaction(self):
        """Hold the state folder's lock and yield state.json (loaded). Parts written inside carry
        `state['generation'] + 1`; call `save(state)` to commit them."""
        try:
            lock = locked(self.root, ".lock")
            lock.__enter__()
        except OSError as exc:
            raise disk_error(self.root / ".lock", exc, "lock") from None
        try:
            yield self.load()
        finally:
            lock.__exit__(None, None, None)

    # -- the journal -----------------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    def entry_path(self, rid: str) -> Path:
        return self.journal / f"{rid}.npz"

    def write_entry(self, rid: str, **arrays) -> None:
        """Write (or rewrite) journal entry `rid` atomically, 0600."""
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
        try:
            atomic_write(self.entry_path(rid), write, mode=0o600)
        except OSError as exc:
            raise disk_error(self.entry_path(rid), exc) from None

    def read_entry(self, rid: str) -> dict:
        path = self.entry_path(rid)
        if not path.is_file():
            raise CvError(f"the journal entry {path} of a pending request is missing: restore it (it holds the "
                          f"request's x and key, the only safe way to ask again); {NO_RESEND}")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, EOFError):
            raise CvError(f"the journal entry {path} is damaged: restore it, or give its images up with "
                          f"`cvconvert fools resolve --abandon`; {NO_RESEND}") from None
        except Exception:  # zipfile.BadZipFile and friends: a damaged file, whatever numpy raises
            raise CvError(f"the journal entry {path} is damaged: restore it, or give its images up with "
                          f"`cvconvert fools resolve --abandon`; {NO_RESEND}") from None

    def delete_entry(self, rid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.entry_path(rid))

    def stray_entries(self, state: dict) -> list[str]:
        """Journal files state.json does not list (a crash before the commit, or after the final delete)."""
        return sorted(p.stem for p in self.journal.glob("*.npz") if p.stem not in state["pending"])


def check_pool(state: dict, pool_id: str, ledger_path: Path, ledger: np.ndarray, released=()) -> None:
    """Refuse a pool ledger that lacks a fool state.json records as used (the pool rolled back or restored),
    apart from `released` (fools a release in progress gives back)."""
    rec = state["pools"].get(pool_id)
    if rec is None:
        return
    used = unpack_bits(rec["ledger"], int(rec["count"]))
    if len(ledger) < len(used):
        missing = int(used.sum())
    else:
        lost = (used == 1) & (ledger[:len(used)] == 0)
        lost[list(released)] = False
        missing = int(lost.sum())
    if missing:
        raise CvError(f"the fool pool's ledger {ledger_path} marks {missing} fool(s) unused that this device has "
                      "already sent (the pool was restored from a backup or rolled back): put the newer pool "
                      f"back, or create a new pool; {NO_RESEND}")
