package bootenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// envSize is the size of one U-Boot environment copy in the tests.
const envSize = 0x4000

func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed by this test (apt-get install grub-common libubootenv-tool u-boot-tools): %v", tool, err)
		}
	}
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// newUBootFile makes a U-Boot environment with mkenvimage and returns its
// fw_env.config and the image path. redundant makes two copies, both
// initially valid (as after a flash), at offsets 0 and envSize.
func newUBootFile(t testing.TB, redundant bool, vars map[string]string) (cfgPath, img string) {
	t.Helper()
	requireTools(t, "mkenvimage", "fw_printenv", "fw_setenv")
	dir := t.TempDir()
	txt := filepath.Join(dir, "vars.txt")
	if err := os.WriteFile(txt, sortedLines(vars), 0o644); err != nil {
		t.Fatal(err)
	}
	img = filepath.Join(dir, "uboot.env")
	cfgLines := fmt.Sprintf("%s 0x0 %#x\n", img, envSize)
	if redundant {
		one := filepath.Join(dir, "one.bin")
		run(t, "mkenvimage", "-r", "-s", fmt.Sprint(envSize), "-o", one, txt)
		b, err := os.ReadFile(one)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(img, append(b, b...), 0o644); err != nil {
			t.Fatal(err)
		}
		cfgLines += fmt.Sprintf("%s %#x %#x\n", img, envSize, envSize)
	} else {
		run(t, "mkenvimage", "-s", fmt.Sprint(envSize), "-o", img, txt)
	}
	cfgPath = filepath.Join(dir, "fw_env.config")
	if err := os.WriteFile(cfgPath, []byte(cfgLines), 0o644); err != nil {
		t.Fatal(err)
	}
	return cfgPath, img
}

func newGRUBFile(t testing.TB, vars map[string]string) string {
	t.Helper()
	requireTools(t, "grub-editenv")
	p := filepath.Join(t.TempDir(), "grubenv")
	run(t, "grub-editenv", p, "create")
	if len(vars) > 0 {
		args := []string{p, "set"}
		for _, k := range slices.Sorted(maps.Keys(vars)) {
			args = append(args, k+"="+vars[k])
		}
		run(t, "grub-editenv", args...)
	}
	return p
}

// recorder is a Runner that records each command and runs it for real.
type recorder struct {
	mu   sync.Mutex
	cmds []string
	next Runner
}

func (r *recorder) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	r.mu.Lock()
	r.cmds = append(r.cmds, filepath.Base(name)+" "+strings.Join(args, " "))
	r.mu.Unlock()
	return r.next.Run(ctx, name, args...)
}

// count returns how many recorded commands contain substr.
func (r *recorder) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.cmds {
		if strings.Contains(c, substr) {
			n++
		}
	}
	return n
}

type backendCase struct {
	name  string
	open  func(t *testing.T, initial map[string]string, run Runner) Env
	write string // what a writing command line contains, "" for none
}

var initialVars = map[string]string{"bootcmd": "run distro_bootcmd", "foo": "bar", "spaced": "a b=c"}

func backendCases() []backendCase {
	openWith := func(t *testing.T, cfg Config, run Runner) Env {
		t.Helper()
		env, err := Open(cfg, run, nil)
		if err != nil {
			t.Fatal(err)
		}
		return env
	}
	return []backendCase{
		{"uboot", func(t *testing.T, v map[string]string, r Runner) Env {
			cfg, _ := newUBootFile(t, false, v)
			return openWith(t, Config{Backend: "uboot", UBoot: UBootConfig{ConfigFile: cfg, ScriptDir: t.TempDir()}}, r)
		}, "fw_setenv "},
		{"uboot-redundant", func(t *testing.T, v map[string]string, r Runner) Env {
			cfg, _ := newUBootFile(t, true, v)
			return openWith(t, Config{Backend: "uboot", UBoot: UBootConfig{ConfigFile: cfg}}, r)
		}, "fw_setenv "},
		{"grub", func(t *testing.T, v map[string]string, r Runner) Env {
			return openWith(t, Config{Backend: "grub", GRUB: GRUBConfig{EnvFile: newGRUBFile(t, v)}}, r)
		}, "grubenv set "},
		{"file", func(t *testing.T, v map[string]string, r Runner) Env {
			p := filepath.Join(t.TempDir(), "bootenv")
			if err := os.WriteFile(p, sortedLines(v), 0o644); err != nil {
				t.Fatal(err)
			}
			return openWith(t, Config{Backend: "file", File: FileConfig{Path: p}}, r)
		}, ""},
	}
}

func TestBackendsGetSet(t *testing.T) {
	ctx := t.Context()
	for _, bc := range backendCases() {
		t.Run(bc.name, func(t *testing.T) {
			rec := &recorder{next: ExecRunner{}}
			env := bc.open(t, initialVars, rec)

			all, err := env.Get(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(all, initialVars) {
				t.Fatalf("Get() = %v, want %v", all, initialVars)
			}
			got, err := env.Get(ctx, "foo", "missing", "spaced")
			if err != nil {
				t.Fatal(err)
			}
			if want := map[string]string{"foo": "bar", "spaced": "a b=c"}; !maps.Equal(got, want) {
				t.Fatalf("Get(foo, missing, spaced) = %v, want %v (a missing name must be absent)", got, want)
			}

			// One Set: new values, an overwrite, a delete, awkward characters.
			vars := SwitchVars(SlotB, 3)
			vars["foo"] = ""
			vars["odd"] = `x\y #$;'" =`
			if err := env.Set(ctx, vars); err != nil {
				t.Fatal(err)
			}
			if bc.write != "" && rec.count(bc.write) != 1 {
				t.Fatalf("%d %s runs for one Set, want exactly one write: %q", rec.count(bc.write), bc.write, rec.cmds)
			}
			got, err = env.Get(ctx)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{
				"bootcmd": "run distro_bootcmd", "spaced": "a b=c", "odd": `x\y #$;'" =`,
				VarSlot: SlotB, VarUpgradeAvailable: "1", VarBootCount: "0", VarBootLimit: "3",
			}
			if !maps.Equal(got, want) {
				t.Fatalf("after Set: Get() = %v\nwant %v", got, want)
			}
			st, err := ReadState(ctx, env)
			if err != nil {
				t.Fatal(err)
			}
			if want := (State{Slot: SlotB, UpgradeAvailable: true, BootCount: 0, BootLimit: 3}); st != want {
				t.Fatalf("ReadState = %+v, want %+v", st, want)
			}
		})
	}
}

func TestSetRejectsBadVariables(t *testing.T) {
	for _, bc := range backendCases() {
		t.Run(bc.name, func(t *testing.T) {
			rec := &recorder{next: ExecRunner{}}
			env := bc.open(t, initialVars, rec)
			for _, vars := range []map[string]string{
				nil,
				{"": "x"},
				{"a=b": "x"},
				{"with space": "x"},
				{"ok": "line\nbreak"},
				{"ok": "nul\x00"},
				{"ok": "1", "bad-name": "2"},
			} {
				if err := env.Set(t.Context(), vars); !errors.Is(err, ErrInvalid) {
					t.Errorf("Set(%q) = %v, want ErrInvalid", vars, err)
				}
			}
			if bc.write != "" && rec.count(bc.write) != 0 {
				t.Fatalf("rejected Set ran %s: %q", bc.write, rec.cmds)
			}
			if got, err := env.Get(t.Context()); err != nil || !maps.Equal(got, initialVars) {
				t.Fatalf("environment changed by rejected Sets: %v, %v", got, err)
			}
		})
	}
}

func TestUBootCorrupted(t *testing.T) {
	cfg, img := newUBootFile(t, false, initialVars)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	b[10] ^= 0xff // inside the data: the CRC no longer matches
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	env, err := Open(Config{Backend: "uboot", UBoot: UBootConfig{ConfigFile: cfg}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = env.Get(t.Context())
	var te *ToolError
	if !errors.As(err, &te) || !errors.Is(err, ErrTool) {
		t.Fatalf("Get on a bad CRC = %v, want a *ToolError", err)
	}
	if te.ExitCode != 243 || !strings.Contains(te.Stderr, "Cannot read environment") {
		t.Fatalf("exit %d stderr %q, want 243 and libubootenv's message", te.ExitCode, te.Stderr)
	}
	for _, s := range []string{"fw_printenv", "exit code 243", "Cannot read environment", cfg} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
	if err := env.Set(t.Context(), CommitVars(SlotA)); !errors.As(err, &te) || te.ExitCode != 243 || !strings.Contains(err.Error(), "fw_setenv") {
		t.Fatalf("Set on a bad CRC = %v, want fw_setenv exit 243", err)
	}
	after, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after, b) {
		t.Fatal("a failed fw_setenv changed the corrupted environment")
	}
}

// TestUBootRedundant checks that each Set writes one copy (the older one)
// and that a copy torn by a power cut leaves the previous environment.
func TestUBootRedundant(t *testing.T) {
	ctx := t.Context()
	cfg, img := newUBootFile(t, true, initialVars)
	env, err := Open(Config{Backend: "uboot", UBoot: UBootConfig{ConfigFile: cfg}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	read := func() []byte {
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	before := read()
	if err := env.Set(ctx, CommitVars(SlotA)); err != nil {
		t.Fatal(err)
	}
	mid := read()
	if err := env.Set(ctx, SwitchVars(SlotB, 0)); err != nil {
		t.Fatal(err)
	}
	after := read()
	changed := func(a, b []byte) (n int, which int) {
		for i := range 2 {
			if !bytes.Equal(a[i*envSize:(i+1)*envSize], b[i*envSize:(i+1)*envSize]) {
				n++
				which = i
			}
		}
		return n, which
	}
	n1, c1 := changed(before, mid)
	n2, c2 := changed(mid, after)
	if n1 != 1 || n2 != 1 || c1 == c2 {
		t.Fatalf("copies changed: %d (copy %d) then %d (copy %d); want one copy per Set, alternating", n1, c1, n2, c2)
	}
	// A power cut while the newest copy was written: its CRC is bad, so the
	// tools (and U-Boot) use the older copy, the environment before that Set.
	after[c2*envSize+envSize/2] ^= 0xff
	after[c2*envSize+8] ^= 0xff
	if err := os.WriteFile(img, after, 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := ReadState(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	if want := (State{Slot: SlotA, BootLimit: DefaultBootLimit}); st != want {
		t.Fatalf("after tearing the newest copy: %+v, want the previous state %+v", st, want)
	}
}

func TestGRUBCorruptedAndMissing(t *testing.T) {
	requireTools(t, "grub-editenv")
	p := filepath.Join(t.TempDir(), "grubenv")
	if err := os.WriteFile(p, []byte("not an environment block"), 0o644); err != nil {
		t.Fatal(err)
	}
	env, err := Open(Config{Backend: "grub", GRUB: GRUBConfig{EnvFile: p}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = env.Get(t.Context())
	var te *ToolError
	if !errors.As(err, &te) || te.ExitCode != 1 || !strings.Contains(err.Error(), "grub-editenv") ||
		!strings.Contains(err.Error(), "invalid environment block") {
		t.Fatalf("Get on a corrupted grubenv = %v", err)
	}
	if err := env.Set(t.Context(), CommitVars(SlotA)); !errors.As(err, &te) {
		t.Fatalf("Set on a corrupted grubenv = %v, want a tool error", err)
	}

	missing := filepath.Join(t.TempDir(), "grubenv")
	env, err = Open(Config{Backend: "grub", GRUB: GRUBConfig{EnvFile: missing}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Get(t.Context()); !errors.Is(err, ErrConfig) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Get on a missing grubenv = %v, want ErrConfig wrapping ErrNotExist", err)
	}
	if err := env.Set(t.Context(), CommitVars(SlotA)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Set on a missing grubenv = %v", err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a missing grubenv was created: %v", err)
	}
}

func TestMissingTool(t *testing.T) {
	dir := t.TempDir()
	cfg, _ := newUBootFile(t, false, initialVars)
	grubenv := newGRUBFile(t, nil)
	cases := []struct {
		name, tool, hint string
		cfg              Config
		env              func(t *testing.T)
	}{
		{"uboot path", "nope-printenv", "", Config{Backend: "uboot", UBoot: UBootConfig{ConfigFile: cfg, PrintenvPath: filepath.Join(dir, "nope-printenv")}}, nil},
		{"uboot PATH", "fw_printenv", "libubootenv-tool", Config{Backend: "uboot", UBoot: UBootConfig{ConfigFile: cfg}}, func(t *testing.T) { t.Setenv("PATH", dir) }},
		{"grub PATH", "grub-editenv", "grub-common", Config{Backend: "grub", GRUB: GRUBConfig{EnvFile: grubenv}}, func(t *testing.T) { t.Setenv("PATH", dir) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != nil {
				tc.env(t)
			}
			env, err := Open(tc.cfg, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = env.Get(t.Context())
			if !errors.Is(err, ErrToolNotFound) || !strings.Contains(err.Error(), tc.tool) {
				t.Fatalf("Get = %v, want ErrToolNotFound naming %s", err, tc.tool)
			}
			if tc.hint != "" && !strings.Contains(err.Error(), "install "+tc.hint) {
				t.Fatalf("error %q does not say to install %s", err, tc.hint)
			}
		})
	}
}

func TestToolTimeout(t *testing.T) {
	script := filepath.Join(t.TempDir(), "hang")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho stuck on a lock >&2\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	env, err := Open(Config{Backend: "grub", GRUB: GRUBConfig{EnvFile: newGRUBFile(t, nil), EditenvPath: script}},
		ExecRunner{Timeout: 300 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = env.Get(t.Context())
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer within 300ms") ||
		!strings.Contains(err.Error(), "stuck on a lock") {
		t.Fatalf("Get with a hanging tool = %v", err)
	}
}

func TestUnknownBackend(t *testing.T) {
	_, err := Open(Config{Backend: "lilo"}, nil, nil)
	if !errors.Is(err, ErrUnknownBackend) || !strings.Contains(err.Error(), "bootenv.backend") ||
		!strings.Contains(err.Error(), "file, grub, uboot") {
		t.Fatalf("Open(lilo) = %v", err)
	}
	if _, err := Open(Config{Backend: "file"}, nil, nil); !errors.Is(err, ErrConfig) {
		t.Fatalf("file backend without a path = %v, want ErrConfig", err)
	}
}

func TestFileBackend(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	p := filepath.Join(dir, "env")
	env, err := Open(Config{Backend: "file", File: FileConfig{Path: p}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Missing and empty files are an empty environment.
	if got, err := env.Get(ctx); err != nil || len(got) != 0 {
		t.Fatalf("missing file: %v, %v", got, err)
	}
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := env.Get(ctx); err != nil || len(got) != 0 {
		t.Fatalf("empty file: %v, %v", got, err)
	}
	if err := env.Set(ctx, SwitchVars(SlotA, 0)); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if want := "bootcount=0\ngw_slot=A\nupgrade_available=1\n"; string(b) != want {
		t.Fatalf("file = %q, want %q", b, want)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
	if err := os.WriteFile(p, []byte("=nameless\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := env.Get(ctx); !errors.Is(err, ErrParse) {
		t.Fatalf("garbage file: %v, want ErrParse", err)
	}
}

func TestReadState(t *testing.T) {
	cases := []struct {
		name string
		vars string
		want State
		err  error
	}{
		{"never switched", "", State{BootLimit: 3}, nil},
		{"committed", "gw_slot=A\nupgrade_available=0\n", State{Slot: "A", BootLimit: 3}, nil},
		{"trial", "gw_slot=B\nupgrade_available=1\nbootcount=2\nbootlimit=2\n", State{Slot: "B", UpgradeAvailable: true, BootCount: 2, BootLimit: 2}, nil},
		{"bad slot", "gw_slot=C\n", State{}, ErrContract},
		{"bad flag", "upgrade_available=yes\n", State{}, ErrContract},
		{"hex count", "bootcount=0xa\n", State{}, ErrContract},
		{"negative limit", "bootlimit=-1\n", State{}, ErrContract},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "env")
			if err := os.WriteFile(p, []byte(tc.vars), 0o644); err != nil {
				t.Fatal(err)
			}
			env, err := Open(Config{Backend: "file", File: FileConfig{Path: p}}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			st, err := ReadState(t.Context(), env)
			if !errors.Is(err, tc.err) || st != tc.want {
				t.Fatalf("ReadState = %+v, %v; want %+v, %v", st, err, tc.want, tc.err)
			}
		})
	}
	if !(State{UpgradeAvailable: true, BootCount: 4, BootLimit: 3}).Exhausted() ||
		(State{UpgradeAvailable: true, BootCount: 3, BootLimit: 3}).Exhausted() ||
		(State{BootCount: 9, BootLimit: 3}).Exhausted() {
		t.Fatal("Exhausted: wrong verdict")
	}
}

func TestParseLines(t *testing.T) {
	cases := []struct {
		in   string
		want map[string]string
		err  bool
	}{
		{"", map[string]string{}, false},
		{"a=1\nb=\nc=x=y\n", map[string]string{"a": "1", "b": "", "c": "x=y"}, false},
		{"a=1\n\nb=2", map[string]string{"a": "1", "b": "2"}, false},
		{"a=line1\nline2\nb=2\n", map[string]string{"a": "line1\nline2", "b": "2"}, false},
		{"a=1\na=2\n", map[string]string{"a": "2"}, false},
		{"orphan\n", nil, true},
		{"=x\n", nil, true},
	}
	for _, tc := range cases {
		got, err := parseLines([]byte(tc.in))
		if (err != nil) != tc.err || (!tc.err && !maps.Equal(got, tc.want)) {
			t.Errorf("parseLines(%q) = %v, %v; want %v (error %v)", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// FuzzParseLines feeds fw_printenv / grub-editenv list output (and the file
// backend's format) to the parser.
func FuzzParseLines(f *testing.F) {
	f.Add([]byte("bootcmd=run distro_bootcmd\nbootcount=0\ngw_slot=B\nupgrade_available=1\n"))
	f.Add([]byte("b=x y\nc=p=q\nd=line1\nline2\n"))
	f.Add([]byte("missing=\n"))
	f.Add([]byte("\n\n=\n\x00=\x00\n"))
	f.Fuzz(func(t *testing.T, out []byte) {
		vars, err := parseLines(out)
		if err != nil {
			if !errors.Is(err, ErrParse) {
				t.Fatalf("error %v does not wrap ErrParse", err)
			}
			return
		}
		for k, v := range vars {
			if k == "" || strings.ContainsAny(k, "=\n \t\x00") {
				t.Fatalf("bad name %q", k)
			}
			if strings.Contains(v, "\n") {
				return // multi-line values do not survive a re-render; nothing more to check
			}
		}
		again, err := parseLines(sortedLines(vars))
		if err != nil || !maps.Equal(again, vars) {
			t.Fatalf("re-parse of %q = %v, %v; want %v", sortedLines(vars), again, err, vars)
		}
	})
}
