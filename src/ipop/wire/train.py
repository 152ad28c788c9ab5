"""Whole-train frames: one TSO super-packet, sealed at most once, cut into chunks that only
make sense together; their reassembly; and the rule for when a link may send them.

A train carries the blob ``virtio_net_hdr (10) + super-packet`` (plain, type 0x86) or that
blob sealed with the link's AEAD in one call (type 0x87; AAD = the 41-byte frame header).
Every datagram of a train looks like this::

     0        1          21         41                 45       46       47
    +--------+----------+----------+-----------------+--------+--------+-----------
    |  type  | src UID  | dst UID  |  train seq u32  |  idx   | count  | chunk ...
    +--------+----------+----------+-----------------+--------+--------+-----------

All chunks but the last have the same length, so a train goes out as one UDP GSO send and
usually comes back as one UDP GRO read.  The receiver joins the chunks (opens the blob once,
if sealed) and writes the super-packet with its ``virtio_net_hdr`` in one TUN write: one AEAD
call and one write per 64 KB instead of one per 1.3 KB segment.

The price is loss amplification: losing one datagram loses the train.  So trains are used only
while a link shows (almost) no loss (the issue's "adapt" option): the receiver reports trains it
could not complete (keepalive op ``TRAIN_LOSS``), and when they are more than a few percent of
the trains sent, the sender sends standalone segments (``ipop.dataplane.segment``), whose
datagrams each stand alone, for a hold-off that doubles while losses keep coming
(:class:`TrainPolicy`).

Vector (train 7, datagram 2 of 5)::

    86 | 20 bytes src | 20 bytes dst | 00 00 00 07 02 05 | chunk
"""

from __future__ import annotations

import struct
import time

from ipop.errors import LocalProtocolError, MalformedFrame
from ipop.wire import header as wh
from ipop.wire.vnet import (
    CSUM_OFFSET_TCP,
    CSUM_OFFSET_UDP,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET,
    VNET_HDR_LEN,
)
from ipop.wire.vnet import parse as vnet_parse

Buf = bytes | bytearray | memoryview

TRAIN = struct.Struct("!IBB")
TRAIN_LEN = TRAIN.size  # 6
FRAME_HDR = wh.HEADER_LEN + TRAIN_LEN  # 47: what precedes every chunk
MAX_COUNT = 64  # UDP GSO sends at most 64 segments
_FRAME_FIELDS = f"{wh.HEADER_LEN}s{TRAIN.format.lstrip('!')}"  # frame header, seq, idx, count


def parse(dgram: Buf) -> tuple[int, int, int]:
    """(seq, idx, count) of one train datagram (its frame header already checked).

    Raises ``MalformedFrame`` (reason ``truncated`` or ``bad_train``) and nothing else.
    """
    if len(dgram) < FRAME_HDR:
        raise MalformedFrame("train datagram shorter than its header", reason="truncated")
    seq, idx, count = TRAIN.unpack_from(dgram, wh.HEADER_LEN)
    if count == 0 or count > MAX_COUNT or idx >= count:
        raise MalformedFrame(f"train chunk {idx} of {count}", reason="bad_train")
    return seq, idx, count


class Framer:
    """Makes one link's trains (the sending thread only), packing the frame headers in one call
    into a buffer kept per train length.  The views it returns are valid until the next train of the
    same length (the send has copied them by then)."""

    def __init__(self, prefix: bytes, chunk: int) -> None:
        self.prefix = prefix
        self.chunk = chunk
        self._layouts: dict[int, tuple[bytearray, struct.Struct, list[object], list[memoryview],
                                       list[slice]]] = {}

    def frames(self, seq: int, blob: Buf) -> list[Buf]:
        """The buffers of train ``seq`` carrying ``blob``, two per datagram (frame header,
        chunk view), ready for a GSO send.  Raises ``LocalProtocolError`` (reason
        ``train_too_long``) if ``blob`` needs more than 64 chunks."""
        view = memoryview(blob)
        size = len(view)
        chunk = self.chunk
        count = -(-size // chunk) if size else 1
        if count > MAX_COUNT:
            raise LocalProtocolError(f"{size} bytes need {count} chunks", reason="train_too_long")
        layout = self._layouts.get(count)
        if layout is None:
            layout = self._layouts[count] = self._layout(count)
        buf, packer, args, heads, cuts = layout
        args[1::4] = [seq & 0xFFFF_FFFF] * count
        packer.pack_into(buf, 0, *args)
        parts: list[Buf] = [view] * (2 * count)
        parts[0::2] = heads
        parts[1::2] = [view[c] for c in cuts]
        return parts

    def _layout(self, count: int) -> tuple[bytearray, struct.Struct, list[object],
                                           list[memoryview], list[slice]]:
        packer = struct.Struct("!" + _FRAME_FIELDS * count)
        buf = bytearray(packer.size)
        args: list[object] = []
        for i in range(count):
            args += [self.prefix, 0, i, count]
        mv = memoryview(buf)
        heads = [mv[i * FRAME_HDR : (i + 1) * FRAME_HDR] for i in range(count)]
        cuts = [slice(i * self.chunk, (i + 1) * self.chunk) for i in range(count)]
        return buf, packer, args, heads, cuts


_GRO_LAYOUTS: dict[tuple[int, int], tuple[struct.Struct, tuple[int, ...], list[slice]]] = {}


def _gro_layout(gso: int, count: int) -> tuple[struct.Struct, tuple[int, ...], list[slice]]:
    key = (gso, count)
    layout = _GRO_LAYOUTS.get(key)
    if layout is None:
        if len(_GRO_LAYOUTS) >= 512:
            _GRO_LAYOUTS.clear()
        one = f"{_FRAME_FIELDS}{gso - FRAME_HDR}x"
        packer = struct.Struct("!" + one * (count - 1) + _FRAME_FIELDS)
        cuts = [slice(i * gso + FRAME_HDR, (i + 1) * gso) for i in range(count - 1)]
        layout = _GRO_LAYOUTS[key] = (packer, tuple(range(count)), cuts)
    return layout


def whole(area: memoryview, n: int, gso: int, prefix: bytes) -> tuple[int, list[memoryview]] | None:
    """The seq and chunks of one complete train that exactly fills a GRO read of ``n`` bytes cut
    every ``gso`` bytes, every datagram starting with ``prefix``; None if the read is anything
    else (part of a train, several trains, other frames): the caller then goes datagram by
    datagram.  The chunks are views into ``area``."""
    if gso <= FRAME_HDR or n <= FRAME_HDR or n > len(area):
        return None
    count = -(-n // gso)
    if count > MAX_COUNT or n - (count - 1) * gso <= FRAME_HDR:
        return None
    packer, idxs, cuts = _gro_layout(gso, count)
    fields = packer.unpack_from(area)
    seq = fields[1]
    if (fields[3] != count or fields[2::4] != idxs or fields[0::4].count(prefix) != count
            or fields[1::4].count(seq) != count or fields[3::4].count(count) != count):
        return None
    chunks = [area[c] for c in cuts]
    chunks.append(area[(count - 1) * gso + FRAME_HDR : n])
    return seq, chunks


def check_vnet(head: Buf, size: int) -> bytes:
    """The ``virtio_net_hdr`` to write in front of a super-packet a train delivered: the
    train's own, checked, with ``hdr_len`` set right (a TUN read leaves the skb's linear length
    there, which writers must not pass on).  ``head`` holds the start of the blob (at least the
    vnet, IP and TCP headers, or all of it), ``size`` is the blob's length.

    Only what ipop sends in trains passes: a TCP super-packet (or one packet) whose partial
    checksum lies inside the packet.  Raises ``MalformedFrame`` (reason ``bad_vnet``).
    """
    if size < VNET_HDR_LEN + 40 or len(head) < VNET_HDR_LEN + 40:
        raise MalformedFrame("train shorter than a TCP/IP packet", reason="bad_vnet")
    vh = vnet_parse(head)
    pkt_len = size - VNET_HDR_LEN
    gso = vh.gso_type & ~GSO_ECN
    if vh.flags & ~F_NEEDS_CSUM or gso not in (GSO_NONE, GSO_TCPV4, GSO_TCPV6):
        raise MalformedFrame(f"vnet flags {vh.flags} type {vh.gso_type}", reason="bad_vnet")
    ver = head[VNET_HDR_LEN] >> 4
    if ver not in (4, 6):
        raise MalformedFrame("not IP", reason="bad_vnet")
    hdr_len = 0
    if vh.flags & F_NEEDS_CSUM:
        start, offset = vh.csum_start, vh.csum_offset
        if (start < 20 or offset not in (CSUM_OFFSET_UDP, CSUM_OFFSET_TCP)
                or start + offset + 2 > pkt_len):
            raise MalformedFrame("checksum outside the packet", reason="bad_vnet")
        if gso != GSO_NONE:
            if offset != CSUM_OFFSET_TCP or vh.gso_size < 64 or (ver == 4) != (gso == GSO_TCPV4):
                raise MalformedFrame("bad TSO header", reason="bad_vnet")
            if len(head) < VNET_HDR_LEN + start + 20:
                raise MalformedFrame("headers not in the first chunk", reason="bad_vnet")
            hdr_len = start + (head[VNET_HDR_LEN + start + 12] >> 4) * 4
            if hdr_len < start + 20 or hdr_len > pkt_len:
                raise MalformedFrame("bad TCP header length", reason="bad_vnet")
    elif gso != GSO_NONE:
        raise MalformedFrame("TSO without a partial checksum", reason="bad_vnet")
    return VNET.pack(vh.flags, vh.gso_type, hdr_len, vh.gso_size if gso != GSO_NONE else 0,
                     vh.csum_start, vh.csum_offset)


class Reassembler:
    """One link's trains as they arrive (the receiving thread): puts together a train whose
    datagrams came one by one, and counts trains lost, whether one of their datagrams is
    missing (a train left incomplete when the next begins) or all of them (a gap in the train
    numbers)."""

    STALE = 1.0  # a train missing since longer than this was left over, not lost just now
    MAX_GAP = 64  # a larger jump in train numbers is reordering or a restart, not loss
    WINDOW = 1024  # trains after the last confirmed one that a new chunk may start

    def __init__(self) -> None:
        self.cur = -1  # the train being put together, or -1
        self.parts: list[bytes | None] = []
        self.have = 0
        self.last_seq = -1  # the newest train seen
        self.last_at = 0.0
        self.done_seq = -1
        self.lost = 0  # trains lost recently enough to count as loss
        self.stale = 0
        # Forgery bound (issue 16).  The inbound path admits chunks only from the link's
        # current endpoint; one whose source address was spoofed still cannot start a train
        # outside WINDOW after the last train the caller ``confirm``ed (authenticated, or
        # accepted from a plain link's endpoint), unless none was confirmed for STALE
        # seconds, nor change the chunk count of the train under way: ``refused`` counts them.
        self.confirmed = -1
        self.confirmed_at = float("-inf")
        self.refused = 0

    def confirm(self, seq: int, now: float | None = None) -> None:
        """Train ``seq`` was genuine (it opened, or came whole from a plain link's endpoint)."""
        self.confirmed = seq
        self.confirmed_at = time.monotonic() if now is None else now

    def plausible(self, seq: int, now: float) -> bool:
        """May a chunk start train ``seq`` now (see ``refused``)?"""
        if self.confirmed < 0 or now - self.confirmed_at > self.STALE:
            return True
        return 0 < (seq - self.confirmed) & 0xFFFF_FFFF <= self.WINDOW

    def feed(self, seq: int, idx: int, count: int, chunk: Buf,
             now: float | None = None) -> bytes | None:
        """Add one chunk (copied); the whole blob once the train is complete, else None."""
        if seq == self.done_seq:
            return None  # a duplicate of a train already delivered
        if seq != self.cur or count != len(self.parts):
            when = time.monotonic() if now is None else now
            if (seq == self.cur and self.have) or not self.plausible(seq, when):
                self.refused += 1
                return None
            self._begin(seq, when)
            self.cur, self.parts = seq, [None] * count
        if self.parts[idx] is not None:
            return None
        self.parts[idx] = bytes(chunk)
        self.have += 1
        if self.have < count:
            return None
        blob = b"".join(self.parts)  # type: ignore[arg-type]  # all filled
        self.done_seq, self.cur, self.parts, self.have = seq, -1, [], 0
        return blob

    def completed(self, seq: int, now: float | None = None) -> None:
        """Train ``seq`` arrived whole in one read."""
        self._begin(seq, time.monotonic() if now is None else now)
        self.done_seq, self.cur, self.parts = seq, -1, []

    def _begin(self, seq: int, now: float) -> None:
        recent = now - self.last_at <= self.STALE
        if self.have:  # the partial train will not complete now
            if recent:
                self.lost += 1
            else:
                self.stale += 1
            self.have = 0
        if self.last_seq >= 0:
            missing = (seq - self.last_seq - 1) & 0xFFFF_FFFF
            if 0 < missing <= self.MAX_GAP:
                if recent:
                    self.lost += missing
                else:
                    self.stale += missing
        if self.last_seq < 0 or 0 < (seq - self.last_seq) & 0xFFFF_FFFF <= 1 << 31:
            self.last_seq = seq
        self.last_at = now


class TrainPolicy:
    """When a link may send whole trains (send side; the receive side feeds it the peer's reports).

    Trains are used from the start.  The peer reports how many trains it has lost in all;
    each report is judged against the trains sent since the previous one: when more than
    ``MAX_LOSS`` of them were lost (random loss: 1 % of datagrams loses about 40 % of 47-chunk
    trains), trains are held off for 0.25 s, doubling (to 2 s at most) while losses come back
    soon after trains resume, and starting again at 0.25 s after 10 clean seconds.  A rarer loss,
    such as TCP's own congestion drops at a bottleneck, costs less than per-segment sealing
    would, and keeps trains going.  Reports about trains sent before a hold-off are ignored.
    """

    MIN_HOLD = 0.25
    MAX_HOLD = 2.0  # a probe every 2 s at worst costs a few trains; trains return 2 s after loss
    CLEAN = 10.0
    MAX_LOSS = 0.05  # lost trains per train sent, between two reports

    def __init__(self, enabled: bool = True, off_reason: str = "") -> None:
        self.enabled = enabled
        self.off_reason = off_reason  # why trains are off for good ("" when enabled)
        self.until = 0.0
        self.hold = 0.0
        self.last_loss = float("-inf")
        self.fallbacks = 0
        self._lost = 0  # the peer's total at its previous report
        self._sent = 0  # our trains sent at that report

    def allowed(self, now: float) -> bool:
        return self.enabled and now >= self.until

    def on_report(self, now: float, lost_total: int, sent_total: int) -> bool:
        """The peer has lost ``lost_total`` trains in all, and we sent ``sent_total``: True if
        this starts a hold-off."""
        lost = lost_total - self._lost if lost_total >= self._lost else lost_total
        sent = max(sent_total - self._sent, 1)
        self._lost, self._sent = lost_total, sent_total
        if now < self.until or lost <= 0 or lost <= self.MAX_LOSS * sent:
            return False
        return self.on_loss(now)

    def on_loss(self, now: float) -> bool:
        """Fall back to segments now (unless already held off); True if this starts a hold-off."""
        if now < self.until:
            return False
        if now - self.last_loss < self.hold + self.CLEAN:
            self.hold = min(max(self.hold * 2, self.MIN_HOLD), self.MAX_HOLD)
        else:
            self.hold = self.MIN_HOLD
        self.last_loss = now
        self.until = now + self.hold
        self.fallbacks += 1
        return True

    def mode(self, now: float) -> str:
        if not self.enabled:
            return f"segments ({self.off_reason})" if self.off_reason else "segments"
        return "trains" if now >= self.until else "segments (loss)"
