"""ipop.nat"""
