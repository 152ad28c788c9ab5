"""ipop.testbed"""
