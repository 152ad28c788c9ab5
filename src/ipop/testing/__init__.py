"""ipop.testing"""
