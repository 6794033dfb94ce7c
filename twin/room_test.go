package twin

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/iothub"
)

// sizeLimit makes h refuse, as IoT Hub does, a patch that would take the
// reported document over MaxReportedSize: 400 with an error body.
func sizeLimit(h *hubSim) func(ctx context.Context, call int, body []byte) error {
	return func(_ context.Context, _ int, body []byte) error {
		patch, err := Decode(body)
		if err != nil {
			return err
		}
		h.mu.Lock()
		merged := Merge(copyValue(h.doc).(map[string]any), patch)
		h.mu.Unlock()
		if n := Size(merged); n > MaxReportedSize {
			return &iothub.StatusError{Status: 400, Body: []byte(`{"errorCode":400004,"message":"reported properties would be ` +
				strings.Repeat("9", 5) + ` bytes, over the limit"}`)}
		}
		return nil
	}
}

// fullTwin is a reported document MaxReportedSize-slack bytes large: the
// agent's own acknowledgement of unknown keys and data of someone else.
func fullTwin(slack int) map[string]any {
	ack := map[string]any{"ac": 400, "av": 3, "count": 900, "keys": []any{strings.Repeat("k", 900)}}
	doc := map[string]any{"unknownDesired": ack, "inventory": map[string]any{}}
	for i := 0; Size(doc) < MaxReportedSize-slack-4100; i++ {
		doc["inventory"].(map[string]any)[string(rune('a'+i))] = strings.Repeat("x", 4000)
	}
	last := MaxReportedSize - slack - Size(doc) - 1
	doc["inventory"].(map[string]any)["z"] = strings.Repeat("x", last)
	return mustDecodeValue(doc)
}

func mustDecodeValue(doc map[string]any) map[string]any {
	p, err := normalize(doc)
	if err != nil {
		panic(err)
	}
	return p
}

// A milestone the hub refuses because the reported properties are full is
// not dropped: the queue withdraws what MakeRoom offers and sends it again.
// Only a second refusal, or nothing to withdraw, drops it; progress and
// other refusals are dropped as before, without asking.
func TestMakeRoomForRefusedMilestone(t *testing.T) {
	failed := `{"firmwareStatus":"failed","firmware":{"status":"failed","error":{"code":"downloadFailed","message":"download: HTTP 404 Not Found from http://fw.example.com/missing.bin"}}}`
	tests := []struct {
		name      string
		room      map[string]any
		milestone bool
		status    int // a fixed refusal instead of the size limit
		delivered bool
		asked     int64
		log       string
	}{
		{"withdrawal makes room", map[string]any{"unknownDesired": nil}, true, 0, true, 1,
			"the hub refused a state change, perhaps for the size of the reported properties; withdrew data the agent can do without and sending it again"},
		{"withdrawal too small", map[string]any{"gone": nil}, true, 0, false, 1,
			"reported patch rejected by the hub even after making room; dropped"},
		{"nothing to withdraw", nil, true, 0, false, 1,
			"the hub refused a state change and nothing can be withdrawn to make room in the reported properties"},
		{"progress is not worth it", map[string]any{"unknownDesired": nil}, false, 0, false, 0,
			"reported patch rejected by the hub; dropped"},
		{"403 is not about size", map[string]any{"unknownDesired": nil}, true, 403, false, 0,
			"reported patch rejected by the hub; dropped"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hub := &hubSim{doc: fullTwin(100)}
			if tc.status != 0 {
				hub.setScript(func(_ context.Context, _ int, body []byte) error {
					if strings.Contains(string(body), "firmwareStatus") {
						return &iothub.StatusError{Status: tc.status, Body: []byte(`{"errorCode":403000}`)}
					}
					return nil
				})
			} else {
				hub.setScript(sizeLimit(hub))
			}
			var asked atomic.Int64
			opts := fastOpts()
			opts.MakeRoom = func(ctx context.Context, refused map[string]any) map[string]any {
				asked.Add(1)
				if refused["firmwareStatus"] != "failed" {
					t.Errorf("MakeRoom got %v, want the refused patch", refused)
				}
				if _, ok := ctx.Deadline(); !ok {
					t.Error("MakeRoom's context has no deadline")
				}
				return tc.room
			}
			core, logs := observer.New(zap.InfoLevel)
			q := openTestQueue(t, t.TempDir(), hub, opts, zap.New(core))
			report(t, q, failed, tc.milestone)
			startRun(t, q)
			flush(t, q)
			report(t, q, `{"logTime":"2026-11-26T02:09:14.643Z"}`, true) // the queue goes on
			flush(t, q)

			doc, _, _ := hub.snapshot()
			if got := doc["firmwareStatus"] == "failed"; got != tc.delivered {
				t.Errorf("the milestone delivered: %v, want %v", got, tc.delivered)
			}
			if doc["logTime"] == nil {
				t.Error("the next patch was not delivered")
			}
			if _, kept := doc["unknownDesired"]; kept == (tc.name == "withdrawal makes room") {
				t.Errorf("unknownDesired on the hub: %v", kept)
			}
			if n := asked.Load(); n != tc.asked {
				t.Errorf("MakeRoom asked %d times, want %d", n, tc.asked)
			}
			if n := len(logs.FilterMessage(tc.log).All()); n != 1 {
				t.Errorf("%d logs %q; all: %v", n, tc.log, logs.All())
			}
		})
	}
}

// A withdrawal too large for one patch is sent in parts.
func TestMakeRoomSplitsTheWithdrawal(t *testing.T) {
	doc := map[string]any{}
	room := map[string]any{}
	for i := range 900 {
		k := strings.Repeat("k", 30) + string(rune(0x4e00+i)) // 33 bytes
		doc[k] = "x"
		room[k] = nil
	}
	hub := &hubSim{doc: Merge(fullTwin(Size(doc)+50), doc)}
	hub.setScript(sizeLimit(hub))
	opts := fastOpts()
	opts.MakeRoom = func(context.Context, map[string]any) map[string]any { return room }
	q := openTestQueue(t, t.TempDir(), hub, opts, nil)
	report(t, q, `{"firmwareStatus":"completed","firmware":{"status":"completed","updateId":"3f1d5b7e-2a0c-4c1e-9d1a-0b6c2f8e7a55"}}`, true)
	startRun(t, q)
	flush(t, q)
	got, accepted, _ := hub.snapshot()
	if got["firmwareStatus"] != "completed" {
		t.Fatalf("the milestone was not delivered")
	}
	if len(accepted) < 3 {
		t.Fatalf("%d patches accepted, want the withdrawal in at least two parts and the milestone", len(accepted))
	}
}
