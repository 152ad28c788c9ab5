"""The virtual NIC: open a TUN (L3) or TAP (L2) device and set its address, MTU and state.

The device is created by ``open_device`` in the caller's network namespace and configured with one
``ip -batch`` run (netlink through pyroute2 where ``ip`` is missing).  Closing the file
descriptor of a non-persistent device removes it, so a node that exits, however it exits, leaves
no interface behind.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass

from ipop.errors import EnvironmentFault

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40


@dataclass
class Device:
    """An open TUN/TAP device: its fd, name, kind and whether reads carry a virtio_net_hdr."""

    fd: int
    name: str
    tap: bool
    vnet_hdr: bool
    mac: bytes | None = None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1


def open_queues(name: str, queues: int, *, tap: bool = False,
                vnet_hdr: bool = False) -> list[Device]:
    """Create ``name`` with ``queues`` queues (``IFF_MULTI_QUEUE``), one open device per queue,
    each with the same offloads.  The kernel hands each flow's packets to one queue (by its flow
    hash), so one reader per queue sees every packet of its flows, in order.  All queues get
    the offloads or none do (``Device.vnet_hdr``)."""
    devs: list[Device] = []
    try:
        for _ in range(queues):
            devs.append(open_device(name, tap=tap, vnet_hdr=vnet_hdr, multi_queue=True))
            if vnet_hdr and not devs[-1].vnet_hdr:  # refused: every queue without offloads
                for dev in devs:
                    dev.close()
                return open_queues(name, queues, tap=tap, vnet_hdr=False)
    except BaseException:
        for dev in devs:
            dev.close()
        raise
    return devs


def open_device(name: str, *, tap: bool = False, vnet_hdr: bool = False,
                multi_queue: bool = False) -> Device:
    """Create and open a TUN or TAP device named ``name``.

    With ``vnet_hdr`` the device is opened with IFF_VNET_HDR and checksum/TSO offloads enabled,
    so reads carry up to 64 KB TCP super-packets behind a 10-byte virtio_net_hdr.  Should the
    kernel refuse the offloads, the device is reopened without them (``Device.vnet_hdr`` tells).
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentFault(f"cannot open /dev/net/tun: {exc.strerror}") from None
    flags = ((IFF_TAP if tap else IFF_TUN) | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
             | (IFF_MULTI_QUEUE if multi_queue else 0))
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise EnvironmentFault(f"cannot create interface {name}: {exc.strerror}") from None
    if vnet_hdr:
        offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
        except OSError:
            os.close(fd)
            return open_device(name, tap=tap, vnet_hdr=False, multi_queue=multi_queue)
    return Device(fd=fd, name=name, tap=tap, vnet_hdr=vnet_hdr)


def configure(dev: Device, *, ip4: str, prefixlen: int, mtu: int, ip6: str | None = None) -> None:
    """Set address(es), MTU and link up (``ip -batch``, else netlink); fills ``dev.mac`` for
    TAP devices.

    pyroute2's synchronous API refuses to run inside a running asyncio loop, so the work runs
    in a short-lived thread of its own.
    """
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _configure(dev, ip4=ip4, prefixlen=prefixlen, mtu=mtu, ip6=ip6)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=work, name="ipop-netlink")
    th.start()
    th.join()
    if errors:
        exc = errors[0]
        if isinstance(exc, EnvironmentFault):
            raise exc
        raise EnvironmentFault(f"cannot configure {dev.name}: {exc}") from exc


def _configure(dev: Device, *, ip4: str, prefixlen: int, mtu: int, ip6: str | None) -> None:
    if _configure_ip(dev, ip4=ip4, prefixlen=prefixlen, mtu=mtu, ip6=ip6):
        return
    _configure_netlink(dev, ip4=ip4, prefixlen=prefixlen, mtu=mtu, ip6=ip6)


def _gso_segs(mtu: int) -> int:
    # one super-packet must fit one GSO send (64 datagrams, 65507 bytes) and one GRO batch at
    # the peer: cap the segments per super-packet accordingly
    return max(1, min(64, 65507 // (mtu + 41 + 25 + 4)))


def _configure_ip(dev: Device, *, ip4: str, prefixlen: int, mtu: int, ip6: str | None) -> bool:
    """Configure with one ``ip -batch`` run (a few ms; importing pyroute2 costs ~0.2 s of CPU
    and several MB per node).  False when ``ip`` is missing or refused: then netlink does it."""
    if shutil.which("ip") is None:
        return False
    lines = [f"link set dev {dev.name} mtu {mtu}",
             f"address add {ip4}/{prefixlen} dev {dev.name}"]
    if ip6:
        iface = ipaddress.IPv6Interface(ip6)
        lines.append(f"address add {iface.ip}/{iface.network.prefixlen} dev {dev.name}")
    lines.append(f"link set dev {dev.name} up")
    try:
        r = subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n",
                           capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0:
        if "File exists" in r.stderr:
            raise EnvironmentFault(f"cannot configure {dev.name}: {r.stderr.strip()}")
        return False
    if dev.vnet_hdr:  # older kernels refuse it: TSO still works, trains are just split
        subprocess.run(["ip", "link", "set", "dev", dev.name, "gso_max_segs",
                        str(_gso_segs(mtu))], capture_output=True, timeout=10, check=False)
    if dev.tap:
        try:
            with open(f"/sys/class/net/{dev.name}/address") as f:
                dev.mac = bytes.fromhex(f.read().strip().replace(":", ""))
        except (OSError, ValueError):
            return False
    return True


def _configure_netlink(dev: Device, *, ip4: str, prefixlen: int, mtu: int,
                       ip6: str | None) -> None:
    from pyroute2 import IPRoute  # heavy: imported only when ``ip`` cannot do it

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev.name)
        if not idx:
            raise EnvironmentFault(f"interface {dev.name} vanished")
        index = idx[0]
        ipr.link("set", index=index, mtu=mtu)
        ipr.addr("add", index=index, address=ip4, prefixlen=prefixlen)
        if ip6:
            iface = ipaddress.IPv6Interface(ip6)
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ipr.link("set", index=index, state="up")
        if dev.vnet_hdr:
            try:
                ipr.link("set", index=index, gso_max_segs=_gso_segs(mtu))
            except Exception:  # older kernels: TSO still works, trains are just split
                pass
        if dev.tap:
            links = ipr.get_links(index)
            mac = links[0].get_attr("IFLA_ADDRESS")
            dev.mac = bytes.fromhex(mac.replace(":", ""))
