// Package systemd holds the end-to-end test of the gwagent Debian package under
// a real systemd: it builds the package, boots a Debian bookworm root file
// system with systemd-nspawn, installs, configures, updates, kills (through the
// watchdog), upgrades, removes and purges gwagent there against a gwhub
// running outside, and checks each step.
//
// It also checks the agent's privileges as shipped. A probe run inside the
// agent's own unit (testdata/probe.sh, an extra ExecStartPre= as the unit's
// user in the unit's sandbox) must be refused systemd-run, any polkit action
// but reboot, /boot but the GRUB environment, the running slot, other disks
// and /etc/shadow, while a full A/B update works through the same unit: two
// loop devices attached here are the slots, /boot/grub/grubenv is switched
// by the real grub-editenv, the agent's reboot request goes through logind
// and polkit and really reboots the container, which the test boots again
// (as systemd-nspawn@.service would, on exit status 133) with a stand-in for
// GRUB (testdata/e2e-boot.sh) that counts the trial boot and boots slot B;
// the agent then commits, and at its next start is given slot A instead.
// The same probe against the package of the last root-run version must find
// what it refuses now, and an upgrade from that version must hand its state
// over to the agent's user.
//
// Run it with `make e2e` (GWAGENT_E2E=1, as root, with systemd-nspawn,
// debootstrap and three free loop devices). Without GWAGENT_E2E it skips, so
// `go test ./...` stays fast; with it, anything missing is a failure, not a
// skip.
//
// The checks inside the container are in testdata/inside.sh; this package
// must not test the agent's behaviour in detail (the agent's own tests do).
package systemd
