// Package systemd holds the end-to-end test of the gwagent Debian package under
// a real systemd: it builds the package, boots a Debian bookworm root file
// system with systemd-nspawn, installs, configures, updates, kills (through the
// watchdog), upgrades, removes and purges gwagent there against a gwhub
// running outside, and checks each step.
//
// Run it with `make e2e` (GWAGENT_E2E=1, as root, with systemd-nspawn and
// debootstrap). Without GWAGENT_E2E it skips, so `go test ./...` stays fast;
// with it, anything missing is a failure, not a skip.
//
// The checks inside the container are in testdata/inside.sh; this package
// must not test the agent's behaviour in detail (the agent's own tests do).
package systemd
