"""TUN → UDP: the outbound pipeline, run by one thread.

Pipeline (sequential, in this thread; one flow's order is the device's read order):
  1. read packets from the device into one preallocated buffer (non-blocking; when the device is
     empty, sleep in poll() on the device and a wake pipe: no busy waiting; after a small read,
     a zero-timeout poll() tells whether more is queued, sparing a failing read's exception);
  2. find the destination: IPv4/IPv6 destination address (TUN) or destination MAC (TAP);
  3. unicast with a link → ``Link.send_packet`` (plain, sealed, or queued while keys are made);
     broadcast/multicast → every link (TAP: ARP requests are flooded so the owner answers);
     no link → held in a small per-destination queue and reported to the controller;
  4. clamp the MSS of TCP SYNs to the overlay MTU on the way out.
With offloads (a TUN opened with IFF_VNET_HDR) a read is a 10-byte ``virtio_net_hdr`` and up to
64 KB of TCP super-packet: step 3 sends it whole as one UDP GSO train while the link shows no
loss, else cuts it into standalone packets first (``Link.send_super``); packets held for later
are completed copies.  Small packets (no GSO) are read back to back into one buffer until the
device is empty (or 64 of them), then sent together: each run of equal-sized datagrams to one
peer in one UDP GSO send (``Link.send_small``), which is what lifts the small-packet rate.
The buffer is reused for the next read: ``Link.send_packet`` must copy anything it keeps
(it does: queued packets are copied with ``bytes()``).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable

from ipop.dataplane.link import Link, standalone
from ipop.dataplane.table import ForwardingTable
from ipop.dataplane.tun import Device
from ipop.wire import packet as wp
from ipop.wire.vnet import F_NEEDS_CSUM, GSO_NONE, VNET, VNET_HDR_LEN, VnetHdr

VNET_LEN = VNET_HDR_LEN

READ_SIZE = 65536 + 16
SMALL_READ = 2048  # reads up to this size (no GSO) are batched
MAX_SMALL = 64  # small reads per batch at most
BATCH_AREA = 128 * 1024  # where small reads pack; a full read always fits behind it


class Outbound(threading.Thread):
    def __init__(
        self,
        dev: Device,
        table: ForwardingTable,
        *,
        mss: int,
        on_miss: Callable[[bytes, bytes], None],
        stopping: threading.Event,
        wake_fd: int,
    ) -> None:
        super().__init__(name="ipop-tun-rx", daemon=True)
        self.dev = dev
        self.table = table
        self.mss = mss
        self.on_miss = on_miss  # (destination address or MAC, packet copy)
        self.stopping = stopping
        self.wake_fd = wake_fd
        self.counters: dict[str, int] = {"packets": 0, "bytes": 0, "no_route": 0, "flooded": 0,
                                         "not_ip": 0}
        self._batch = bytearray(0)  # the TX thread's read buffer
        self._off = 0  # where the next read lands in it
        self._small: list[memoryview] = []  # small reads kept back (offloads)

    def run(self) -> None:
        fd = self.dev.fd
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        if self.dev.vnet_hdr:
            self._batch = bytearray(BATCH_AREA + READ_SIZE)
            self._read_loop(fd, poller, self._take_vnet, self._flush_small)
            return
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        handle = self._handle_tap if self.dev.tap else self._handle_tun

        def take(_view: memoryview, n: int) -> None:
            handle(view[:n], buf, n)

        self._batch = buf
        self._read_loop(fd, poller, take, lambda: False)

    def _read_loop(self, fd: int, poller: select.poll,
                   take: Callable[[memoryview, int], None], flush: Callable[[], bool]) -> None:
        """Read the device until it is closed: each read lands in the batch buffer at
        ``self._off`` and goes to ``take``; when the device is empty, ``flush`` sends what was
        kept back (True: it sent something, read again), else the thread sleeps in poll()."""
        view = memoryview(self._batch)
        readv = os.readv
        counters = self.counters
        stopped = self.stopping.is_set
        # Whether more is queued after a small read is asked with poll(0), not with a read that
        # fails: the EAGAIN exception is the costliest step of a lone packet's way (ping).
        probe = select.poll()
        probe.register(fd, select.POLLIN)
        while True:
            area = view[self._off : self._off + READ_SIZE]
            try:
                n = readv(fd, [area])
            except BlockingIOError:
                if flush():
                    continue
                if stopped():  # checked when idle; a busy device is closed under us (EBADF)
                    return
                poller.poll()
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF or self.stopping.is_set():
                    return
                counters["read_error"] = counters.get("read_error", 0) + 1
                continue
            counters["packets"] += 1
            counters["bytes"] += n
            take(area, n)
            if n <= SMALL_READ and not probe.poll(0):
                flush()  # the device is empty: send what was kept back, then sleep
                if stopped():
                    return
                poller.poll()

    # ---- L3 (TUN)
    def _handle_tun(self, pkt: memoryview, buf: bytearray, n: int) -> None:
        ver = buf[0] >> 4
        if ver == 4 and n >= 20:
            dst = bytes(buf[16:20])
            is_group = buf[16] >= 224 or dst == b"\xff\xff\xff\xff"
        elif ver == 6 and n >= 40:
            dst = bytes(buf[24:40])
            is_group = buf[24] == 0xFF
        else:
            self.counters["not_ip"] += 1
            return
        if buf[9 if ver == 4 else 6] == wp.IPPROTO_TCP:
            wp.clamp_mss(pkt, self.mss if ver == 4 else self.mss - 20)
        link = self.table.by_ip.get(dst)
        if link is not None:
            if link.xlat is not None:
                link.xlat.tx(pkt)
            link.send_packet(pkt)
        elif is_group:
            self._flood(pkt)
        else:
            self.counters["no_route"] += 1
            self.on_miss(dst, bytes(pkt))

    # ---- L3 with offloads: virtio_net_hdr + packet (maybe a TSO super-packet)
    def _take_vnet(self, area: memoryview, n: int) -> None:
        """One read with a ``virtio_net_hdr``: a small one (no GSO) is kept back in the batch
        buffer, to go with the next ones (the device is read until it is empty or the buffer
        full; ``Link.send_small`` then sends each peer's run of equal sizes in one GSO send);
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

    def _flush_small(self) -> bool:
        if not self._small:
            return False
        self._send_small(self._small)
        self._small.clear()
        self._off = 0
        return True

    def _send_small(self, reads: list[memoryview]) -> None:
        """Route a run of small reads; runs of packets for one directly reachable peer go out
        together (``Link.send_small``), anything else one by one, all in read order."""
        run: list[tuple[VnetHdr, memoryview]] = []
        run_link: Link | None = None
        for read in reads:
            parsed = self._parse_vnet(read)
            if parsed is None:
                continue
            vh, pkt, dst, is_group, link = parsed
            if link is not None and link.path.channel is None:
                if link is not run_link and run_link is not None:
                    run_link.send_small(run)
                    run = []
                run_link = link
                run.append((vh, pkt))
                continue
            if run_link is not None:
                run_link.send_small(run)
                run, run_link = [], None
            self._deliver_vnet(read, vh, pkt, dst, is_group, link)
        if run_link is not None:
            run_link.send_small(run)

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
        if n < VNET_LEN + 20:
            self.counters["not_ip"] += 1
            return None
        vh = VnetHdr._make(VNET.unpack_from(view))
        pkt = view[VNET_LEN:n]
        ver = view[VNET_LEN] >> 4
        if ver == 4:
            dst = bytes(view[VNET_LEN + 16 : VNET_LEN + 20])
            is_group = view[VNET_LEN + 16] >= 224 or dst == b"\xff\xff\xff\xff"
            proto = view[VNET_LEN + 9]
        elif ver == 6 and n >= VNET_LEN + 40:
            dst = bytes(view[VNET_LEN + 24 : VNET_LEN + 40])
            is_group = view[VNET_LEN + 24] == 0xFF
            proto = view[VNET_LEN + 6]
        else:
            self.counters["not_ip"] += 1
            return None
        partial = bool(vh.flags & F_NEEDS_CSUM)
        if proto == wp.IPPROTO_TCP and vh.gso_type == GSO_NONE:
            wp.clamp_mss(pkt, self.mss if ver == 4 else self.mss - 20, partial)
        link = self.table.by_ip.get(dst)
        if link is not None and link.xlat is not None:
            link.xlat.tx(pkt, partial)
        return vh, pkt, dst, is_group, link

    def _deliver_vnet(self, view: memoryview, vh: VnetHdr, pkt: memoryview, dst: bytes,
                      is_group: bool, link: Link | None) -> None:
        """Send a parsed read (``view`` is all of it) to its link, to every link (group), or
        hold it and report the miss."""
        if link is not None:
            link.send_super(vh, pkt, view)
            return
        if is_group:
            links: tuple[Link, ...] = self.table.links
            if links:
                self.counters["flooded"] += 1
            for one in links:
                one.send_super(vh, pkt)
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
                    if target not in self.table.by_ip and arp[2] != target:
                        self.counters["no_route"] += 1
                        self.on_miss(target, bytes(frame))
            self._flood(frame)
            return
        link = self.table.by_mac.get(dst_mac)
        if link is None and ethertype == wp.ETH_P_IP and n >= wp.ETH_HLEN + 20:
            link = self.table.by_ip.get(bytes(buf[wp.ETH_HLEN + 16 : wp.ETH_HLEN + 20]))
        if link is not None:
            link.send_packet(frame)
        else:
            self._flood(frame)  # unknown unicast: flood, as a switch does

    def _flood(self, pkt: memoryview) -> None:
        links: tuple[Link, ...] = self.table.links
        if links:
            self.counters["flooded"] += 1
        for link in links:
            link.send_packet(pkt)
