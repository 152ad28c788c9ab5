"""ipop.controller"""
