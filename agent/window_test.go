package agent

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/internal/testutil"
)

// closedWindow is a one-hour UTC window that opens in two hours: closed now.
func closedWindow() (map[string]any, time.Time) {
	opens := time.Now().UTC().Add(2 * time.Hour).Truncate(time.Minute)
	return map[string]any{"start": opens.Format("15:04"), "duration": "1h", "timeZone": "UTC"}, opens
}

// A malformed window is refused before anything starts: 400 naming the
// member for the method, ac 400 for the desired firmware.
func TestWindowInvalidAnswer400(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	for payload, want := range map[string]string{
		`{"fwPackageUri":"test.com/fw.bin","window":{"start":"02:00","duration":"25h"}}`:                             "window.duration 25h: must be more than 0 and at most 24h",
		`{"fwPackageUri":"test.com/fw.bin","window":{"start":"7pm","duration":"1h"}}`:                                `window.start "7pm"`,
		`{"fwPackageUri":"test.com/fw.bin","window":{"start":"02:00","duration":"1h","timeZone":"Europe/Atlantis"}}`: `window.timeZone "Europe/Atlantis": unknown time zone`,
	} {
		res := e.invoke(t, "firmwareUpdate", payload)
		msg, _ := decodeBody(t, res.Payload)["error"].(string)
		if res.Status != 400 || !strings.HasPrefix(msg, want) {
			t.Errorf("firmwareUpdate %s = %d %s, want 400 %q", payload, res.Status, res.Payload, want)
		}
	}
	v := e.desiredFW(t, map[string]any{"updateId": "w", "fwPackageUri": "test.com/fw.bin", "version": "2.0.0",
		"window": map[string]any{"start": "02:00", "duration": "-1h"}})
	testutil.Eventually(t, wait, "refused", func() bool {
		return fmt.Sprint(field(e.reportedNow(t), "firmware", "av")) == fmt.Sprint(v)
	})
	if ac, _, ad := ack(e.reportedNow(t)); ac != "400" || !strings.Contains(ad, "window.duration") {
		t.Fatalf("desired with a bad window: ack %v", e.reportedNow(t)["firmware"])
	}
	if st := r.manager.Status(); st.Busy || st.UpdateID != "" {
		t.Fatalf("an update started: %+v", st)
	}
}

// An update whose window is closed is downloaded, then waits on the twin
// as waitingForWindow with the window and its next opening; the method
// cancels it there.
func TestWindowWaitingOnTwinAndCancel(t *testing.T) {
	e := newEnv(t)
	r := start(t, loadConfig(t, e.yaml(nil)))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	win, opens := closedWindow()
	res := e.invoke(t, "firmwareUpdate", fmt.Sprintf(`{"fwPackageUri":"test.com/fw.bin","version":"2.0.0","window":{"start":%q,"duration":"1h","timeZone":"UTC"}}`, win["start"]))
	if res.Status != 200 {
		t.Fatalf("firmwareUpdate = %d %s", res.Status, res.Payload)
	}
	id := decodeBody(t, res.Payload)["updateId"]
	testutil.Eventually(t, wait*2, "waiting for the window", func() bool {
		return e.reportedNow(t)["firmwareStatus"] == "waitingForWindow"
	})
	rep := e.reportedNow(t)
	want := opens.Format("2006-01-02T15:04:05.000Z")
	if got := field(rep, "firmware", "window", "opensAt"); got != want || field(rep, "firmware", "window", "start") != win["start"] ||
		field(rep, "firmware", "window", "timeZone") != "UTC" || rep["downloadComplete"] == nil {
		t.Fatalf("reported firmware %v (downloadComplete %v), want window opening at %s", rep["firmware"], rep["downloadComplete"], want)
	}
	res = e.invoke(t, "cancelFirmwareUpdate", "{}")
	if res.Status != 200 || decodeBody(t, res.Payload)["updateId"] != id {
		t.Fatalf("cancelFirmwareUpdate = %d %s", res.Status, res.Payload)
	}
	testutil.Eventually(t, wait, "cancelled", func() bool {
		return field(e.reportedNow(t), "firmware", "error", "code") == "cancelled"
	})
	if n := e.countStatus(0, "applying"); n != 0 {
		t.Fatalf("applied while the window was closed: %v", e.statuses())
	}
}

// The device's window (update.window) holds a desired update; a change of
// the desired update while it waits cancels it, and the new one, with its
// own always-open window, wins over the device's and runs at once.
func TestWindowConfigDefaultDesiredChangeWhileWaiting(t *testing.T) {
	e := newEnv(t)
	win, _ := closedWindow()
	rest := fmt.Sprintf("stateDir: %q\nshutdownTimeout: 3s\nupdate:\n  window:\n    start: %q\n    duration: 1h\n", e.stateDir, win["start"])
	r := start(t, loadConfig(t, e.yaml(map[string]string{"rest": rest})))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })
	e.desiredFW(t, map[string]any{"updateId": "first", "fwPackageUri": "test.com/fw.bin", "version": "3.0.0"})
	testutil.Eventually(t, wait*2, "waiting for the device's window", func() bool {
		rep := e.reportedNow(t)
		return rep["firmwareStatus"] == "waitingForWindow" && field(rep, "firmware", "window", "start") == win["start"]
	})
	e.desiredFW(t, map[string]any{"updateId": "second", "fwPackageUri": "test.com/fw.bin", "version": "3.1.0",
		"window": map[string]any{"start": "00:00", "duration": "24h"}})
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
		t.Fatalf("want the first cancelled while waiting and one completed: %v", e.statuses())
	}
}

// systemctl status says an update waits for its window, and until when.
func TestUpdateStageWaitingForWindow(t *testing.T) {
	st := firmware.Status{Busy: true, Progress: firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseWaitingForWindow, TargetVersion: "2.0.0",
		Window: &firmware.WindowStatus{Window: firmware.Window{Start: "02:00", Duration: "2h0m0s", TimeZone: "Europe/Berlin"},
			OpensAt: time.Date(2026, 12, 4, 1, 0, 0, 0, time.UTC)}}}
	if got, want := updateStage(st), "2.0.0 waits for its maintenance window, opening 2026-12-04 01:00 UTC"; got != want {
		t.Fatalf("status line %q, want %q", got, want)
	}
}
