package cli

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func TestDistance(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"", "", 0}, {"abc", "", 3}, {"", "abc", 3}, {"state-dir", "state-dir", 0},
		{"state-dr", "state-dir", 1}, {"statedir", "state-dir", 1}, {"kitten", "sitting", 3},
		{"sha265", "sha256", 2},
	} {
		if got := distance(c.a, c.b); got != c.want {
			t.Errorf("distance(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := distance(c.b, c.a); got != c.want {
			t.Errorf("distance(%q, %q) = %d, want %d", c.b, c.a, got, c.want)
		}
	}
}

func TestSuggestFlags(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	for _, n := range []string{"state-dir", "connect-timeout", "connection-string", "ca-file", "uri", "secret"} {
		fs.String(n, "", "")
	}
	fs.String("hidden-dir", "", "")
	_ = fs.MarkHidden("hidden-dir")
	for _, c := range []struct {
		typed string
		want  []string
	}{
		{"state-dr", []string{"state-dir"}},
		{"StateDir", []string{"state-dir"}},
		{"--state-dir", []string{"state-dir"}},
		{"state", []string{"state-dir"}},           // a prefix
		{"state-directory", []string{"state-dir"}}, // a flag is a prefix of it
		{"connect", []string{"connect-timeout", "connection-string"}},
		{"ur", []string{"uri"}},
		{"hidden-dr", nil}, // hidden flags are not offered
		{"x", nil},         // too short to guess
		{"frobnicate", nil},
	} {
		if got := SuggestFlags(fs, c.typed); !slices.Equal(got, c.want) {
			t.Errorf("SuggestFlags(%q) = %q, want %q", c.typed, got, c.want)
		}
	}
}

func TestOrList(t *testing.T) {
	for _, c := range []struct {
		in   []string
		want string
	}{
		{[]string{"a"}, "--a"}, {[]string{"a", "b"}, "--a or --b"}, {[]string{"a", "b", "c"}, "--a, --b or --c"},
	} {
		if got := orList(c.in, "--"); got != c.want {
			t.Errorf("orList(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// tree is a small program: tool group leaf [--name N] (--need required),
// tool solo (no arguments).
func tree() (*cobra.Command, *bytes.Buffer) {
	root := &cobra.Command{Use: "tool", SilenceErrors: true, SilenceUsage: true}
	group := &cobra.Command{Use: "group"}
	leaf := &cobra.Command{Use: "leaf", RunE: func(*cobra.Command, []string) error { return nil }}
	leaf.Flags().String("name", "", "")
	leaf.Flags().String("need", "", "")
	_ = leaf.MarkFlagRequired("need")
	solo := &cobra.Command{Use: "solo", Args: cobra.NoArgs, RunE: func(*cobra.Command, []string) error { return nil }}
	group.AddCommand(leaf)
	root.AddCommand(group, solo)
	Setup(root)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	return root, &out
}

func TestSetup(t *testing.T) {
	for _, c := range []struct {
		args  []string
		usage bool
		want  string
	}{
		{[]string{"group", "leaf", "--need", "x"}, false, ""},
		{[]string{"grop", "leaf"}, true, `unknown command "grop" for "tool"; did you mean group?`},
		{[]string{"group", "lef"}, true, `unknown command "lef" for "tool group"; did you mean leaf?`},
		{[]string{"group", "zzz"}, true, `unknown command "zzz" for "tool group" (see tool group --help)`},
		{[]string{"group", "leaf", "--need", "x", "--nme", "y"}, true, "unknown flag: --nme; did you mean --name or --need?"},
		{[]string{"group", "leaf", "--need", "x", "-name", "y"}, true, "did you mean --name?"},
		{[]string{"group", "leaf", "--need", "x", "--zzz"}, true, "unknown flag: --zzz (see tool group leaf --help)"},
		{[]string{"group", "leaf"}, true, `required flag(s) "need" not set`},
		{[]string{"solo", "extra"}, true, `unknown command "extra" for "tool solo" (see tool solo --help)`},
		{[]string{"solo", "--flag"}, true, "unknown flag: --flag"},
	} {
		root, _ := tree()
		root.SetArgs(c.args)
		err := root.Execute()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("tool %s: %v", strings.Join(c.args, " "), err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("tool %s: %v, want %q", strings.Join(c.args, " "), err, c.want)
		case IsUsage(err) != c.usage:
			t.Errorf("tool %s: IsUsage(%v) = %v", strings.Join(c.args, " "), err, IsUsage(err))
		}
	}

	// A group alone shows its help; a run error is not a usage error.
	root, out := tree()
	root.SetArgs([]string{"group"})
	if err := root.Execute(); err != nil || !strings.Contains(out.String(), "Available Commands:") {
		t.Errorf("tool group: %v\n%s", err, out)
	}
	if IsUsage(errors.New("boom")) {
		t.Error("a plain error is a usage error")
	}
}
