// Package bootenv reads and writes bootloader environment variables: the
// channel through which the A/B installer (firmware/abpart) tells the
// bootloader which slot to boot and learns what the bootloader did.
//
// It owns:
//   - the Env interface (Get and Set, every variable of a Set in ONE write, so
//     a power cut leaves either the old or the new environment, never half);
//   - the backends, chosen by name: "uboot" (fw_printenv/fw_setenv with a
//     fw_env.config, script mode, single or redundant environment), "grub"
//     (grub-editenv on a grubenv file) and "file" (an atomic key=value file,
//     for the simulated mode and tests);
//   - the Runner seam through which every external tool is run, with a
//     bounded context, so that errors name the tool, its exit code and stderr;
//   - the A/B bootloader contract (contract.go): variable names and the
//     values written by a switch and by a commit.
//
// It must not decide anything about slots, images or updates (that is
// firmware/abpart), must not reboot, and must not parse a bootloader's binary
// environment itself: the bootloader's own tools are the authority on their
// format, including CRCs and redundant copies.
package bootenv
