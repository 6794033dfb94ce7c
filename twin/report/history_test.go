package report

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/twin"
)

// maxPropertySize is IoT Hub's limit on one property (iothub-protocol.md
// §4.5), counted as twin.Size counts.
const maxPropertySize = 4096

// TestHistoryWorstCaseSize: a full history whose entries are all as large
// as the bounds allow stays within one property's 4 KB.
func TestHistoryWorstCaseSize(t *testing.T) {
	start := time.Date(2026, 12, 31, 23, 59, 59, 999e6, time.UTC)
	var h []firmware.HistoryEntry
	long := strings.Repeat("x", 5000)
	for i := range firmware.HistoryLen {
		// Phase names as long as any the state machine has, and then some.
		var phases []firmware.PhaseTime
		for j := range 3 * firmware.HistoryMaxPhases {
			phases = append(phases, firmware.PhaseTime{Phase: firmware.Phase(strings.Repeat("p", 20)), At: start.Add(time.Duration(j) * 100 * time.Hour)})
		}
		phases = append(phases, firmware.PhaseTime{Phase: firmware.PhaseRolledBack, At: start.Add(9999 * time.Hour)})
		h = append(h, firmware.HistoryEntry{
			Seq:       1e9 + i,
			UpdateID:  "0f8fad5b-d9cb-469f-a165-70867728950e",
			DesiredID: long, Version: long,
			Result:    firmware.PhaseRolledBack,
			Err:       &firmware.UpdateError{Code: "rolledBackByBootloader" + strings.Repeat("c", 10), Message: long},
			StartedAt: start, EndedAt: start.Add(9999 * time.Hour),
			Phases: phases,
		}.Bounded())
	}
	b, err := json.Marshal(map[string]any{HistoryProperty: HistoryPatch(h)})
	if err != nil {
		t.Fatal(err)
	}
	doc, err := twin.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := twin.ValidatePatch(doc); err != nil {
		t.Fatal(err)
	}
	n := twin.Size(doc)
	t.Logf("worst-case %s: %d bytes as IoT Hub counts (limit %d), %d bytes of JSON", HistoryProperty, n, maxPropertySize, len(b))
	if n > maxPropertySize {
		t.Fatalf("worst-case history is %d bytes, over the %d-byte property limit", n, maxPropertySize)
	}
	if got := len(doc[HistoryProperty].(map[string]any)); got != firmware.HistoryLen {
		t.Fatalf("%d members, want %d", got, firmware.HistoryLen)
	}
}

// TestHistoryOnMilestonesOnly: a phase change carries the update's history
// entry (whole, with nulls for what it lacks); byte progress never does;
// Startup restates the whole history.
func TestHistoryOnMilestonesOnly(t *testing.T) {
	sink := &memSink{}
	r := New(sink, Options{})
	defer r.Close()
	t0 := time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)
	old := firmware.HistoryEntry{Seq: 5, UpdateID: "u5", Result: firmware.PhaseFailed, Err: &firmware.UpdateError{Code: "verifyFailed", Message: "bad"},
		StartedAt: t0.Add(-time.Hour), EndedAt: t0.Add(-time.Hour), Phases: []firmware.PhaseTime{{Phase: "accepted", At: t0.Add(-time.Hour)}}}
	cur := firmware.HistoryEntry{Seq: 6, UpdateID: "u6", Version: "2.0.0", StartedAt: t0,
		Phases: []firmware.PhaseTime{{Phase: "accepted", At: t0}, {Phase: "downloading", At: t0.Add(1500 * time.Millisecond)}}}
	hist := []firmware.HistoryEntry{old, cur}
	r.Observe(firmware.Progress{UpdateID: "u6", Phase: firmware.PhaseDownloading, Percent: 0, Total: 100, History: hist, Time: t0})
	r.Observe(firmware.Progress{UpdateID: "u6", Phase: firmware.PhaseDownloading, Bytes: 50, Total: 100, Percent: 50, History: hist, Time: t0})
	all := sink.all()
	if len(all) != 2 {
		t.Fatalf("%d patches, want 2", len(all))
	}
	if _, ok := all[1].patch[HistoryProperty]; ok || all[1].milestone {
		t.Errorf("byte progress carries the history: %v", all[1].patch)
	}
	h, ok := all[0].patch[HistoryProperty].(map[string]any)
	if !ok || len(h) != 1 || !all[0].milestone {
		t.Fatalf("phase change: history %v (milestone %v), want only the running entry", all[0].patch[HistoryProperty], all[0].milestone)
	}
	e := h[HistoryKey(6)].(map[string]any)
	want := `{"desiredId":null,"endedAt":null,"errorCode":null,"errorMessage":null,"phases":[{"ms":0,"phase":"accepted"},{"ms":1500,"phase":"downloading"}],"result":"running","seq":6,"startedAt":"2026-05-01T10:00:00.000Z","updateId":"u6","version":"2.0.0"}`
	if b, _ := json.Marshal(e); string(b) != want {
		t.Errorf("entry\n got %s\nwant %s", b, want)
	}

	sink2 := &memSink{}
	r2 := New(sink2, Options{})
	defer r2.Close()
	if err := r2.Startup(firmware.Status{Progress: firmware.Progress{UpdateID: "u6", Phase: firmware.PhaseDownloading, History: hist}, Busy: true}, t0, nil); err != nil {
		t.Fatal(err)
	}
	h = sink2.all()[0].patch[HistoryProperty].(map[string]any)
	if len(h) != 2 || h[HistoryKey(5)].(map[string]any)["errorCode"] != "verifyFailed" {
		t.Errorf("startup history %v", h)
	}
}
