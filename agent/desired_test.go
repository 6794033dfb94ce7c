package agent

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/internal/testutil"
)

// desiredFW sets the desired firmware through the hub's service side.
func (e *env) desiredFW(t *testing.T, fw any) int64 {
	t.Helper()
	v, err := e.UpdateDesired(deviceID, map[string]any{"firmware": fw})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// ack is the desired firmware acknowledgement on the reported firmware
// object: ac, desiredId and whether ad contains sub.
func ack(rep map[string]any) (ac, id, ad string) {
	return fmt.Sprint(field(rep, "firmware", "ac")), fmt.Sprint(field(rep, "firmware", "desiredId")), fmt.Sprint(field(rep, "firmware", "ad"))
}

// otherUpdates lists the firmware.updateId values other than keep
// reported from index from on.
func (e *env) otherUpdates(from int, keep any) []any {
	var out []any
	for _, p := range e.patches()[from:] {
		if id := field(p, "firmware", "updateId"); id != nil && id != keep {
			out = append(out, id)
		}
	}
	return out
}

// sawDesired waits for a reported patch from index from on that carries
// the acknowledgement of desired id (the agent has decided about it).
func (e *env) sawDesired(t *testing.T, from int, id string) {
	t.Helper()
	testutil.Eventually(t, wait, "acknowledged "+id, func() bool {
		for _, p := range e.patches()[from:] {
			if field(p, "firmware", "desiredId") == id {
				return true
			}
		}
		return false
	})
}

// countStatus counts reported patches, from index from on, whose
// firmware.status is status.
func (e *env) countStatus(from int, status string) int {
	n := 0
	for _, p := range e.patches()[from:] {
		if field(p, "firmware", "status") == status {
			n++
		}
	}
	return n
}

// An online gateway converges to the desired firmware; the ack sits on the
// reported firmware object beside the status; the method path still works
// afterwards, and the ended desired update is not run again.
func TestDesiredFirmwareConverges(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, wait, "connected", func() bool {
		return r.Session().Health().Connected && field(e.reportedNow(t), "firmware", "currentVersion") == "1.0.0"
	})
	v := e.desiredFW(t, map[string]any{"updateId": "rollout-1", "fwPackageUri": "test.com/fw.bin", "version": "1.2.0"})
	testutil.Eventually(t, wait, "converged", func() bool {
		rep := e.reportedNow(t)
		ac, id, _ := ack(rep)
		return ac == "200" && id == "rollout-1" && rep["firmwareStatus"] == "completed"
	})
	rep := e.reportedNow(t)
	if field(rep, "firmware", "currentVersion") != "1.2.0" || fmt.Sprint(field(rep, "firmware", "av")) != fmt.Sprint(v) || field(rep, "firmware", "updateId") == nil {
		t.Fatalf("firmware %v (desired version %d)", rep["firmware"], v)
	}
	if got := e.statuses(); !strings.Contains(strings.Join(got, " "), "downloading") {
		t.Fatalf("statuses %v", got)
	}

	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"test.com/fw.bin","version":"1.3.0"}`)
	if res.Status != 200 {
		t.Fatalf("firmwareUpdate = %d %s", res.Status, res.Payload)
	}
	id := decodeBody(t, res.Payload)["updateId"]
	testutil.Eventually(t, wait, "method update completed", func() bool {
		rep := e.reportedNow(t)
		return field(rep, "firmware", "updateId") == id && rep["firmwareStatus"] == "completed"
	})
	// A desired change of another key makes the agent read firmware again
	// (patch) and a reconnect reads the whole twin: neither reruns 1.2.0.
	mark := len(e.patches())
	e.desiredFW(t, map[string]any{"updateId": "rollout-1", "fwPackageUri": "test.com/fw.bin", "version": "1.2.0", "note": "same id"})
	e.sawDesired(t, mark, "rollout-1")
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	mark = len(e.patches())
	start(t, loadConfig(t, e.yaml(nil)))
	e.sawDesired(t, mark, "rollout-1")
	if other := e.otherUpdates(mark, id); len(other) != 0 {
		t.Fatalf("the ended desired update ran again: %v", other)
	}
	if rep := e.reportedNow(t); field(rep, "firmware", "currentVersion") != "1.3.0" {
		t.Fatalf("firmware %v", rep["firmware"])
	}
}

// Desired while the gateway is down: it converges when it connects; a
// failed desired update is not run again after a restart.
func TestDesiredFirmwareOfflineAndFailed(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	e := newEnv(t)
	cfg := loadConfig(t, e.yaml(nil))
	e.desiredFW(t, map[string]any{"updateId": "r-404", "fwPackageUri": srv.URL + "/missing.bin", "version": "2.0.0"})

	r := start(t, cfg)
	testutil.Eventually(t, wait, "failed and acknowledged", func() bool {
		rep := e.reportedNow(t)
		ac, id, _ := ack(rep)
		return ac == "500" && id == "r-404" && rep["firmwareStatus"] == "failed"
	})
	if _, _, ad := ack(e.reportedNow(t)); !strings.Contains(ad, "downloadFailed") {
		t.Fatalf("ad %q", ad)
	}
	failedID := field(e.reportedNow(t), "firmware", "updateId")
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	mark := len(e.patches())
	start(t, cfg)
	e.sawDesired(t, mark, "r-404")
	if other := e.otherUpdates(mark, failedID); len(other) != 0 {
		t.Fatalf("the failed desired update ran again: %v", other)
	}

	// A new id converges (the offline case with a good image).
	e.desiredFW(t, map[string]any{"updateId": "r-ok", "fwPackageUri": "test.com/fw.bin", "version": "2.0.0"})
	testutil.Eventually(t, wait, "converged", func() bool {
		rep := e.reportedNow(t)
		ac, id, _ := ack(rep)
		return ac == "200" && id == "r-ok" && field(rep, "firmware", "currentVersion") == "2.0.0"
	})
}

// A malformed desired firmware is acknowledged 400 with the reason, and
// nothing starts.
func TestDesiredFirmwareMalformed(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	for _, tc := range []struct {
		name string
		fw   any
		want string
	}{
		{"not an object", "2.0.0", "must be an object"},
		{"no id", map[string]any{"fwPackageUri": "test.com/fw.bin", "version": "2.0.0"}, "updateId is required"},
		{"no uri", map[string]any{"updateId": "a", "version": "2.0.0"}, "fwPackageUri is required"},
		{"no version", map[string]any{"updateId": "b", "fwPackageUri": "test.com/fw.bin"}, "version is required"},
		{"bad sha", map[string]any{"updateId": "c", "fwPackageUri": "https://x/y", "version": "2", "sha256": "zz"}, "sha256"},
		{"bad size", map[string]any{"updateId": "d", "fwPackageUri": "https://x/y", "version": "2", "size": "big"}, "size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := e.desiredFW(t, tc.fw)
			testutil.Eventually(t, wait, "refused", func() bool {
				return fmt.Sprint(field(e.reportedNow(t), "firmware", "av")) == fmt.Sprint(v)
			})
			rep := e.reportedNow(t)
			if ac, _, ad := ack(rep); ac != "400" || !strings.Contains(ad, tc.want) {
				t.Fatalf("ack %v", rep["firmware"])
			}
		})
	}
	if n := e.countStatus(0, "accepted"); n != 0 || e.reportedNow(t)["firmwareStatus"] != "standBy" {
		t.Fatalf("an update started: %v", e.statuses())
	}
}

// A desired update set while a method update runs waits for it, then runs.
func TestDesiredFirmwareWaitsWhileBusy(t *testing.T) {
	e := newEnv(t)
	slow := "installer:\n  type: simulated\n  simulated:\n    waitBeforeDownload: 100ms\n    download: 3s\n    apply: 200ms\n    initialVersion: 1.0.0\n"
	r := start(t, loadConfig(t, e.yaml(map[string]string{"installer": slow})))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"test.com/fw.bin","version":"1.5.0"}`)
	if res.Status != 200 {
		t.Fatalf("firmwareUpdate = %d %s", res.Status, res.Payload)
	}
	methodID := decodeBody(t, res.Payload)["updateId"]
	e.desiredFW(t, map[string]any{"updateId": "after", "fwPackageUri": "test.com/fw.bin", "version": "1.6.0"})
	testutil.Eventually(t, wait, "waiting", func() bool {
		ac, id, ad := ack(e.reportedNow(t))
		return ac == "202" && id == "after" && strings.Contains(ad, "waiting for update")
	})
	if rep := e.reportedNow(t); field(rep, "firmware", "updateId") != methodID {
		t.Fatalf("the method update was replaced: %v", rep["firmware"])
	}
	testutil.Eventually(t, wait*2, "converged after the method update", func() bool {
		rep := e.reportedNow(t)
		ac, id, _ := ack(rep)
		return ac == "200" && id == "after" && field(rep, "firmware", "currentVersion") == "1.6.0"
	})
	if n := e.countStatus(0, "completed"); n < 2 {
		t.Fatalf("statuses %v", e.statuses())
	}
}

// A change of the desired update while one it started downloads cancels
// it and runs the new one.
func TestDesiredFirmwareChangedWhileRunning(t *testing.T) {
	e := newEnv(t)
	slow := "installer:\n  type: simulated\n  simulated:\n    waitBeforeDownload: 100ms\n    download: 5s\n    apply: 200ms\n    initialVersion: 1.0.0\n"
	r := start(t, loadConfig(t, e.yaml(map[string]string{"installer": slow})))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	e.desiredFW(t, map[string]any{"updateId": "first", "fwPackageUri": "test.com/fw.bin", "version": "3.0.0"})
	testutil.Eventually(t, wait, "downloading", func() bool { return e.reportedNow(t)["firmwareStatus"] == "downloading" })
	e.desiredFW(t, map[string]any{"updateId": "second", "fwPackageUri": "test.com/fw.bin", "version": "3.1.0"})
	testutil.Eventually(t, wait*2, "converged to the second", func() bool {
		rep := e.reportedNow(t)
		ac, id, _ := ack(rep)
		return ac == "200" && id == "second" && field(rep, "firmware", "currentVersion") == "3.1.0"
	})
	cancelled := false
	for _, p := range e.patches() {
		if field(p, "firmware", "error", "code") == "cancelled" {
			cancelled = true
		}
	}
	if !cancelled || e.countStatus(0, "completed") != 1 {
		t.Fatalf("want the first cancelled and one completed: %v", e.statuses())
	}
}

// The desired firmware carries the method's members, indexUri included.
func TestDesiredFirmwareIndexURI(t *testing.T) {
	d, err := parseDesiredFirmware(map[string]any{"updateId": "r1", "fwPackageUri": "https://fw.example.com/gw.img",
		"version": "2.0.0", "indexUri": "https://fw.example.com/gw.img.bidx"})
	if err != nil || d.Req.IndexURI != "https://fw.example.com/gw.img.bidx" {
		t.Fatalf("parseDesiredFirmware = %+v, %v; want indexUri kept", d, err)
	}
	if _, err := parseDesiredFirmware(map[string]any{"updateId": "r1", "fwPackageUri": "https://fw.example.com/gw.img",
		"version": "2.0.0", "indexUri": "ftp://fw.example.com/gw.img.bidx"}); err == nil || !strings.Contains(err.Error(), "indexUri") {
		t.Fatalf("an ftp indexUri: %v, want an error naming indexUri", err)
	}
}
