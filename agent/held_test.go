package agent

import (
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/twin"
	"github.com/gwagent/gwagent/twin/report"
)

// twinDoc merges every patch it is given, as the hub does with reported
// properties.
type twinDoc struct {
	mu  sync.Mutex
	doc map[string]any
}

func (d *twinDoc) Report(patch map[string]any, _ bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.doc = twin.Merge(d.doc, patch)
	return nil
}

func (d *twinDoc) firmwareError() any {
	d.mu.Lock()
	defer d.mu.Unlock()
	fw, _ := d.doc["firmware"].(map[string]any)
	return fw["error"]
}

// TestHeldProblemOnTheTwin: while the state machine holds an update, the
// twin's firmware.error says why, whatever progress is reported meanwhile;
// it clears when the problem does, and an update that then fails keeps its
// own error.
func TestHeldProblemOnTheTwin(t *testing.T) {
	doc := &twinDoc{doc: map[string]any{}}
	a := &Agent{held: &heldSink{next: doc, log: zap.NewNop()}}
	a.reporter = report.New(a.held, report.Options{MinPercentStep: 1})
	defer a.reporter.Close()

	problem := &firmware.UpdateError{Code: firmware.CodeStateNotSaved, Message: "cannot save /s/download.json: no space left on device"}
	at := time.Now()
	progress := func(phase firmware.Phase, percent int, pr *firmware.UpdateError) firmware.Progress {
		at = at.Add(time.Second)
		return firmware.Progress{UpdateID: "u1", Phase: phase, Bytes: int64(percent), Total: 100, Percent: percent, Problem: pr, Time: at}
	}
	wantError := func(step string, code string) {
		t.Helper()
		e, _ := doc.firmwareError().(map[string]any)
		switch {
		case code == "" && doc.firmwareError() != nil:
			t.Errorf("%s: firmware.error = %v, want null", step, doc.firmwareError())
		case code != "" && (e == nil || e["code"] != code):
			t.Errorf("%s: firmware.error = %v, want code %s", step, doc.firmwareError(), code)
		}
	}

	a.observeFirmware(progress(firmware.PhaseDownloading, 10, nil))
	wantError("downloading", "")
	a.observeFirmware(progress(firmware.PhaseDownloading, 20, problem))
	wantError("problem reported", firmware.CodeStateNotSaved)
	// The download goes on; its progress must not hide the problem.
	a.observeFirmware(progress(firmware.PhaseDownloading, 60, problem))
	wantError("progress while held", firmware.CodeStateNotSaved)
	if e, _ := doc.firmwareError().(map[string]any); e == nil || e["message"] != problem.Message {
		t.Errorf("firmware.error %v, want the message %q", doc.firmwareError(), problem.Message)
	}
	// A patch of another update is left alone (to the twin of another
	// device, so this one's stays as it is).
	other := report.Patch(firmware.Progress{UpdateID: "u2", Phase: firmware.PhaseAccepted})
	if err := (&heldSink{next: &twinDoc{}, id: "u1", problem: problem}).Report(other, false); err != nil {
		t.Fatal(err)
	}
	if e := other["firmware"].(map[string]any)["error"]; e != nil {
		t.Errorf("the patch of another update got firmware.error %v", e)
	}
	a.observeFirmware(progress(firmware.PhaseDownloading, 60, problem))
	wantError("held, unchanged", firmware.CodeStateNotSaved)

	a.observeFirmware(progress(firmware.PhaseDownloading, 60, nil))
	wantError("cleared", "")

	a.observeFirmware(progress(firmware.PhaseVerifying, 100, problem))
	wantError("held in verifying", firmware.CodeStateNotSaved)
	failed := progress(firmware.PhaseFailed, 100, nil)
	failed.Err = &firmware.UpdateError{Code: firmware.CodeVerify, Message: "sha256 mismatch"}
	a.observeFirmware(failed)
	wantError("failed", firmware.CodeVerify)
}

// TestUpdateLineHeld: systemctl status says why an update waits.
func TestUpdateLineHeld(t *testing.T) {
	st := firmware.Status{Busy: true, Progress: firmware.Progress{UpdateID: "u1", Phase: firmware.PhaseDownloading, TargetVersion: "2.0.0", Percent: 100,
		Problem: &firmware.UpdateError{Code: firmware.CodeStateNotSaved, Message: "cannot save /s/download.json: no space left on device"}}}
	want := "downloading 100% of 2.0.0; held: cannot save /s/download.json: no space left on device"
	if got := updateLine(st); got != want {
		t.Errorf("updateLine = %q, want %q", got, want)
	}
	st.Problem = nil
	if got := updateLine(st); got != "downloading 100% of 2.0.0" {
		t.Errorf("updateLine = %q", got)
	}
}
