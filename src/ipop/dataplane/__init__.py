"""ipop.dataplane"""
