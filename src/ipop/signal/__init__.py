"""ipop.signal"""
