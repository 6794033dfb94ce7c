// Package qemu holds the slow end-to-end test of the A/B bootloader contract
// with a real GRUB: run.sh builds a GPT disk image (a boot partition with
// grub.cfg, the shipped packaging/bootloader/grub.cfg.snippet and grubenv,
// and two slots A and B, each with a kernel and a busybox initramfs that
// names its slot), boots it under QEMU (software emulation) and checks a
// committed boot, a trial boot counted by GRUB, a commit, and GRUB's
// fallback once a trial has used up its boot limit, including a trial slot
// whose kernel GRUB cannot load.
//
// Run it with `make e2e-qemu` (root; it installs its Debian packages). It is
// not part of `make test`: each boot takes tens of seconds.
//
// The environment is written between boots by abenv, which uses
// firmware/bootenv's GRUB backend, so the test exercises the same writes the
// installer makes. This package must not test the installer's decisions
// (firmware/abpart's tests do); it tests what the bootloader does with them.
package qemu
