package agent

import (
	"fmt"
	"testing"

	"github.com/gwagent/gwagent/internal/testutil"
)

// TestAllowedHostsAnswer400: with update.allowedHosts, firmwareUpdate for
// an image on another host is answered 400 naming the field, the host and
// the key, and nothing starts.
func TestAllowedHostsAnswer400(t *testing.T) {
	e := newEnv(t)
	rest := fmt.Sprintf("stateDir: %q\nshutdownTimeout: 3s\nupdate:\n  allowedHosts: [fw.example.com, \"*.cdn.example.com\"]\n", e.stateDir)
	r := start(t, loadConfig(t, e.yaml(map[string]string{"rest": rest})))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"https://fw.example.net/gw-2.0.0.img","version":"2.0.0"}`)
	msg, _ := decodeBody(t, res.Payload)["error"].(string)
	want := `fwPackageUri: host "fw.example.net" is not an allowed download host (update.allowedHosts: fw.example.com, *.cdn.example.com)`
	if res.Status != 400 || msg != want {
		t.Fatalf("firmwareUpdate = %d %s, want 400 %q", res.Status, res.Payload, want)
	}
	if st := r.manager.Status(); st.Busy {
		t.Fatalf("an update started: %+v", st)
	}
}

// TestFormatCharactersAnswer400: a version (or URL) with a bidirectional
// override or another invisible character is refused with 400 naming the
// field and the code point; nothing starts and nothing reaches the twin.
func TestFormatCharactersAnswer400(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	for payload, want := range map[string]string{
		`{"fwPackageUri":"test.com/fw.bin","version":"1.0.0\u202e1.0.2"}`: "version contains U+202E, an invisible format character, at byte 5",
		`{"fwPackageUri":"test.com/f\u200bw.bin"}`:                        "fwPackageUri contains U+200B, an invisible format character, at byte 10",
	} {
		res := e.invoke(t, "firmwareUpdate", payload)
		msg, _ := decodeBody(t, res.Payload)["error"].(string)
		if res.Status != 400 || msg != want {
			t.Errorf("firmwareUpdate %s = %d %s, want 400 %q", payload, res.Status, res.Payload, want)
		}
	}
	if st := r.manager.Status(); st.Busy {
		t.Fatalf("an update started: %+v", st)
	}
}
