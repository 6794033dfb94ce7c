package agent

import (
	"testing"

	"github.com/gwagent/gwagent/internal/testutil"
)

// TestCancelFirmwareUpdateThroughHub: cancelFirmwareUpdate through the
// local hub stops a download that would take an hour, the twin ends
// failed with error.code cancelled, bad and stale cancels get JSON 400,
// 404 and 409 answers, and the next update is accepted at once.
func TestCancelFirmwareUpdateThroughHub(t *testing.T) {
	e := newEnv(t)
	inst := "installer:\n  type: simulated\n  simulated:\n    waitBeforeDownload: 10ms\n    download: 1h\n    apply: 10ms\n    initialVersion: 1.0.0\n"
	r := start(t, loadConfig(t, e.yaml(map[string]string{"installer": inst})))
	testutil.Eventually(t, wait, "connected", func() bool { return r.Session().Health().Connected })

	answer := func(payload string, status int, want map[string]string) {
		t.Helper()
		res := e.invoke(t, "cancelFirmwareUpdate", payload)
		got := decodeBody(t, res.Payload)
		ok := res.Status == status
		for k, v := range want {
			if got[k] != v {
				ok = false
			}
		}
		if !ok {
			t.Errorf("cancelFirmwareUpdate %s = %d %s, want %d with %v", payload, res.Status, res.Payload, status, want)
		}
	}
	answer(``, 404, map[string]string{"error": "no update has been started"})

	res := e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"test.com/fw.bin","version":"1.2.0"}`)
	id, _ := decodeBody(t, res.Payload)["updateId"].(string)
	if res.Status != 200 || id == "" {
		t.Fatalf("firmwareUpdate = %d %s", res.Status, res.Payload)
	}
	testutil.Eventually(t, wait, "downloading reported", func() bool {
		return e.reportedNow(t)["firmwareStatus"] == "downloading"
	})

	answer(`"all"`, 400, nil)
	answer(`{"updateId":"not-this-one"}`, 404, map[string]string{"error": "not-this-one is not the current update"})
	answer(`{"updateId":"`+id+`"}`, 200, map[string]string{"updateId": id, "status": "cancelled"})
	if st := r.manager.Status(); st.Busy {
		t.Fatalf("still busy after the cancel was answered: %+v", st)
	}
	answer(`{}`, 409, map[string]string{"updateId": id, "phase": "failed", "error": "the update has already ended"})

	testutil.Eventually(t, wait, "failed with code cancelled on the twin", func() bool {
		rep := e.reportedNow(t)
		return rep["firmwareStatus"] == "failed" && field(rep, "firmware", "updateId") == id &&
			field(rep, "firmware", "error", "code") == "cancelled"
	})

	res = e.invoke(t, "firmwareUpdate", `{"fwPackageUri":"test.com/fw.bin","version":"1.2.1"}`)
	if b := decodeBody(t, res.Payload); res.Status != 200 || b["status"] != "accepted" || b["updateId"] == id {
		t.Fatalf("firmwareUpdate after the cancel = %d %s", res.Status, res.Payload)
	}
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
}
