"""ipop.testbed: network-namespace topologies for tests, the demo and the benchmark.

``netns`` builds hosts, veth links, bridge LANs and NAT boxes (topologies drawn in its
docstring) and always removes them; ``nft`` renders the NAT and loss rulesets; ``proc`` runs the
tools and ends processes by pid; ``servers`` runs prosody/ejabberd and coturn.
"""
