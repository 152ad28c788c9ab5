"""Sliding anti-replay window over 64-bit packet counters (RFC 6479).

The window is a ring of ``RING_BLOCKS`` 64-bit blocks.  Bit ``c % 64`` of block
``(c // 64) % RING_BLOCKS`` remembers counter ``c``.  When a counter beyond the highest one seen
arrives, the blocks it skips over are cleared in one step (never bit by bit), so a big jump costs
at most ``RING_BLOCKS`` block writes.  One block is always the "current" partly filled one, so the
window guarantees ``WINDOW_SIZE = (RING_BLOCKS - 1) * 64`` counters behind the highest seen.

Checking and recording are split on purpose: a receiver calls :meth:`ReplayWindow.check` before
it spends an AEAD decryption, and :meth:`ReplayWindow.update` only after the tag verified.  A forged
packet therefore never moves the window.

Counters run from 0 to ``COUNTER_LIMIT - 1`` (= 2**64 - 2); ``COUNTER_LIMIT`` itself and anything
above is always rejected, so a sender must rekey before it gets there.

Concurrency contract: a window has exactly one consumer, the thread that receives on its link
(the data plane's poll thread).  It takes no lock; calling it from two threads at once is a bug.
"""

from __future__ import annotations

BLOCK_BITS = 64
"""Bits per block of the bitmap."""
BLOCK_SHIFT = 6
"""log2(BLOCK_BITS)."""
RING_BLOCKS = 32
"""Blocks in the ring (a power of two)."""
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS
"""How far behind the highest counter seen a counter may be and still be accepted (1984)."""
COUNTER_LIMIT = 2**64 - 1
"""First counter that is never valid."""

_BIT_MASK = BLOCK_BITS - 1
_RING_MASK = RING_BLOCKS - 1


class ReplayWindow:
    """Remembers which counters were received recently; rejects repeats and stale ones."""

    __slots__ = ("_highest", "_ring", "_seen_any")

    def __init__(self) -> None:
        self._ring = [0] * RING_BLOCKS
        self._highest = 0
        self._seen_any = False

    @property
    def highest(self) -> int | None:
        """The highest counter accepted so far, or None before the first one."""
        return self._highest if self._seen_any else None

    def check(self, counter: int) -> bool:
        """True if ``counter`` is fresh: not seen before and not too old.  Changes nothing."""
        if counter >= COUNTER_LIMIT or counter < 0:
            return False
        highest = self._highest
        if counter > highest:
            return True
        if highest - counter >= WINDOW_SIZE:
            return False
        block = self._ring[(counter >> BLOCK_SHIFT) & _RING_MASK]
        return not (block >> (counter & _BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Record ``counter`` as received (call after the packet authenticated).

        Returns False, recording nothing, if the counter was not fresh after all.
        """
        if not self.check(counter):
            return False
        index = counter >> BLOCK_SHIFT
        if counter > self._highest:
            current = self._highest >> BLOCK_SHIFT
            skipped = min(index - current, RING_BLOCKS)
            ring = self._ring
            for i in range(1, skipped + 1):
                ring[(current + i) & _RING_MASK] = 0
            self._highest = counter
        self._ring[index & _RING_MASK] |= 1 << (counter & _BIT_MASK)
        self._seen_any = True
        return True

    def check_and_update(self, counter: int) -> bool:
        """Both steps at once, for callers that verified the packet some other way."""
        return self.update(counter)
