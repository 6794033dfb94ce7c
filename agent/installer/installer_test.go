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
