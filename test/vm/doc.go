// Package vm holds the full-system A/B update test: a Debian bookworm gateway
// on a GPT disk (GRUB with the shipped A/B snippet, root slots A and B, a
// data partition for the agent's state) boots under QEMU with real systemd
// and the gwagent Debian package, and a gwhub on the host drives it through
// signed updates of its root file system: a healthy one, an older one and
// one signed for another device type (refused before the download), one
// cancelled while it downloads, one whose system does not come up healthy,
// one whose kernel cannot boot, a power cut in the middle of writing the
// slot, and trial boots decided on the device with `gwagent commit` and
// `gwagent rollback`. Every scenario is checked on the
// twin, in the guest's journal (streamed as JSON over a second serial port)
// and on the serial console (GRUB and the kernel).
//
// test/vm/build.sh builds the disk and the images (cached in build/vm, keyed
// by their inputs); the guest's own files are in test/vm/guest. The layout is
// documented for integrators in docs/reference-disk.md.
//
// Run it with `make e2e-vm` (GWAGENT_E2E_VM=1, as root, QEMU installed).
// Without GWAGENT_E2E_VM it skips, so `go test ./...` stays fast; with it,
// anything missing is a failure, not a skip.
package vm
