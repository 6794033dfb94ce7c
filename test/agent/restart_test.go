package agente2e

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub/service"
)

// firmwareStatus is the tutorial's top-level status field.
func firmwareStatus(rep map[string]any) string { return text(rep["firmwareStatus"]) }

// A restart after an update has ended keeps its result on the twin:
// firmwareStatus, the update's id, versions and error stay as the update
// left them, and the watch gwctl update --watch runs sees the end state —
// after a completed update, after a failed one, and after an update that
// completed while the hub was unreachable and whose agent was then killed
// and restarted before the hub came back.
func TestRestartKeepsLastResult(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// missing: the image server answers 404 and the update fails.
		missing bool
		// offline: the hub goes away during the download; the update ends
		// while it is away, the agent is killed and started again, and
		// only then does the hub come back.
		offline bool
		want    string
	}{
		{name: "completed", want: "completed"},
		{name: "failed", missing: true, want: "failed"},
		{name: "completed offline, killed", offline: true, want: "completed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			img := newImageServer(t, 64<<10, 16<<10, time.Millisecond)
			e := newHubEnv(t)
			setup := e.agentSetup(t, "GWAGENT_INSTALLER_SIMULATED_DOWNLOAD=2s")
			a1 := startAgent(t, setup, "gwagent (first)")
			e.waitStandBy(t)

			uri := "test.com/fw.bin"
			if tc.missing {
				uri = img.URL + "/missing.bin"
			}
			id := e.startUpdate(t, fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0"}`, uri))
			if tc.offline {
				testutil.Eventually(t, wait, "downloading accepted by the hub", func() bool {
					return slices.Contains(statuses(e.rec.all()), "downloading")
				})
				e.stop(t)
				a1.waitLog(t, "the lost connection", msgIs("connection lost"))
			}
			if tc.want == "completed" {
				a1.waitLog(t, "the completed update", msgIs("update completed", "update_id", id))
			} else {
				a1.waitLog(t, "the failed update", msgIs("update failed", "update_id", id))
			}
			var before map[string]any // the twin as the update left it
			if tc.offline {
				a1.kill(t)
			} else {
				before = e.waitReported(t, "the end of the update", func(rep map[string]any) bool {
					return firmwareStatus(rep) == tc.want && field(rep, "firmware", "updateId") == id
				})
				if err := a1.stop(t); err != nil {
					t.Fatalf("gwagent after SIGTERM: %v", err)
				}
			}
			seen := e.rec.len()

			a2 := startAgent(t, setup, "gwagent (restarted)")
			a2.waitLog(t, "its start", msgIs("gwagent running"))
			// gwctl update --watch polls the twin through the service API
			// from here on; with the hub away it backs off and goes on.
			type watched struct {
				st  service.FirmwareState
				err error
			}
			watch := make(chan watched, 1)
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			svc := e.service(t)
			go func() {
				st, err := svc.WatchFirmware(ctx, deviceID, service.WatchOptions{UpdateID: id, Interval: 50 * time.Millisecond, MaxInterval: 200 * time.Millisecond}, nil)
				watch <- watched{st, err}
			}()
			if tc.offline {
				e.restart(t)
			}

			// The restarted agent's start-up report reaches the hub.
			startedAt := ""
			testutil.Eventually(t, wait, "the restarted agent's start-up report", func() bool {
				for _, p := range e.rec.all()[seen:] {
					if s := text(field(p.Patch, "agent", "startedAt")); s != "" {
						startedAt = s
						return true
					}
				}
				return false
			})
			w := <-watch
			if w.err != nil || w.st.Status != tc.want || w.st.UpdateID != id {
				t.Errorf("the watch ended with %+v (%v), want %s of %s", w.st, w.err, tc.want, id)
			}

			rep := e.reported(t)
			if firmwareStatus(rep) != tc.want || field(rep, "firmware", "status") != tc.want ||
				field(rep, "firmware", "updateId") != id || field(rep, "firmware", "targetVersion") != "2.0.0" {
				t.Errorf("after the restart the twin says firmwareStatus %q, firmware %v; want %s of update %s to 2.0.0",
					firmwareStatus(rep), rep["firmware"], tc.want, id)
			}
			if tc.missing {
				if code := field(rep, "firmware", "error", "code"); code != "downloadFailed" {
					t.Errorf("firmware.error after the restart: %v, want the downloadFailed of the update", field(rep, "firmware", "error"))
				}
			} else if v := field(rep, "firmware", "error"); v != nil {
				t.Errorf("firmware.error = %v after a completed update", v)
			}
			if before != nil {
				// Only the agent's own fields change.
				for _, k := range []string{"firmwareStatus", "firmware", "logTime", "downloadComplete", "startedApplyingImage", "lastFirmwareUpdate"} {
					if canonical(rep[k]) != canonical(before[k]) {
						t.Errorf("%s changed by the restart:\n before %s\n after  %s", k, canonical(before[k]), canonical(rep[k]))
					}
				}
			}
			// Once the end was accepted, nothing the hub accepted said
			// otherwise, not even for a moment.
			after := e.rec.all()[seen:]
			end := slices.IndexFunc(after, func(p accepted) bool { return p.Patch["firmwareStatus"] == tc.want })
			if tc.offline && end < 0 {
				t.Fatalf("the end of the update never reached the hub: %v", statuses(after))
			}
			for _, p := range after[max(end, 0):] {
				if s, ok := p.Patch["firmwareStatus"]; ok && s != tc.want {
					t.Errorf("after the update ended the hub accepted firmwareStatus %v (version %d): %s", s, p.Version, canonical(p.Patch))
				}
				if fw, ok := p.Patch["firmware"].(map[string]any); ok {
					if v, ok := fw["updateId"]; ok && v != id {
						t.Errorf("after the update ended the hub accepted firmware.updateId %v", v)
					}
				}
			}
			if tc.offline {
				// The end reached the hub once it was back, from the queue
				// the killed agent left.
				if got := statuses(e.rec.all()); got[len(got)-1] != "completed" || !slices.Contains(got, "applying") {
					t.Errorf("accepted firmwareStatus sequence %v", got)
				}
			}
			t.Logf("restarted agent started at %s", startedAt)
			if err := a2.stop(t); err != nil {
				t.Fatalf("gwagent after SIGTERM: %v", err)
			}
		})
	}
}
