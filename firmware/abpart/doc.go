// Package abpart is the A/B partition installer: it streams an image into
// the inactive slot of a pair, reads it back, points the bootloader at it for
// a trial boot (through firmware/bootenv, one write), and after the reboot
// commits the trial or rolls it back.
//
// It owns the slot pair (block devices, or plain files in tests), the
// detection of the running slot (kernel command line or a configured
// override, cross-checked with the bootloader environment), a small durable
// record of the switch it made (StateDir/abpart.json), and the reboot seam.
//
// It must never open the running slot, nor the committed slot, for writing:
// every path that writes checks both first. It must not download, decide
// phases or report progress: the firmware state machine does that and calls
// this package through the firmware.Installer interface and its optional
// abilities (Checker, Preparer, ReadBacker, LocalBlocks, Rebooter,
// Committer, RollBacker, Slotted). LocalBlocks opens both slots read-only
// for an adaptive install to copy blocks from.
package abpart
