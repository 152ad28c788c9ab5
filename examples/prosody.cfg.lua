-- prosody for ipop: /etc/prosody/prosody.cfg.lua on the server machine (docs/deploy.md).
--
-- The test suite and `ipop demo` start their prosody from this very file
-- (ipop.testbed.servers.Prosody): they substitute the address 203.0.113.10, the ports, the
-- domain vpn.example.org and the paths below, and nothing else (a plaintext test server drops
-- the lines marked "-- tls" and sets c2s_require_encryption = false; a test bed that runs as
-- root adds run_as_root = true).  Keep those literals and marks when you edit it here.

pidfile = "/run/prosody/prosody.pid"
data_path = "/var/lib/prosody"

-- listen on the server's address only; clients connect to 5222 (STARTTLS) or 5223 (direct TLS)
interfaces = { "203.0.113.10" }
c2s_ports = { 5222 }
c2s_direct_tls_ports = { 5223 }
-- no federation, no components, no web: ipop needs client connections only
s2s_ports = { }
component_ports = { }

-- console logging: systemd's journal keeps it (`journalctl -u prosody`)
log = { { levels = { min = "info" }, to = "console" } }

modules_enabled = {
  "roster", "saslauth", "disco", "ping", "posix", "groups",
  "tls", -- tls
}
-- offline storage would replay stale con_req/con_resp at the next login; no server-to-server
modules_disabled = { "offline", "s2s" }

-- mod_groups: every member of a [group] gets every other member in its roster (a GroupVPN
-- group is such a shared roster group); prosody reads the file when it starts
groups_file = "/etc/prosody/ipop-groups.txt"

-- accounts are made by the operator (`prosodyctl register alice vpn.example.org PASSWORD`)
authentication = "internal_hashed"
storage = "internal"
allow_registration = false

-- no login without TLS: the password and every con_req (fingerprints, candidates) are inside it
c2s_require_encryption = true -- tls

-- the certificate nodes pin with xmpp_ca_cert (self-signed is fine: nodes pin this exact one)
certificates = "/etc/prosody/certs" -- tls
ssl = { certificate = "/etc/prosody/certs/vpn.example.org.crt", key = "/etc/prosody/certs/vpn.example.org.key" } -- tls

VirtualHost "vpn.example.org"
  ssl = { certificate = "/etc/prosody/certs/vpn.example.org.crt", key = "/etc/prosody/certs/vpn.example.org.key" } -- tls
