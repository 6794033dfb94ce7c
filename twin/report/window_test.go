package report

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

func TestPatchWaitingForWindow(t *testing.T) {
	opens := time.Date(2026, 6, 2, 0, 0, 0, 0, time.FixedZone("CEST", 2*3600))
	p := firmware.Progress{
		UpdateID: "u1", Phase: firmware.PhaseWaitingForWindow, Percent: 100,
		Window: &firmware.WindowStatus{Window: firmware.Window{Start: "02:00", Duration: "2h0m0s", TimeZone: "Europe/Berlin"}, OpensAt: opens},
		Time:   time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC),
	}
	b, err := json.Marshal(Patch(p))
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		FirmwareStatus       string  `json:"firmwareStatus"`
		StartedApplyingImage *string `json:"startedApplyingImage"`
		Firmware             struct {
			Status string
			Window map[string]any `json:"window"`
		} `json:"firmware"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"start": "02:00", "duration": "2h0m0s", "timeZone": "Europe/Berlin", "opensAt": "2026-06-01T22:00:00.000Z"}
	if got.FirmwareStatus != "waitingForWindow" || got.Firmware.Status != "waitingForWindow" || got.StartedApplyingImage != nil {
		t.Fatalf("patch %s: want firmwareStatus waitingForWindow and startedApplyingImage null", b)
	}
	for k, v := range want {
		if got.Firmware.Window[k] != v {
			t.Fatalf("firmware.window.%s = %v, want %v (patch %s)", k, got.Firmware.Window[k], v, b)
		}
	}
	// Once applying, the window stays without an opening.
	p.Phase, p.Window.OpensAt = firmware.PhaseApplying, time.Time{}
	fw := Patch(p)["firmware"].(map[string]any)
	if w, _ := fw["window"].(map[string]any); w == nil || w["opensAt"] != nil || w["start"] != "02:00" {
		t.Fatalf("applying: firmware.window = %v, want the window with opensAt null", fw["window"])
	}
	// A new update without a window clears an earlier one's.
	fw = Patch(firmware.Progress{UpdateID: "u2", Phase: firmware.PhaseAccepted})["firmware"].(map[string]any)
	if w, ok := fw["window"]; !ok || w != nil {
		t.Fatalf("accepted without a window: firmware.window = %v (present %v), want null", w, ok)
	}
}

func TestPatchAdaptive(t *testing.T) {
	p := firmware.Progress{
		UpdateID: "u1", Phase: firmware.PhaseDownloading, Bytes: 300, Total: 1000, Percent: 30,
		Adaptive: &firmware.AdaptiveStatus{BytesFetched: 40, BytesReused: 260},
	}
	fw := Patch(p)["firmware"].(map[string]any)
	a, _ := fw["adaptive"].(map[string]any)
	if a == nil || a["bytesFetched"] != int64(40) || a["bytesReused"] != int64(260) || a["fallback"] != nil {
		t.Fatalf("firmware.adaptive = %#v", fw["adaptive"])
	}
	p.Adaptive.Fallback = "the server ignores Range requests"
	fw = Patch(p)["firmware"].(map[string]any)
	if a, _ := fw["adaptive"].(map[string]any); a["fallback"] != p.Adaptive.Fallback {
		t.Fatalf("firmware.adaptive = %#v, want the fallback reason", fw["adaptive"])
	}
	// A new update clears the last one's.
	fw = Patch(firmware.Progress{UpdateID: "u2", Phase: firmware.PhaseAccepted})["firmware"].(map[string]any)
	if a, ok := fw["adaptive"]; !ok || a != nil {
		t.Fatalf("accepted: firmware.adaptive = %v (present %v), want null", a, ok)
	}
}
