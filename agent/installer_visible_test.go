package agent

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"aead.dev/minisign"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/internal/testutil"
)

// The installer in use is on the status line (systemctl status) and on the
// twin (agent.installer), and the start says what makes updates do less
// than a person would assume: the simulated installer writes nothing, and
// required signatures with no key refuse every update.
func TestInstallerVisible(t *testing.T) {
	trial := newTrialDevice(t)
	emptyKeys := t.TempDir()
	keys := t.TempDir()
	pub, _, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	text, err := pub.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(keys, "release.pub"), text, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(emptyKeys, "README"), []byte("keys go here\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	const simulatedWarning = "the simulated installer is in use: firmware updates write nothing to the device"
	cases := []struct {
		name      string
		sections  map[string]string
		installer string
		status    string
		warnings  []string // that must be logged
		quiet     []string // that must not
	}{
		{name: "simulated, unsigned allowed", installer: "simulated",
			status:   "; installer simulated (writes nothing to the device)",
			warnings: []string{simulatedWarning}, quiet: []string{"no public key"}},
		{name: "abpart, signatures required, no key", installer: "abpart",
			sections: map[string]string{"installer": trial.section, "signature": "signature:\n  keyDir: " + emptyKeys + "\n"},
			status:   "; installer abpart",
			warnings: []string{"no public key to check firmware signatures against in " + emptyKeys + " (signature.keyDir)", "an update without signatureUri is refused (400)"},
			quiet:    []string{simulatedWarning}},
		{name: "abpart, signatures required, a key", installer: "abpart",
			sections: map[string]string{"installer": trial.section, "signature": "signature:\n  keyDir: " + keys + "\n"},
			status:   "; installer abpart",
			quiet:    []string{simulatedWarning, "no public key"}},
		{name: "simulated, signatures required, folder missing", installer: "simulated",
			sections: map[string]string{"signature": "signature:\n  allowUnsigned: false\n  keyDir: " + filepath.Join(keys, "missing") + "\n"},
			status:   "; installer simulated (writes nothing to the device)",
			warnings: []string{simulatedWarning, "no public key to check firmware signatures against in " + filepath.Join(keys, "missing")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			cfg := loadConfig(t, e.yaml(tc.sections))
			if cfg.Installer.Type != tc.installer {
				t.Fatalf("installer.type %s, want %s", cfg.Installer.Type, tc.installer)
			}
			logs, observed := observer.New(zapcore.WarnLevel)
			r := start(t, cfg, func(o *Options) { o.Log = zap.New(zapcore.NewTee(o.Log.Core(), logs)) })
			testutil.Eventually(t, wait, "connected and the start-up report", func() bool {
				rep := e.reportedNow(t)
				return r.Session().Health().Connected && rep["firmwareStatus"] == "standBy"
			})
			if got := field(e.reportedNow(t), "agent", "installer"); got != tc.installer {
				t.Errorf("reported agent.installer %v, want %s", got, tc.installer)
			}
			want := "STATUS=connected to localhost; idle" + tc.status
			testutil.Eventually(t, wait, "the status line "+want, func() bool { return r.notifier.count(want) > 0 })
			var logged []string
			for _, l := range observed.All() {
				logged = append(logged, l.Message)
			}
			all := strings.Join(logged, "\n")
			for _, w := range tc.warnings {
				if !strings.Contains(all, w) {
					t.Errorf("no warning with %q in\n%s", w, all)
				}
			}
			for _, q := range tc.quiet {
				if strings.Contains(all, q) {
					t.Errorf("a warning with %q in\n%s", q, all)
				}
			}
		})
	}
}
