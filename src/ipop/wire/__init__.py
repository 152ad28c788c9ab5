"""Wire formats: pure functions over bytes, no sockets, no asyncio."""
