package config_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/viper"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/installer"
)

const cs = "HostName=hub.example.net;DeviceId=gw-01;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

// The shipped files load, and configs/gwagent.yaml documents every key: with
// its commented-out keys uncommented it sets every key there is.
func TestShippedConfigs(t *testing.T) {
	t.Setenv("GWAGENT_HUB_CONNECTIONSTRING", cs)
	for _, f := range []string{"gwagent.yaml", "dev.yaml"} {
		c, err := config.Load(config.Options{File: filepath.Join("..", "..", "configs", f), Backends: installer.Specs()})
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if c.Hub.ConnectionString.DeviceID != "gw-01" {
			t.Fatalf("%s: %+v", f, c.Hub)
		}
	}

	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "gwagent.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	uncomment := regexp.MustCompile(`(?m)^(\s*)# (\s*[A-Za-z0-9]+:.*)$`)
	full := uncomment.ReplaceAllString(string(b), "$1$2")
	p := filepath.Join(t.TempDir(), "full.yaml")
	if err := os.WriteFile(p, []byte(full), 0o600); err != nil {
		t.Fatal(err)
	}
	v := viper.New()
	v.SetConfigFile(p)
	if err := v.ReadInConfig(); err != nil {
		t.Fatalf("uncommented gwagent.yaml: %v\n%s", err, full)
	}
	want := config.Keys()
	for _, bk := range installer.Specs() {
		want = append(want, flatKeys("installer."+bk.Name, bk.Defaults)...)
	}
	for _, k := range want {
		if !v.IsSet(k) {
			t.Errorf("configs/gwagent.yaml does not document %s", k)
		}
	}
	// And the documented defaults are the real ones.
	for _, k := range config.Keys() {
		def, _ := config.Default(k)
		if got := v.Get(k); k != "hub.connectionStringFile" && strings.TrimSpace(toString(got)) != toString(def) {
			t.Errorf("%s documented as %q, default is %q", k, toString(got), toString(def))
		}
	}
}

func flatKeys(prefix string, m map[string]any) []string {
	var out []string
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			out = append(out, flatKeys(prefix+"."+k, sub)...)
			continue
		}
		out = append(out, prefix+"."+k)
	}
	return out
}

func toString(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	}
	return strings.TrimSpace(strings.ReplaceAll(strings.ReplaceAll(fmtAny(v), "\n", ""), " ", ""))
}

func fmtAny(v any) string { return strings.TrimSpace(fmt.Sprint(v)) }
