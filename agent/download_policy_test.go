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
