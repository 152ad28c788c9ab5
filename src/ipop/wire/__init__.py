"""ipop.wire"""
