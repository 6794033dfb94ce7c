package writable

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/twin"
)

// unknownDoc is a desired document with n keys the agent does not know.
func unknownDoc(n int, keyLen int) map[string]any {
	doc := map[string]any{}
	for i := range n {
		k := fmt.Sprintf("setting%05d", i)
		k += strings.Repeat("x", max(keyLen-len(k), 0))
		doc[k] = "on"
	}
	return doc
}

// applied applies every patch the sink got, in order, to a copy of doc
// (nil: an empty twin).
func (s *memSink) applied(doc map[string]any) map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	doc = twin.Merge(nil, doc)
	for _, p := range s.list {
		doc = twin.Merge(doc, p)
	}
	return doc
}

// However many desired keys are unknown, they cost the reported
// properties one bounded acknowledgement, and the log one line.
func TestUnknownKeysAggregated(t *testing.T) {
	for _, tc := range []struct {
		name        string
		n, keyLen   int
		wantListed  int
		wantAckSize int // at most
	}{
		{"the issue's 1,250 keys", 1250, 12, MaxListed, 400},
		{"keys of 1 KB", 30, 1024, 1, 1300},
		{"keys of 200 bytes", 30, 200, 5, 1300},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zap.InfoLevel)
			s := &memSink{}
			a := New(s, []string{"firmwareStatus", "firmware"}, zap.New(core))
			doc := unknownDoc(tc.n, tc.keyLen)
			a.OnDesired(doc, 7, true, map[string]any{})
			if s.count() != 1 {
				t.Fatalf("%d patches, want 1", s.count())
			}
			p := s.last()
			if len(p) != 1 {
				t.Fatalf("patch has %d members, want only %s", len(p), UnknownKey)
			}
			ack := p[UnknownKey].(map[string]any)
			keys, _ := ack["keys"].([]any)
			if fmt.Sprint(ack["count"]) != fmt.Sprint(tc.n) || fmt.Sprint(ack["ac"]) != "400" || fmt.Sprint(ack["av"]) != "7" || len(keys) != tc.wantListed {
				t.Fatalf("acknowledgement %v: want count %d, %d keys listed", ack, tc.n, tc.wantListed)
			}
			if keys[0] != "setting00000"+strings.Repeat("x", max(tc.keyLen-12, 0)) {
				t.Errorf("first listed key %v, want the first in sorted order", keys[0])
			}
			if n := twin.Size(p); n > tc.wantAckSize {
				t.Errorf("acknowledgement of %d bytes, want at most %d", n, tc.wantAckSize)
			}
			if n := len(logs.All()); n != 1 {
				t.Errorf("%d log lines for %d unknown keys, want 1", n, tc.n)
			}
		})
	}
}

// The acknowledgement follows the set of unknown keys, and only changes
// of it: a key added or removed rewrites it, anything else leaves it; a
// full document after a reconnect writes it only if the twin shows
// something else.
func TestUnknownAckFollowsTheSet(t *testing.T) {
	a, s, _ := newAcker()
	a.OnDesired(map[string]any{"b": 1, "a": 2}, 3, true, map[string]any{})
	a.OnDesired(map[string]any{"logLevel": "debug"}, 4, false, nil)
	if got := mustJSON(s.last()); got != `{"logLevel":{"ac":200,"av":4,"value":"debug"}}` {
		t.Fatalf("a known key's change wrote %s", got)
	}
	a.OnDesired(map[string]any{"c": 3}, 5, false, nil)
	if got := mustJSON(s.last()[UnknownKey]); got != `{"ac":400,"ad":"3 unknown desired properties, ignored","av":5,"count":3,"keys":["a","b","c"]}` {
		t.Fatalf("after a key was added: %s", got)
	}
	n := s.count()
	a.OnDesired(map[string]any{"c": 4}, 6, false, nil) // a new value of a known-unknown key
	if s.count() != n {
		t.Fatalf("a changed value of an unknown key wrote %s", mustJSON(s.last()))
	}
	// A reconnect: the twin shows the acknowledgement as it is.
	twinNow := s.applied(nil)
	a.OnDesired(map[string]any{"a": 2, "b": 1, "c": 4, "logLevel": "debug"}, 6, true, twinNow)
	if p := s.last(); p[UnknownKey] != nil || s.count() != n+1 {
		t.Fatalf("a reconnect with nothing changed wrote %s", mustJSON(p))
	}
	// The twin lost it (withdrawn to make room): written again.
	delete(twinNow, UnknownKey)
	a.OnDesired(map[string]any{"a": 2, "b": 1, "c": 4, "logLevel": "debug"}, 6, true, twinNow)
	if got := mustJSON(s.last()[UnknownKey]); !strings.Contains(got, `"count":3`) {
		t.Fatalf("after the twin lost it: %s", got)
	}
	a.OnDesired(map[string]any{"a": nil, "b": nil, "c": nil}, 8, false, nil)
	if p := s.last(); mustJSON(p) != `{"unknownDesired":null}` {
		t.Fatalf("with no unknown key left: %s", mustJSON(p))
	}
	// Desired keys named like the acknowledgement are the agent's own.
	a.OnDesired(map[string]any{UnknownKey: map[string]any{"x": 1}}, 9, false, nil)
	if p := s.last(); mustJSON(p) != `{"unknownDesired":null}` {
		t.Fatalf("a desired %s was acknowledged: %s", UnknownKey, mustJSON(p))
	}
}

// An older version acknowledged each unknown key: a twin full of those
// is cleaned up, in patches the queue takes.
func TestStaleAcksWithdrawnInChunks(t *testing.T) {
	a, s, _ := newAcker()
	doc := unknownDoc(1000, 30)
	reported := map[string]any{"firmwareStatus": "failed", "logLevel": map[string]any{"ac": 200, "av": 1}}
	for k := range doc {
		reported[k] = map[string]any{"ac": json.Number("400"), "av": json.Number("2"), "ad": "unknown property"}
	}
	a.OnDesired(doc, 9, true, reported)
	twinNow := s.applied(reported)
	for k := range doc {
		if _, ok := twinNow[k]; ok {
			t.Fatalf("stale acknowledgement of %s left", k)
		}
	}
	if twinNow["firmwareStatus"] != "failed" || twinNow["logLevel"] == nil || twinNow[UnknownKey] == nil {
		t.Fatalf("the clean-up touched what it must not: %v", twinNow)
	}
	if s.count() < 2 {
		t.Fatalf("%d patches for 1000 withdrawals of 30-byte keys", s.count())
	}
	for _, p := range s.list {
		if n := twin.Size(p); n > chunkSize {
			t.Errorf("patch of %d bytes, over %d", n, chunkSize)
		}
	}
}

// Withdrawal: what the agent can take off the twin to make room — the
// older version's acknowledgements and the aggregated one, not those of
// registered properties — once the twin is known.
func TestWithdrawal(t *testing.T) {
	a, _, _ := newAcker()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if p := a.Withdrawal(ctx); p != nil {
		t.Fatalf("before the twin is known: %v", p)
	}
	a.OnDesired(map[string]any{"x": 1, "logLevel": "warn"}, 3, true, map[string]any{
		"old": map[string]any{"ac": 400, "av": 1}, "logLevel": map[string]any{"ac": 200, "av": 2},
	})
	p := a.Withdrawal(context.Background())
	if got := mustJSON(p); got != `{"old":null,"unknownDesired":null}` {
		t.Fatalf("withdrawal %s", got)
	}
	// Written again with the next change.
	a.OnDesired(map[string]any{"y": 1}, 4, false, nil)
	if p := a.Withdrawal(context.Background()); mustJSON(p) != `{"old":null,"unknownDesired":null}` {
		t.Fatalf("second withdrawal %s", mustJSON(p))
	}
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}
