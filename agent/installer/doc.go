// Package installer is the agent's registry of firmware installer backends:
// each is registered under the name used in installer.type, with the
// defaults of its installer.<name>.* keys and a constructor that decodes
// them. An unknown name is a configuration error naming the key and the
// known names.
//
// It also tells, from the same configuration, which devices and files the
// agent's unprivileged user needs (NeededAccess): the inactive slot and the
// bootloader environment, never the running slot. The unit's start-up step
// grants exactly that as root before each start.
//
// It must not contain installer logic: backends live in firmware/simulated
// and firmware/abpart; this package only builds them from configuration.
package installer
