"""The local control API (IPOP's Tincan API), status documents and their rendering."""
