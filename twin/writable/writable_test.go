package writable

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	"github.com/gwagent/gwagent/twin"
)

type memSink struct {
	mu       sync.Mutex
	list     []map[string]any
	progress int // patches reported as progress, not milestones
}

func (s *memSink) Report(p map[string]any, milestone bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !milestone {
		s.progress++
	}
	b, _ := json.Marshal(p)
	doc, err := twin.Decode(b)
	if err != nil {
		return err
	}
	// Recorded even when invalid, so the tests see what was built.
	s.list = append(s.list, doc)
	return twin.ValidatePatch(doc)
}

func (s *memSink) last() map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.list) == 0 {
		return nil
	}
	return s.list[len(s.list)-1]
}

func (s *memSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.list)
}

// level is a stand-in for the agent's logLevel property.
type level struct{ cur, configured string }

func (l *level) property() Property {
	return Property{
		Apply: func(v any) (any, error) {
			s, ok := v.(string)
			if !ok || (s != "debug" && s != "info" && s != "warn" && s != "error") {
				return l.cur, fmt.Errorf("logLevel must be one of debug, info, warn, error")
			}
			l.cur = s
			return s, nil
		},
		Reset: func() any { l.cur = l.configured; return l.cur },
	}
}

func newAcker() (*Acker, *memSink, *level) {
	s := &memSink{}
	a := New(s, []string{"firmwareStatus", "firmware"}, nil)
	l := &level{cur: "info", configured: "info"}
	a.Register("logLevel", l.property())
	return a, s, l
}

func TestOnDesired(t *testing.T) {
	tests := []struct {
		name    string
		steps   []func(a *Acker)
		level   string
		want    string // JSON of the last patch; "" for no patch
		patches int
	}{
		{"accepted", []func(*Acker){func(a *Acker) { a.OnDesired(map[string]any{"logLevel": "debug"}, 3, false, nil) }},
			"debug", `{"logLevel":{"ac":200,"av":3,"value":"debug"}}`, 1},
		{"refused keeps the old value", []func(*Acker){func(a *Acker) { a.OnDesired(map[string]any{"logLevel": "loud"}, 4, false, nil) }},
			"info", `{"logLevel":{"ac":400,"ad":"logLevel must be one of debug, info, warn, error","av":4,"value":"info"}}`, 1},
		{"wrong type", []func(*Acker){func(a *Acker) { a.OnDesired(map[string]any{"logLevel": json.Number("3")}, 4, false, nil) }},
			"info", `{"logLevel":{"ac":400,"ad":"logLevel must be one of debug, info, warn, error","av":4,"value":"info"}}`, 1},
		{"unknown key", []func(*Acker){func(a *Acker) { a.OnDesired(map[string]any{"telemetryPeriod": "5m"}, 5, false, nil) }},
			"info", `{"unknownDesired":{"ac":400,"ad":"unknown desired property, ignored","av":5,"count":1,"keys":["telemetryPeriod"]}}`, 1},
		{"reserved names are never acknowledged", []func(*Acker){func(a *Acker) {
			a.OnDesired(map[string]any{"firmwareStatus": "completed", "firmware": map[string]any{}}, 6, false, nil)
		}}, "info", "", 0},
		{"empty full document after a restart", []func(*Acker){func(a *Acker) { a.OnDesired(map[string]any{}, 1, true, nil) }},
			"info", "", 0},
		{"patch null withdraws", []func(*Acker){
			func(a *Acker) { a.OnDesired(map[string]any{"logLevel": "warn"}, 3, false, nil) },
			func(a *Acker) { a.OnDesired(map[string]any{"logLevel": nil}, 4, false, nil) },
		}, "info", `{"logLevel":{"ac":200,"ad":"not desired; configured value","av":4,"value":"info"}}`, 2},
		{"absent from a full document withdraws", []func(*Acker){
			func(a *Acker) { a.OnDesired(map[string]any{"logLevel": "warn", "x": "1"}, 3, true, nil) },
			func(a *Acker) { a.OnDesired(map[string]any{}, 7, true, nil) },
		}, "info", `{"logLevel":{"ac":200,"ad":"not desired; configured value","av":7,"value":"info"},"unknownDesired":null}`, 2},
		{"unknown key removed withdraws the 400", []func(*Acker){
			func(a *Acker) { a.OnDesired(map[string]any{"x": "1"}, 3, false, nil) },
			func(a *Acker) { a.OnDesired(map[string]any{"x": nil}, 4, false, nil) },
		}, "info", `{"unknownDesired":null}`, 2},
		// Acknowledgements of unregistered keys are an older version's
		// (one per unknown key): withdrawn, desired or not.
		{"stale acks from before a restart are withdrawn", []func(*Acker){func(a *Acker) {
			a.OnDesired(map[string]any{"y": "2"}, 8, true, map[string]any{
				"x": map[string]any{"ac": json.Number("400"), "av": json.Number("3")}, "y": map[string]any{"ac": json.Number("400"), "av": json.Number("3")},
				"firmware": map[string]any{"ac": 1, "av": 1}, "other": map[string]any{"value": 1}, "logLevel": map[string]any{"ac": 200, "av": 1},
			})
		}}, "info", `{"unknownDesired":{"ac":400,"ad":"unknown desired property, ignored","av":8,"count":1,"keys":["y"]},"x":null,"y":null}`, 1},
		{"full document applies", []func(*Acker){func(a *Acker) { a.OnDesired(map[string]any{"logLevel": "error"}, 9, true, nil) }},
			"error", `{"logLevel":{"ac":200,"av":9,"value":"error"}}`, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, s, l := newAcker()
			for _, step := range tc.steps {
				step(a)
			}
			if l.cur != tc.level {
				t.Errorf("level %s, want %s", l.cur, tc.level)
			}
			if s.count() != tc.patches {
				t.Errorf("%d patches, want %d", s.count(), tc.patches)
			}
			// An acknowledgement must be durable when reported: the queue
			// keeps progress in memory only.
			if s.progress != 0 {
				t.Errorf("%d acknowledgement patches reported as progress, want milestones", s.progress)
			}
			got := ""
			if p := s.last(); p != nil {
				b, _ := json.Marshal(p)
				got = string(b)
			}
			if got != tc.want {
				t.Errorf("last patch %s\nwant       %s", got, tc.want)
			}
		})
	}
}

// Any desired document, valid or not, yields only valid reported patches
// and never panics.
func FuzzOnDesired(f *testing.F) {
	f.Add([]byte(`{"logLevel":"debug"}`), int64(2), false)
	f.Add([]byte(`{"logLevel":null,"x":{"y":1}}`), int64(3), true)
	f.Add([]byte(`{"a.b":1,"$version":4,"firmware":null}`), int64(4), false)
	f.Fuzz(func(t *testing.T, body []byte, version int64, full bool) {
		doc, err := twin.Decode(body)
		if err != nil {
			return
		}
		a, s, _ := newAcker()
		a.OnDesired(doc, version, full, doc)
		if p := s.last(); p != nil {
			if err := twin.ValidatePatch(p); err != nil {
				t.Fatalf("invalid ack patch %v: %v", p, err)
			}
		}
	})
}
