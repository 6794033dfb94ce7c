// Command abenv writes and reads a grubenv file through firmware/bootenv's
// GRUB backend, with the same variables the A/B installer writes. The QEMU
// end-to-end test (test/qemu/run.sh) uses it between boots, so that what GRUB
// reads is exactly what the installer would have written.
//
// Usage:
//
//	abenv ENVFILE switch A|B [BOOTLIMIT]  put a slot on trial (bootenv.SwitchVars)
//	abenv ENVFILE commit A|B              make a slot permanent (bootenv.CommitVars)
//	abenv ENVFILE state                   print the contract state as name=value lines
//
// The state lines are gw_slot, upgrade_available (0|1), bootcount,
// bootlimit (the effective limit) and exhausted (0|1).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/gwagent/gwagent/firmware/bootenv"
	"go.uber.org/zap"
)

const usage = "usage: abenv ENVFILE switch A|B [BOOTLIMIT] | commit A|B | state"

var errUsage = errors.New(usage)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "abenv:", err)
		os.Exit(2)
	}
}

func run(ctx context.Context, args []string, out io.Writer) error {
	if len(args) < 2 {
		return errUsage
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()

	log, err := zap.NewDevelopment() // to stderr: stdout is for "state"
	if err != nil {
		return fmt.Errorf("logger: %w", err)
	}
	defer func() { _ = log.Sync() }()

	env, err := bootenv.Open(bootenv.Config{
		Backend: "grub",
		GRUB:    bootenv.GRUBConfig{EnvFile: args[0]},
	}, nil, log)
	if err != nil {
		return err
	}

	switch cmd, rest := args[1], args[2:]; cmd {
	case "switch":
		if len(rest) < 1 || len(rest) > 2 || !bootenv.ValidSlot(rest[0]) {
			return errUsage
		}
		limit := 0
		if len(rest) == 2 {
			if limit, err = strconv.Atoi(rest[1]); err != nil || limit < 1 {
				return fmt.Errorf("bootlimit %q: want a positive number", rest[1])
			}
		}
		return env.Set(ctx, bootenv.SwitchVars(rest[0], limit))
	case "commit":
		if len(rest) != 1 || !bootenv.ValidSlot(rest[0]) {
			return errUsage
		}
		return env.Set(ctx, bootenv.CommitVars(rest[0]))
	case "state":
		if len(rest) != 0 {
			return errUsage
		}
		st, err := bootenv.ReadState(ctx, env)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(out, "%s=%s\n%s=%d\n%s=%d\n%s=%d\nexhausted=%d\n",
			bootenv.VarSlot, st.Slot,
			bootenv.VarUpgradeAvailable, b2i(st.UpgradeAvailable),
			bootenv.VarBootCount, st.BootCount,
			bootenv.VarBootLimit, st.BootLimit,
			b2i(st.Exhausted()))
		return err
	}
	return errUsage
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
