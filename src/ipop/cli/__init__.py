"""The command line: ipop up | id | status | demo | bench."""
