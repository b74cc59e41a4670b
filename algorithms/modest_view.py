"""MoDeST's membership view and its deterministic samples.

Every MoDeST node keeps a *view* of the population: for each member, where it listens, the
last round in which someone heard from it (``last_active``), and its latest membership
announcement (an ``index`` it increments itself, and JOIN or LEAVE). Views travel with every
model transfer and merge by "highest wins", so they converge without a membership protocol of
their own. From the view, each node derives the sample of round ``r`` with no messages at
all: the active members ordered by ``MD5(node id ‖ "-" ‖ r)``. Two nodes with the same view
compute the same order, which is what makes the samples *mostly consistent*.

Three choices beyond the reference code (de Vos et al., devos50/decentralized-learning,
``accdfl/dfl``), each because the spec asks for it or the reference misbehaves:

* merging a newer announcement keeps ``last_active`` (the reference overwrote it with the
  announcement index, spec A.3);
* a member whose pings went unanswered is *suspected* at the suspecting node's round
  estimate; the suspicion travels in views, and the member is left out of samples until it is
  heard from in a later round (the reference only waited for ``inactivity_threshold``
  rounds, so a dead member was pinged by every sampler until then);
* node ids hash as UTF-8, the one canonical encoding (spec A.8.13).

This module is pure bookkeeping: no clock, no network, no torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from rumor.protocol.v1 import modest_pb2

JOIN = modest_pb2.MODEST_CHANGE_JOIN
LEAVE = modest_pb2.MODEST_CHANGE_LEAVE

#: No activity or suspicion recorded.
NEVER = -1

HASHES = ("md5", "sha256")


@dataclass
class Entry:
    """What a node believes about one member."""

    address: str
    last_active: int = NEVER
    index: int = 0
    change: int = JOIN
    suspected: int = NEVER

    def excluded(self) -> bool:
        """Suspected dead, and not heard from in a later round since."""
        return self.suspected != NEVER and self.suspected >= self.last_active


def rank_key(node_id: str, round: int, hash: str = "md5") -> bytes:
    """The digest that orders ``node_id`` in round ``round``: H(utf8(id) ‖ "-" ‖ decimal(r))."""
    if hash not in HASHES:
        raise ValueError(f"unknown hash {hash!r}; expected one of {HASHES}")
    return hashlib.new(hash, f"{node_id}-{round}".encode()).digest()


def ordered(candidates: Iterable[str], round: int, hash: str = "md5") -> list[str]:
    """``candidates`` sorted by their digest for ``round``, ascending; ties by id."""
    return sorted(set(candidates), key=lambda nid: (rank_key(nid, round, hash), nid))


class View:
    """One node's view of the population, with the joins it holds back."""

    def __init__(self, self_id: str, self_address: str) -> None:
        self.self_id = self_id
        self.entries: dict[str, Entry] = {self_id: Entry(self_address)}
        #: Joins received but not applied: they enter the view at this node's next send, so
        #: a newcomer never enters a sample that is being computed without it elsewhere.
        self.pending: dict[str, Entry] = {}

    # ----------------------------------------------------------------- reading
    def __contains__(self, node_id: object) -> bool:
        return node_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def me(self) -> Entry:
        return self.entries[self.self_id]

    def address_of(self, node_id: str) -> str | None:
        entry = self.entries.get(node_id) or self.pending.get(node_id)
        return None if entry is None else entry.address

    def round_estimate(self) -> int:
        """The highest round anyone in the view was last active in."""
        return max(e.last_active for e in self.entries.values())

    def members(self) -> list[str]:
        """Everyone not known to have left, sorted."""
        return sorted(nid for nid, e in self.entries.items() if e.change != LEAVE)

    def candidates(self, round: int, inactivity_threshold: int) -> list[str]:
        """Members eligible for the sample of ``round``, sorted; this node always is.

        Left out: members that announced a LEAVE, members not heard from for more than
        ``inactivity_threshold`` rounds (no filter in round 0), and suspected members.
        """
        out = []
        for nid, e in self.entries.items():
            if nid == self.self_id:
                out.append(nid)
                continue
            if e.change == LEAVE or e.excluded():
                continue
            if round > 0 and e.last_active < round - inactivity_threshold:
                continue
            out.append(nid)
        return sorted(out)

    def ordered(self, round: int, inactivity_threshold: int, hash: str = "md5") -> list[str]:
        """The candidates of ``round`` in their sample order (the nominal sample is a prefix)."""
        return ordered(self.candidates(round, inactivity_threshold), round, hash)

    # ----------------------------------------------------------------- updating
    def add(self, node_id: str, address: str) -> None:
        """Put a member known at setup into the view, with no activity recorded."""
        if node_id not in self.entries:
            self.entries[node_id] = Entry(address)

    def heard_from(self, node_id: str, round: int, address: str = "") -> None:
        """``node_id`` answered or sent something while ``round`` was current."""
        entry = self.entries.get(node_id)
        if entry is None:
            return  # unknown members enter through a view merge or a flushed join
        entry.last_active = max(entry.last_active, round)
        if entry.suspected != NEVER and entry.suspected <= round:
            entry.suspected = NEVER  # direct evidence beats an older suspicion
        if address:
            entry.address = address

    def suspect(self, node_id: str, round: int) -> None:
        """Pings to ``node_id`` went unanswered while this node's estimate was ``round``."""
        entry = self.entries.get(node_id)
        if entry is not None and node_id != self.self_id:
            entry.suspected = max(entry.suspected, round)

    def hold_join(self, node_id: str, address: str, round: int, index: int) -> None:
        """A JOIN advert: keep it until the next :meth:`flush`."""
        if node_id == self.self_id:
            return
        held = self.pending.get(node_id)
        if held is None or index >= held.index:
            self.pending[node_id] = Entry(address, round, index, JOIN)

    def apply_leave(self, node_id: str, round: int, index: int) -> None:
        """A LEAVE advert takes effect at once."""
        if node_id == self.self_id:
            return
        entry = self.entries.get(node_id)
        if entry is None:
            self.entries[node_id] = Entry("", round, index, LEAVE)
        elif index >= entry.index:
            entry.index, entry.change = index, LEAVE
            entry.last_active = max(entry.last_active, round)
        self.pending.pop(node_id, None)

    def flush(self) -> list[str]:
        """Apply the held-back joins (called right after this node sends a model)."""
        applied = []
        for nid, held in sorted(self.pending.items()):
            entry = self.entries.get(nid)
            if entry is None:
                self.entries[nid] = held
            elif held.index >= entry.index:
                entry.index, entry.change, entry.address = held.index, JOIN, held.address
                entry.last_active = max(entry.last_active, held.last_active)
                entry.suspected = NEVER
            applied.append(nid)
        self.pending.clear()
        return applied

    def merge(self, entries: Iterable[tuple[str, Entry]]) -> list[str]:
        """Merge a received view: highest activity, suspicion and announcement win.

        Entries about this node itself are ignored (it is the authority on itself). Returns
        the members that were new to this view.
        """
        new = []
        for nid, theirs in entries:
            if nid == self.self_id:
                continue
            mine = self.entries.get(nid)
            if mine is None:
                self.entries[nid] = Entry(
                    theirs.address,
                    theirs.last_active,
                    theirs.index,
                    theirs.change,
                    theirs.suspected,
                )
                new.append(nid)
                continue
            mine.last_active = max(mine.last_active, theirs.last_active)
            mine.suspected = max(mine.suspected, theirs.suspected)
            if theirs.index > mine.index:
                mine.index, mine.change = theirs.index, theirs.change
                if theirs.address:
                    mine.address = theirs.address
            elif not mine.address and theirs.address:
                mine.address = theirs.address
        return new

    # ----------------------------------------------------------------- wire form
    def to_proto(self) -> modest_pb2.ModestView:
        view = modest_pb2.ModestView()
        for nid, e in sorted(self.entries.items()):
            view.entries.add(
                node_id=nid,
                address=e.address,
                last_active=e.last_active,
                index=e.index,
                change=e.change,
                suspected=e.suspected,
            )
        return view


#: Bounds on a received view: far more members than any deployment, ids of sane length.
MAX_VIEW_ENTRIES = 100_000
MAX_ID_CHARS = 256


def entries_from_proto(view: modest_pb2.ModestView) -> list[tuple[str, Entry]]:
    """Validated entries of a received view; raises ValueError naming the first problem."""
    if len(view.entries) > MAX_VIEW_ENTRIES:
        raise ValueError(f"view of {len(view.entries)} entries exceeds {MAX_VIEW_ENTRIES}")
    out = []
    for e in view.entries:
        if not e.node_id or len(e.node_id) > MAX_ID_CHARS or len(e.address) > MAX_ID_CHARS:
            raise ValueError(f"view entry with a bad node id or address: {e.node_id[:64]!r}")
        if e.change not in (JOIN, LEAVE):
            raise ValueError(f"view entry {e.node_id!r}: unknown change {e.change}")
        if e.last_active < NEVER or e.suspected < NEVER:
            raise ValueError(f"view entry {e.node_id!r}: negative round")
        out.append(
            (e.node_id, Entry(e.address, int(e.last_active), int(e.index), e.change, e.suspected))
        )
    return out
