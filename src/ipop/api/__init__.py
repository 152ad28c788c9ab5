"""ipop.api"""
