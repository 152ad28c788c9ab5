"""aioice's ``Connection``, adjusted for ipop: filtered host addresses, relay pairs held back,
check timings, a hook on every completed check, and no unbounded queue of non-STUN data.

Everything here that reaches into aioice's private state is collected in this module (and in
``ipop.nat.ice._turn_client``), checked against aioice 0.13:

* ``get_component_candidates`` is given ipop's filtered address list instead of every address
  of the machine, and drops server-reflexive/relayed candidates that land in an excluded network;
* ``_pair_remote_candidate`` skips our relayed candidate while ``relay_allowed`` is false (the
  direct phase), and ``pair_all_remote`` pairs it later;
* ``build_request``/``check_state`` time each check, so a pair's RTT is known when it succeeds;
* ``check_incoming`` re-sends a check at once when the peer's check arrives on a pair whose own
  check is still waiting for its retransmission timer (RFC 8445 section 7.3.1.4);
* ``check_complete`` calls ``on_check_complete`` after aioice has updated its nominated pair;
* ``data_received`` keeps at most ``EARLY_LIMIT`` non-STUN datagrams (aioice would queue every one
  for a ``recv()`` that ipop never calls);
* every socket's ``send_stun`` is paced: Binding requests (checks, retransmissions included) to
  an address that has not answered one yet get ``CHECK_BURST`` sends, then one per
  ``1/CHECK_RATE`` seconds, so a peer's candidate list cannot aim a stream of checks at a
  victim (issue 16: reflection); an address that answered is not limited.
* ``query_consent`` does nothing: the data plane's keepalives are the liveness check.

Private attributes read elsewhere: ``_protocols``, ``_nominated``, ``_check_list``,
``_remote_candidates``, ``_find_pair``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aioice import stun
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection, StunProtocol

from ipop.nat.filters import IpNetwork, address_allowed
from ipop.ratelimit import TokenBucket

log = logging.getLogger("ipop.nat")

EARLY_LIMIT = 32
CHECK_BURST = 4.0  # Binding requests to one not-yet-answering IP address, then CHECK_RATE/s
CHECK_RATE = 0.1
RETRANSMIT_GUESS = 0.45  # a check slower than this was probably retransmitted: RTT unknown


class IpopConnection(Connection):
    """An ``aioice.Connection`` for one ipop link (component 1, UDP)."""

    def __init__(
        self,
        *,
        addresses: Sequence[str],
        excluded: Sequence[IpNetwork],
        gather_timeout: int,
        on_check_complete: Callable[[], None],
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.ipop_addresses = list(addresses)
        self.ipop_excluded = tuple(excluded)
        self.ipop_gather_timeout = gather_timeout
        self.on_check_complete = on_check_complete
        self.relay_allowed = False
        self.sent_at: dict[CandidatePair, float] = {}
        self.rtt: dict[CandidatePair, float] = {}
        self.retriggered: set[CandidatePair] = set()
        self.nominating_pairs: set[CandidatePair] = set()
        self.early: collections.deque[bytes] = collections.deque(maxlen=EARLY_LIMIT)
        self.answered: set[str] = set()  # remote IPs a check of ours succeeded with
        self.check_budget: dict[str, TokenBucket] = {}
        self.checks_paced = 0  # Binding requests not sent (over an address's budget)

    # ---- gathering
    async def get_component_candidates(
        self, component: int, addresses: list[str], timeout: int = 5  # noqa: ASYNC109
    ) -> list[Candidate]:
        del addresses, timeout  # aioice's view of the machine; ours is filtered
        found = await super().get_component_candidates(
            component, list(self.ipop_addresses), timeout=self.ipop_gather_timeout
        )
        for proto in self._protocols:
            self._pace(proto)
        kept: list[Candidate] = []
        for cand in found:
            if address_allowed(cand.host, self.ipop_excluded):
                kept.append(cand)
                continue
            log.info("dropped local %s candidate %s: excluded network", cand.type, cand.host)
            for proto in [p for p in self._protocols if p.local_candidate is cand]:
                self._protocols.remove(proto)
                await proto.close()
        return kept

    # ---- pairing
    def _pair_remote_candidate(self, remote_candidate: Candidate) -> None:
        if self.relay_allowed:
            super()._pair_remote_candidate(remote_candidate)
            return
        saved = self._protocols
        self._protocols = [p for p in saved if p.local_candidate.type != "relay"]
        try:
            super()._pair_remote_candidate(remote_candidate)
        finally:
            self._protocols = saved

    def pair_all_remote(self) -> None:
        """Allow our relayed candidate and pair it with every remote candidate known so far."""
        self.relay_allowed = True
        for remote in list(self._remote_candidates):
            self._pair_remote_candidate(remote)
        self.sort_check_list()

    # ---- triggered checks on pairs in progress (RFC 8445 section 7.3.1.4)
    def check_incoming(
        self, message: stun.Message, addr: tuple[str, int], protocol: StunProtocol
    ) -> None:
        """A check from the peer on a pair whose own check is still retransmitting proves the
        path works now (typically: our first check died in the peer's NAT before its hole was
        punched).  aioice waits for the retransmission timer (0.5 s, 1.5 s, ...); send at once,
        once per pair, unless the check in flight is our nomination.  An authenticated check
        (aioice verified its integrity) also proves ``addr`` is the peer's: it is not paced."""
        self.answered.add(addr[0])
        super().check_incoming(message, addr, protocol)
        if self._closing:
            return
        for pair in self._check_list:
            if pair.protocol is protocol and pair.remote_addr == (addr[0], addr[1]):
                break
        else:
            return
        if pair.state != CandidatePair.State.IN_PROGRESS:
            return  # aioice handles Frozen/Failed (triggered check) and Succeeded itself
        task = pair.task
        # connect() cancels the checks still running when ICE completes and leaves them
        # In-Progress: such a stale pair would ignore every later check, so always restart it.
        stale = task is None or task.done()
        if not stale and (pair in self.retriggered or pair in self.nominating_pairs):
            return
        self.retriggered.add(pair)
        pair.task = None
        if task is not None:
            task.cancel()
        super().check_state(pair, CandidatePair.State.WAITING)
        self.check_start_task(pair)

    # ---- timing and hooks
    def build_request(self, pair: CandidatePair, nominate: bool) -> stun.Message:
        self.sent_at[pair] = time.monotonic()
        if nominate:
            self.nominating_pairs.add(pair)
        return super().build_request(pair, nominate)

    def _pace(self, proto: StunProtocol) -> None:
        """Route ``proto``'s STUN sends through the per-address check budget (once)."""
        send = proto.send_stun
        if getattr(send, "ipop_paced", False):
            return

        def paced(message: stun.Message, addr: tuple[str, int]) -> None:
            if (message.message_method == stun.Method.BINDING
                    and message.message_class == stun.Class.REQUEST
                    and addr[0] not in self.answered):
                bucket = self.check_budget.get(addr[0])
                if bucket is None:
                    bucket = self.check_budget[addr[0]] = TokenBucket(CHECK_RATE, CHECK_BURST)
                if not bucket.take(time.monotonic()):
                    self.checks_paced += 1
                    return
            send(message, addr)

        paced.ipop_paced = True  # type: ignore[attr-defined]
        proto.send_stun = paced  # type: ignore[method-assign]

    def check_state(self, pair: CandidatePair, state: CandidatePair.State) -> None:
        if state == CandidatePair.State.SUCCEEDED:
            self.answered.add(pair.remote_addr[0])
            self.note_success(pair)
        super().check_state(pair, state)

    def note_success(self, pair: CandidatePair) -> None:
        self.answered.add(pair.remote_addr[0])
        sent = self.sent_at.pop(pair, None)
        if sent is not None:
            took = time.monotonic() - sent
            if took < RETRANSMIT_GUESS:
                self.rtt[pair] = took

    def check_complete(self, pair: CandidatePair) -> None:
        super().check_complete(pair)
        try:
            self.on_check_complete()
        except Exception:  # a bug in the hook must not break aioice's check machinery
            log.exception("ICE check-complete hook failed")

    def data_received(self, data: bytes, component: int) -> None:
        self.early.append(data)

    async def query_consent(self) -> None:
        """No consent freshness checks (RFC 7675) from aioice.  Once the data plane carries the
        link, its authenticated keepalives are the link's liveness, and they follow the path
        the data plane proved: after a NAT rebinding the link moves to the new mapping, while
        aioice kept checking the old pair and closed the connection some 30 s later, tearing a
        working link down.  A relayed path is watched by ``IceLink``'s relay probe instead."""
        return

    # ---- read access to private state, in one place
    @property
    def protocols(self) -> list[StunProtocol]:
        return list(self._protocols)

    @property
    def nominated(self) -> CandidatePair | None:
        return self._nominated.get(1)

    def set_nominated(self, pair: CandidatePair) -> None:
        """Make ``pair`` the selected pair (consent checks follow it)."""
        pair.nominated = True
        if pair.state != CandidatePair.State.SUCCEEDED:
            super().check_state(pair, CandidatePair.State.SUCCEEDED)
        self._nominated[pair.component] = pair

    def remote_candidate_list(self) -> list[Candidate]:
        return list(self._remote_candidates)

    def find_or_make_pair(self, protocol: StunProtocol, remote: Candidate) -> CandidatePair:
        pair = self._find_pair(protocol, remote)
        if pair is None:
            pair = CandidatePair(protocol, remote)
            self._check_list.append(pair)
        return pair
