// Package cli is what the command lines of gwagent, gwctl and gwhub share:
// a mistake in the command line (an unknown flag or subcommand, a missing
// argument) is a UsageError, which the programs exit with 64 (EX_USAGE), and
// its message suggests what the person probably meant ("did you mean
// --state-dir?"). It knows nothing of IoT Hub or of any one program.
package cli

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// ExitUsage is EX_USAGE from sysexits.h: the command line was wrong.
const ExitUsage = 64

// UsageError is a mistake in the command line.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef returns a UsageError with a formatted message.
func Usagef(format string, args ...any) error {
	return &UsageError{Err: fmt.Errorf(format, args...)}
}

// IsUsage reports whether err is (or wraps) a UsageError.
func IsUsage(err error) bool {
	var ue *UsageError
	return errors.As(err, &ue)
}

// maxDistance is how far (in edits) a typed name may be from a known one to
// be suggested, as cobra's own suggestions for subcommands.
const maxDistance = 2

// Setup makes every mistake in root's command tree a UsageError that names
// the fix: unknown flags get "did you mean --X?", unknown subcommands get
// cobra's suggestions at every level (cobra checks only the root's), and
// argument counts refused by a command's Args and missing required flags
// become usage errors. Call it once the tree is complete.
func Setup(root *cobra.Command) {
	root.SetFlagErrorFunc(FlagError)
	walk(root, func(c *cobra.Command) {
		c.SuggestionsMinimumDistance = maxDistance
		if c.HasSubCommands() {
			if c.Args == nil {
				c.Args = subcommandArgs
			}
			// A group is only a name for its subcommands; made runnable so
			// that cobra validates its arguments instead of printing help
			// for a mistyped subcommand and exiting 0.
			if c.Run == nil && c.RunE == nil {
				c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
			}
		}
		if c.Runnable() {
			// cobra checks required flags and flag groups after the
			// pre-run hooks, with plain errors; checked here first, a
			// missing --uri is a usage error like an unknown one.
			preE, pre := c.PreRunE, c.PreRun
			c.PreRun = nil
			c.PreRunE = func(cmd *cobra.Command, args []string) error {
				if err := cmd.ValidateRequiredFlags(); err != nil {
					return &UsageError{Err: err}
				}
				if err := cmd.ValidateFlagGroups(); err != nil {
					return &UsageError{Err: err}
				}
				switch {
				case preE != nil:
					return preE(cmd, args)
				case pre != nil:
					pre(cmd, args)
				}
				return nil
			}
		}
		if c.Args != nil {
			args := c.Args
			c.Args = func(cmd *cobra.Command, a []string) error {
				err := args(cmd, a)
				if err == nil || IsUsage(err) {
					return err
				}
				return &UsageError{Err: fmt.Errorf("%w (see %s --help)", err, cmd.CommandPath())}
			}
		}
	})
}

func walk(c *cobra.Command, f func(*cobra.Command)) {
	f(c)
	for _, sub := range c.Commands() {
		walk(sub, f)
	}
}

// subcommandArgs refuses anything that is not one of cmd's subcommands.
func subcommandArgs(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	s := cmd.SuggestionsFor(args[0])
	slices.SortStableFunc(s, func(a, b string) int {
		return distance(strings.ToLower(args[0]), a) - distance(strings.ToLower(args[0]), b)
	})
	if len(s) > 0 {
		msg += "; did you mean " + orList(s, "") + "?"
	} else {
		msg += fmt.Sprintf(" (see %s --help)", cmd.CommandPath())
	}
	return &UsageError{Err: errors.New(msg)}
}

// FlagError is a cobra flag error function: it turns a flag parse error
// into a UsageError and, for an unknown flag, suggests the nearest flags of
// the command.
func FlagError(cmd *cobra.Command, err error) error {
	msg := err.Error()
	var ne *pflag.NotExistError
	if errors.As(err, &ne) {
		if s := SuggestFlags(cmd.Flags(), typedFlag(ne)); len(s) > 0 {
			msg += "; did you mean " + orList(s, "--") + "?"
		} else {
			msg += fmt.Sprintf(" (see %s --help)", cmd.CommandPath())
		}
	}
	return &UsageError{Err: errors.New(msg)}
}

// typedFlag is the long name a person meant by an unknown flag: the name of
// --name, or the whole group of -name (a long flag written with one dash,
// as Go's flag package allows).
func typedFlag(ne *pflag.NotExistError) string {
	if group := ne.GetSpecifiedShortnames(); group != "" {
		if len(group) == 1 {
			return "" // a single unknown letter: nothing to go on
		}
		name, _, _ := strings.Cut(group, "=")
		return name
	}
	return ne.GetSpecifiedName()
}

// SuggestFlags returns the names of the visible flags in fs that typed was
// probably meant to be, nearest first: within two edits (ignoring case), or
// a prefix of typed or typed a prefix of it.
func SuggestFlags(fs *pflag.FlagSet, typed string) []string {
	typed = strings.ToLower(strings.TrimLeft(typed, "-"))
	if len(typed) < 2 {
		return nil
	}
	type cand struct {
		name string
		d    int
	}
	var cands []cand
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Hidden || f.Deprecated != "" {
			return
		}
		name := strings.ToLower(f.Name)
		d := distance(typed, name)
		prefix := len(typed) >= 3 && (strings.HasPrefix(name, typed) || strings.HasPrefix(typed, name))
		if d <= maxDistance || prefix {
			cands = append(cands, cand{f.Name, d})
		}
	})
	slices.SortStableFunc(cands, func(a, b cand) int {
		if a.d != b.d {
			return a.d - b.d
		}
		return strings.Compare(a.name, b.name)
	})
	out := make([]string, len(cands))
	for i, c := range cands {
		out[i] = c.name
	}
	return out
}

// orList writes "a", "a or b", "a, b or c" with each name after prefix.
func orList(names []string, prefix string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = prefix + n
	}
	if len(q) == 1 {
		return q[0]
	}
	return strings.Join(q[:len(q)-1], ", ") + " or " + q[len(q)-1]
}

// distance is the Levenshtein distance between a and b (in bytes: flag
// names are ASCII).
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
