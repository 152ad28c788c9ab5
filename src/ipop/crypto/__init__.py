"""ipop.crypto"""
