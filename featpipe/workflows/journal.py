"""Reviewers' decisions on disk: an append-only journal of JSON lines, one per decision, each flushed and
fsynced before the caller acknowledges it.

Every decision carries an id its client made up, and an id already in the journal is not written again: a
retried request (the answer was lost, the tab reloaded, the button pressed twice) is recorded once. A file lock
(`<journal>.lock`, the `filelock` package; the operating system drops it when its holder dies) serialises the
writers, two tabs or two processes on one file, and each writer reads what the others appended before it
checks an id. A line a killed writer left half-written was never acknowledged: it is cut off before the next
append, and skipped by readers.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from filelock import FileLock

from ..errors import UserError
from ..files import fsync_folder

DECISION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


class DecisionJournal:
    """`<path>`: decisions in the order they were recorded, shared by every process that opens it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: list[dict] = []
        self._ids: dict[str, dict] = {}
        self._offset = 0  # bytes of the file already read into `entries`
        self._threads = threading.Lock()  # the file lock serialises processes; this, the threads of one
        self._file_lock = FileLock(str(self.path) + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._threads, self._file_lock:
            self._cut_torn_tail()
            self._read_new()

    def refresh(self) -> list[dict]:
        """The entries other processes appended since the last look (also kept in `entries`)."""
        with self._threads, self._file_lock:
            return self._read_new()

    def append(self, entry: dict) -> tuple[dict, list[dict]]:
        """Write `entry` (a dict with a client-made 'id') durably unless its id is already recorded.
        Returns (the recorded entry: `entry`, or the earlier one with that id; the entries new to this reader,
        others' and this one's, in file order)."""
        decision_id = str(entry.get("id", ""))
        if not DECISION_ID.fullmatch(decision_id):
            raise UserError(f"decision id {decision_id!r}: use 1 to 100 letters, digits or _.:- (one per decision, "
                            "made by the client, the same when it retries)")
        with self._threads, self._file_lock:
            self._cut_torn_tail()
            new = self._read_new()
            if decision_id in self._ids:
                return self._ids[decision_id], new
            line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            created = not self.path.exists()
            with open(self.path, "ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            if created:  # the new file's name, too, must survive a power cut
                fsync_folder(self.path.parent)
            self._offset += len(line)
            self._add(entry)
            return entry, [*new, entry]

    def _cut_torn_tail(self) -> None:
        """Drop a last line without its newline: a writer died in the middle of it, before acknowledging it."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            keep = fh.read().rfind(b"\n") + 1
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        self._offset = min(self._offset, keep)

    def _read_new(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data[:data.rfind(b"\n") + 1]
        new = []
        for n, raw in enumerate(complete.splitlines(), start=1):
            try:
                entry = json.loads(raw)
            except ValueError:
                raise UserError(f"{self.path}: a damaged line after byte {self._offset} (line {n} of what was new); "
                                "fix or delete that line") from None
            if str(entry.get("id")) not in self._ids:
                self._add(entry)
                new.append(entry)
        self._offset += len(complete)
        return new

    def _add(self, entry: dict) -> None:
        self.entries.append(entry)
        self._ids[str(entry["id"])] = entry

