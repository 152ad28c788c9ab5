"""TUN → UDP: the outbound pipeline, pumped by the poll thread (``Poller``) when the device is
readable.

Pipeline (sequential, in that thread; one flow's order is the device's read order):
  1. read packets from the device into one preallocated buffer (non-blocking; the thread waits
     in ``Poller``'s epoll, which holds the device beside the sockets: no busy waiting; after a
     small read, a zero-timeout poll() tells whether more is queued, sparing a failing read's
     exception; at most ``PUMP_READS`` reads per turn, so that the sockets are served too);
  2. find the destination (``ipop.wire.packet.destination``: IPv4/IPv6 destination address;
     TAP: destination MAC) and its link (``ForwardingTable.route``: the peer that owns the
     address, else the link whose prefix matches it longest: subnet routes, exit nodes);
  3. unicast with a link → ``LinkSender.send_packet`` (plain, sealed, or queued while keys
     are made);
     broadcast/multicast → every link (TAP: ARP requests are flooded so the owner answers);
     no link → held in a small per-destination queue and reported to the controller;
  4. clamp the MSS of TCP SYNs to the overlay MTU on the way out.
With offloads (a TUN opened with IFF_VNET_HDR) a read is a 10-byte ``virtio_net_hdr`` and up to
64 KB of TCP super-packet: step 3 sends it whole as one UDP GSO train while the link shows no
loss, else cuts it into standalone packets first (``LinkSender.send_super``); packets held for later
are completed copies.  Small packets (no GSO) are read back to back into one buffer until the
device is empty (or 64 of them), then sent together: each run of equal-sized datagrams to one
peer in one UDP GSO send (``LinkSender.send_small``), which is what lifts the small-packet rate.
The buffer is reused for the next read: ``LinkSender.send_packet`` must copy anything it keeps
(it does: queued packets are copied with ``bytes()``).
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable

from ipop.dataplane.link import Link
from ipop.dataplane.link_tx import standalone
from ipop.dataplane.table import ForwardingTable
from ipop.dataplane.tun import Device
from ipop.wire import packet as wp
from ipop.wire.packet import destination
from ipop.wire.vnet import F_NEEDS_CSUM, GSO_NONE, VNET, VNET_HDR_LEN, VnetHdr

VNET_LEN = VNET_HDR_LEN

READ_SIZE = 65536 + 16
SMALL_READ = 2048  # reads up to this size (no GSO) are batched
PUMP_READS = 64  # reads per pump at most, so that the sockets get their turn
MAX_SMALL = 64  # small reads per batch at most
BATCH_AREA = 128 * 1024  # where small reads pack; a full read always fits behind it


class Outbound:
    """Reads the device and sends what it reads.  It has no thread of its own: the poll
    thread calls ``pump`` whenever its epoll finds the device readable (``Poller``), so a
    packet read, an answer written and the next read are one thread's work, with no hand-over
    (and no GIL hand-over) between a reader and a receiver."""

    def __init__(
        self,
        dev: Device,
        table: ForwardingTable,
        *,
        mss: int,
        on_miss: Callable[[bytes, bytes], None],
    ) -> None:
        self.dev = dev
        self.table = table
        self.mss = mss
        self.on_miss = on_miss  # (destination address or MAC, packet copy)
        self.counters: dict[str, int] = {"packets": 0, "bytes": 0, "no_route": 0, "flooded": 0,
                                         "not_ip": 0, "read_error": 0}
        self._off = 0  # where the next read lands in the batch buffer
        self._small: list[memoryview] = []  # small reads kept back (offloads)
        os.set_blocking(dev.fd, False)
        # Whether more is queued after a small read is asked with poll(0), not with a read that
        # fails: the EAGAIN exception is the costliest step of a lone packet's way (ping).
        self._probe = select.poll()
        self._probe.register(dev.fd, select.POLLIN)
        self._take: Callable[[memoryview, int], None]
        if dev.vnet_hdr:
            self._batch = bytearray(BATCH_AREA + READ_SIZE)
            self._take = self._take_vnet
        else:  # every read is handled at once, at offset 0; nothing is kept back
            self._batch = bytearray(READ_SIZE)
            self._handle = self._handle_tap if dev.tap else self._handle_tun
            self._take = self._take_plain
        self._view = memoryview(self._batch)

    def pump(self) -> None:
        """Read the device until it is empty or ``PUMP_READS`` reads were taken, sending what
        is read (small reads kept back go out before this returns)."""
        fd = self.dev.fd
        readv = os.readv
        view = self._view
        counters = self.counters
        take = self._take
        more = self._probe.poll
        for _ in range(PUMP_READS):
            area = view[self._off : self._off + READ_SIZE]
            try:
                n = readv(fd, [area])
            except BlockingIOError:
                break
            except OSError:
                counters["read_error"] += 1
                break
            counters["packets"] += 1
            counters["bytes"] += n
            take(area, n)
            if n <= SMALL_READ and not more(0):
                break
        self._flush_small()

    def _take_plain(self, area: memoryview, n: int) -> None:
        self._handle(area[:n], self._batch, n)

    # ---- L3 (TUN)
    def _handle_tun(self, pkt: memoryview, buf: bytearray, n: int) -> None:
        dest = destination(buf, 0, n)
        if dest is None:
            self.counters["not_ip"] += 1
            return
        dst, is_group, ver, proto = dest
        if proto == wp.IPPROTO_TCP:
            wp.clamp_mss(pkt, self.mss if ver == 4 else self.mss - 20)
        link = self.table.route(dst, is_group)
        if link is not None:
            if link.xlat is not None:
                link.xlat.tx(pkt)
            link.tx.send_packet(pkt)
        elif is_group:
            self._flood(pkt)
        else:
            self.counters["no_route"] += 1
            self.on_miss(dst, bytes(pkt))

    # ---- L3 with offloads: virtio_net_hdr + packet (maybe a TSO super-packet)
    def _take_vnet(self, area: memoryview, n: int) -> None:
        """One read with a ``virtio_net_hdr``: a small one (no GSO) is kept back in the batch
        buffer, to go with the next ones (the device is read until it is empty or the buffer
        full; ``LinkSender.send_small`` then sends each peer's run of equal sizes in one GSO send);
        anything else goes at once, after what was kept back."""
        read = area[:n]
        if n <= SMALL_READ and n > VNET_LEN and read[1] == GSO_NONE:
            self._small.append(read)
            self._off += (n + 15) & ~15
            if len(self._small) >= MAX_SMALL or self._off > BATCH_AREA:
                self._flush_small()
            return
        self._flush_small()  # keep the read order: what came before goes first
        self._handle_vnet(read)

    def _flush_small(self) -> None:
        if not self._small:
            return
        self._send_small(self._small)
        self._small.clear()
        self._off = 0

    def _send_small(self, reads: list[memoryview]) -> None:
        """Route a run of small reads; runs of packets for one directly reachable peer go out
        together (``LinkSender.send_small``), anything else one by one, all in read order."""
        run: list[tuple[VnetHdr, memoryview]] = []
        run_link: Link | None = None
        for read in reads:
            parsed = self._parse_vnet(read)
            if parsed is None:
                continue
            vh, pkt, dst, is_group, link = parsed
            if link is not None and link.path.channel is None:
                if link is not run_link and run_link is not None:
                    run_link.tx.send_small(run)
                    run = []
                run_link = link
                run.append((vh, pkt))
                continue
            if run_link is not None:
                run_link.tx.send_small(run)
                run, run_link = [], None
            self._deliver_vnet(read, vh, pkt, dst, is_group, link)
        if run_link is not None:
            run_link.tx.send_small(run)

    def _handle_vnet(self, view: memoryview) -> None:
        parsed = self._parse_vnet(view)
        if parsed is not None:
            self._deliver_vnet(view, *parsed)

    def _parse_vnet(self, view: memoryview,
                    ) -> tuple[VnetHdr, memoryview, bytes, bool, Link | None] | None:
        """One read's header, packet, destination address, whether it is a group address, and
        its link (None: none); the MSS of a TCP SYN clamped, the packet translated for a
        SocialVPN link.  None when the read is not IP (counted)."""
        n = len(view)
        dest = destination(view, VNET_LEN, n)
        if dest is None:
            self.counters["not_ip"] += 1
            return None
        dst, is_group, ver, proto = dest
        vh = VnetHdr._make(VNET.unpack_from(view))
        pkt = view[VNET_LEN:n]
        partial = bool(vh.flags & F_NEEDS_CSUM)
        if proto == wp.IPPROTO_TCP and vh.gso_type == GSO_NONE:
            wp.clamp_mss(pkt, self.mss if ver == 4 else self.mss - 20, partial)
        link = self.table.route(dst, is_group)
        if link is not None and link.xlat is not None:
            link.xlat.tx(pkt, partial)
        return vh, pkt, dst, is_group, link

    def _deliver_vnet(self, view: memoryview, vh: VnetHdr, pkt: memoryview, dst: bytes,
                      is_group: bool, link: Link | None) -> None:
        """Send a parsed read (``view`` is all of it) to its link, to every link (group), or
        hold it and report the miss."""
        if link is not None:
            link.tx.send_super(vh, pkt, view)
            return
        if is_group:
            links: tuple[Link, ...] = self.table.links
            if links:
                self.counters["flooded"] += 1
            for one in links:
                one.tx.send_super(vh, pkt)
            return
        self.counters["no_route"] += 1
        for one_pkt in standalone(vh, pkt):
            self.on_miss(dst, one_pkt)

    # ---- L2 (TAP)
    def _handle_tap(self, frame: memoryview, buf: bytearray, n: int) -> None:
        if n < wp.ETH_HLEN:
            self.counters["not_ip"] += 1
            return
        dst_mac = bytes(buf[0:6])
        ethertype = (buf[12] << 8) | buf[13]
        if ethertype == wp.ETH_P_IP:
            wp.clamp_mss(frame[wp.ETH_HLEN :], self.mss)
        elif ethertype == wp.ETH_P_IPV6:
            wp.clamp_mss(frame[wp.ETH_HLEN :], self.mss - 20)
        if buf[0] & 1:  # broadcast / multicast
            if ethertype == wp.ETH_P_ARP:
                arp = wp.arp_parse(frame[wp.ETH_HLEN:])
                if arp is not None and arp[0] == wp.ARP_REQUEST:
                    target = arp[4]
                    if self.table.owner_of(target) is None and arp[2] != target:
                        self.counters["no_route"] += 1
                        self.on_miss(target, bytes(frame))
            self._flood(frame)
            return
        link = self.table.by_mac.get(dst_mac)
        if link is None and ethertype == wp.ETH_P_IP:
            dest = destination(buf, wp.ETH_HLEN, n)
            if dest is not None and dest[2] == 4:
                link = self.table.owner_of(dest[0])
        if link is not None:
            link.tx.send_packet(frame)
        else:
            self._flood(frame)  # unknown unicast: flood, as a switch does

    def _flood(self, pkt: memoryview) -> None:
        links: tuple[Link, ...] = self.table.links
        if links:
            self.counters["flooded"] += 1
        for link in links:
            link.tx.send_packet(pkt)
