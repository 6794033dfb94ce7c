package installer

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/abpart"
	"github.com/gwagent/gwagent/firmware/simulated"
)

// settings are a backend's defaults with some keys changed, as config.Load
// hands them on.
func settings(name string, set map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range backends[name].defaults {
		out[k] = v
	}
	for k, v := range set {
		out[k] = v
	}
	return out
}

func TestBuildSimulated(t *testing.T) {
	dir := t.TempDir()
	b, err := Build(config.Installer{Type: "simulated", Settings: settings("simulated", map[string]any{"apply": "1s", "simulatedSize": "2048"})}, Deps{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := b.Installer.(*simulated.Installer); !ok {
		t.Fatalf("installer %T", b.Installer)
	}
	if _, ok := b.Rebooter.(*simulated.Rebooter); !ok {
		t.Fatalf("rebooter %T", b.Rebooter)
	}
	// The simulated installer must not reboot as part of an update.
	if _, ok := b.Installer.(firmware.Rebooter); ok {
		t.Fatal("simulated installer claims to need reboots")
	}
}

func TestBuildABPartOnFiles(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"a.img", "b.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := filepath.Join(dir, "bootenv")
	if err := os.WriteFile(env, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := Build(config.Installer{Type: "abpart", Settings: settings("abpart", map[string]any{
		"slotA": filepath.Join(dir, "a.img"), "slotB": filepath.Join(dir, "b.img"), "slotType": "file", "runningSlot": "A",
		"bootenv": map[string]any{"backend": "file", "file": map[string]any{"path": env}},
	})}, Deps{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := b.Installer.(*abpart.Installer); !ok {
		t.Fatalf("installer %T", b.Installer)
	}
	if b.Rebooter != b.Installer.(firmware.Rebooter) {
		t.Fatal("abpart must reboot through its own seam")
	}
}

// Inspect reads each backend's view and creates nothing in the state
// folder, where Build creates the backend's own.
func TestInspect(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"a.img", "b.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := filepath.Join(dir, "bootenv")
	if err := os.WriteFile(env, []byte("gw_slot=A\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	ab := config.Installer{Type: "abpart", Settings: settings("abpart", map[string]any{
		"slotA": filepath.Join(dir, "a.img"), "slotB": filepath.Join(dir, "b.img"), "slotType": "file", "runningSlot": "A",
		"bootenv": map[string]any{"backend": "file", "file": map[string]any{"path": env}},
	})}
	v, err := Inspect(t.Context(), ab, Deps{StateDir: state})
	if err != nil || v.AB == nil || v.AB.Running != "A" || v.AB.Env.Slot != "A" || !v.AB.Slots[0].Committed || v.Version != "" {
		t.Fatalf("abpart: %+v, %v", v, err)
	}
	sim := config.Installer{Type: "simulated", Settings: settings("simulated", map[string]any{"initialVersion": "3.1.0"})}
	if v, err := Inspect(t.Context(), sim, Deps{StateDir: state}); err != nil || v.Version != "3.1.0" || v.AB != nil {
		t.Fatalf("simulated: %+v, %v", v, err)
	}
	if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Inspect created %s: %v", state, err)
	}
	// A slot that is gone is state that cannot be read, not a bad config.
	if err := os.Remove(filepath.Join(dir, "b.img")); err != nil {
		t.Fatal(err)
	}
	if _, err := Inspect(t.Context(), ab, Deps{StateDir: state}); err == nil || errors.Is(err, config.ErrConfig) {
		t.Fatalf("abpart with slot B gone: %v", err)
	}
	for _, bad := range []config.Installer{
		{Type: "rauc"},
		{Type: "simulated", Settings: settings("simulated", map[string]any{"speed": 3})},
		{Type: "abpart", Settings: settings("abpart", map[string]any{"bootenv": map[string]any{"backend": "lilo"}})},
	} {
		if _, err := Inspect(t.Context(), bad, Deps{StateDir: state}); !errors.Is(err, config.ErrConfig) {
			t.Errorf("%s %v: %v, want a config error", bad.Type, bad.Settings, err)
		}
	}
}

func TestBuildErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name string
		in   config.Installer
		want string
	}{
		{"unknown backend", config.Installer{Type: "rauc"}, `installer.type: unknown installer "rauc" (known: abpart, simulated)`},
		{"duration without unit", config.Installer{Type: "simulated", Settings: settings("simulated", map[string]any{"apply": 15})}, "config: installer.simulated.apply: 15 has no unit (write e.g. 15s)"},
		{"bad duration", config.Installer{Type: "simulated", Settings: settings("simulated", map[string]any{"download": "soon"})}, `config: installer.simulated.download: "soon" is not a duration`},
		{"bad stage", config.Installer{Type: "simulated", Settings: settings("simulated", map[string]any{"failAt": "never"})}, "installer.simulated: simulated: failAt"},
		{"unknown key", config.Installer{Type: "simulated", Settings: settings("simulated", map[string]any{"speed": 3})}, "config: installer.simulated: unknown key speed"},
		{"abpart without slots", config.Installer{Type: "abpart", Settings: settings("abpart", map[string]any{"bootenv": map[string]any{"backend": "file", "file": map[string]any{"path": "/nonexistent"}}})}, "installer.abpart:"},
		{"abpart bad bootenv", config.Installer{Type: "abpart", Settings: settings("abpart", map[string]any{"bootenv": map[string]any{"backend": "lilo"}})}, "installer.abpart.bootenv:"},
		{"abpart empty reboot command", config.Installer{Type: "abpart", Settings: settings("abpart", map[string]any{"rebootCommand": " ", "bootenv": map[string]any{"backend": "file", "file": map[string]any{"path": "/x"}}})}, "installer.abpart.rebootCommand"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Build(tc.in, Deps{StateDir: t.TempDir()})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, config.ErrConfig) {
				t.Fatalf("err = %v, want ErrConfig containing %q", err, tc.want)
			}
		})
	}
}

func TestSpecsMatchNames(t *testing.T) {
	specs := Specs()
	if len(specs) != len(Names()) {
		t.Fatalf("%d specs for %v", len(specs), Names())
	}
	for i, s := range specs {
		if s.Name != Names()[i] || len(s.Defaults) == 0 {
			t.Fatalf("spec %d = %+v", i, s)
		}
	}
}

// partlabelDir is a folder laid out as udev's /dev/disk/by-partlabel: one
// link per partition name, to the slot (here a plain file).
func partlabelDir(t *testing.T, links map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "by-partlabel")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for label, target := range links {
		if err := os.Symlink(target, filepath.Join(dir, label)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// With slotA and slotB left empty, as in the shipped configuration, the
// slots are the partitions named rootA and rootB (or labelA and labelB).
func TestBuildABPartFindsSlotsByLabel(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"a.img", "b.img", "c.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := filepath.Join(dir, "bootenv")
	if err := os.WriteFile(env, []byte("gw_slot=A\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	labels := partlabelDir(t, map[string]string{
		"boot": filepath.Join(dir, "c.img"), "rootA": filepath.Join(dir, "a.img"), "rootB": filepath.Join(dir, "b.img"),
		"sysA": filepath.Join(dir, "b.img"), "sysB": filepath.Join(dir, "c.img"),
	})
	cmdline := filepath.Join(dir, "cmdline")
	if err := os.WriteFile(cmdline, []byte("ro root=PARTLABEL=rootA quiet\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	in := func(set map[string]any) config.Installer {
		s := settings("abpart", map[string]any{
			"slotType": "file", "partlabelDir": labels, "cmdlinePath": cmdline,
			"bootenv": map[string]any{"backend": "file", "file": map[string]any{"path": env}},
		})
		for k, v := range set {
			s[k] = v
		}
		return config.Installer{Type: "abpart", Settings: s}
	}
	cases := []struct {
		name string
		set  map[string]any
		a, b string
		runs string
	}{
		{name: "default labels", a: "rootA", b: "rootB", runs: "A"},
		{name: "own labels", set: map[string]any{"labelA": "sysA", "labelB": "sysB"}, a: "sysA", b: "sysB", runs: ""},
		{name: "one slot set, the other by label", set: map[string]any{"slotA": filepath.Join(dir, "c.img")}, b: "rootB", runs: ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Build(in(tc.set), Deps{StateDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			st, err := b.Installer.(*abpart.Installer).Status(t.Context())
			if tc.runs == "" {
				// root=PARTLABEL=rootA names neither slot.
				if !errors.Is(err, abpart.ErrRunningSlot) {
					t.Fatalf("status: %v, want %v", err, abpart.ErrRunningSlot)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if want := filepath.Join(labels, tc.a); st.Slots[0].Path != want {
				t.Errorf("slot A %s, want %s", st.Slots[0].Path, want)
			}
			if want := filepath.Join(labels, tc.b); st.Slots[1].Path != want {
				t.Errorf("slot B %s, want %s", st.Slots[1].Path, want)
			}
			if st.Running != tc.runs {
				t.Errorf("running %s, want %s (root=PARTLABEL=rootA)", st.Running, tc.runs)
			}
		})
	}
	for _, tc := range []struct {
		name string
		set  map[string]any
		want []string
	}{
		{"no partitions labelled", map[string]any{"partlabelDir": filepath.Join(dir, "none")},
			[]string{"abpart.slotA is not set", "abpart.slotB is not set", `"rootA"`, `"rootB"`, filepath.Join(dir, "none", "rootA"), "abpart.labelA"}},
		{"one label missing", map[string]any{"labelB": "rootC"},
			[]string{"abpart.slotB is not set", `no partition is labelled "rootC" (no ` + filepath.Join(labels, "rootC") + ")"}},
		{"a label with a slash", map[string]any{"labelA": "../a.img"}, []string{`the label "../a.img" is not a partition name`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Build(in(tc.set), Deps{StateDir: t.TempDir()})
			if !errors.Is(err, config.ErrConfig) || !errors.Is(err, abpart.ErrNoSlots) {
				t.Fatalf("err = %v, want a config error (exit 78)", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%v\ndoes not say %q", err, w)
				}
			}
			if strings.Contains(tc.name, "one") && strings.Contains(err.Error(), "abpart.slotA is not set") {
				t.Errorf("%v: slot A was found", err)
			}
		})
	}
}
