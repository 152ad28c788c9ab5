"""ipop.cli"""
