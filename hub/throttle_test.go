package hub

import (
	"net/http"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// TestTwinWriteThrottle: with TwinWriteRate set, service twin writes over
// it are answered 429 ThrottlingException with Retry-After, nothing is
// written for them, and the counters say so; after the wait, writes pass.
func TestTwinWriteThrottle(t *testing.T) {
	const limit = 2
	h := startHub(t, func(c *Config) { c.TwinWriteRate = limit })
	addDevice(t, h, "gw-01")
	s := newService(t, h)

	started := time.Now()
	ok, throttled := 0, 0
	for i := range 12 {
		st, body, resp := s.do(http.MethodPatch, "/twins/gw-01", map[string]any{"tags": map[string]any{"n": i}})
		switch st {
		case http.StatusOK:
			ok++
		case http.StatusTooManyRequests:
			wantError(t, st, body, http.StatusTooManyRequests, iothub.CodeThrottlingException)
			if got := resp.Header.Get("Retry-After"); got != "1" {
				t.Errorf("Retry-After %q, want 1", got)
			}
			throttled++
		default:
			t.Fatalf("PATCH answered %d: %s", st, body)
		}
	}
	elapsed := time.Since(started)
	// The bucket holds one second (limit writes) and refills at limit/s.
	if most := limit + int(elapsed.Seconds()*limit) + 1; ok > most {
		t.Errorf("%d writes passed in %v, want at most %d", ok, elapsed, most)
	}
	if throttled == 0 {
		t.Fatal("no write was throttled")
	}
	st := h.TwinWriteStats()
	if st.Writes != int64(ok) || st.Throttled != int64(throttled) || st.Limit != limit {
		t.Errorf("stats %+v, want %d writes, %d throttled, limit %d", st, ok, throttled, limit)
	}
	if st.Peak < 1 || st.Peak > int64(ok) {
		t.Errorf("peak %d, want 1..%d", st.Peak, ok)
	}
	tw, err := h.Twin("gw-01")
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version < 1 || tw.Tags["n"] == nil {
		t.Fatalf("twin not written: %+v", tw)
	}

	time.Sleep(time.Second) // the wait Retry-After asked for
	if st, body, _ := s.do(http.MethodPatch, "/twins/gw-01", map[string]any{"tags": map[string]any{"after": true}}); st != http.StatusOK {
		t.Fatalf("PATCH after Retry-After answered %d: %s", st, body)
	}
}

// TestTwinWriteNoThrottle: without TwinWriteRate every write passes and
// is counted.
func TestTwinWriteNoThrottle(t *testing.T) {
	h := startHub(t)
	addDevice(t, h, "gw-01")
	s := newService(t, h)
	for i := range 20 {
		if st, body, _ := s.do(http.MethodPatch, "/twins/gw-01", map[string]any{"tags": map[string]any{"n": i}}); st != http.StatusOK {
			t.Fatalf("PATCH %d answered %d: %s", i, st, body)
		}
	}
	if st := h.TwinWriteStats(); st.Writes != 20 || st.Throttled != 0 || st.Limit != 0 {
		t.Fatalf("stats %+v, want 20 writes, none throttled, no limit", st)
	}
}

// TestJobTwinUpdatesWaitForThrottle: a job's twin updates over the
// throttle wait for their turn instead of failing, and are counted.
func TestJobTwinUpdatesWaitForThrottle(t *testing.T) {
	const limit = 2
	h := startHub(t, func(c *Config) { c.TwinWriteRate = limit })
	svc := newService(t, h)
	ids := []string{"j1", "j2", "j3", "j4", "j5", "j6"}
	for _, id := range ids {
		addDevice(t, h, id)
	}
	for _, id := range ids {
		// Tags by REST, under the throttle too: wait out its 429s.
		for {
			st, b, _ := svc.do("PATCH", "/twins/"+id, map[string]any{"tags": map[string]any{"ring": "1"}})
			if st == http.StatusOK {
				break
			}
			if st != http.StatusTooManyRequests {
				t.Fatalf("PATCH tags of %s: %d %s", id, st, b)
			}
			time.Sleep(time.Second)
		}
	}
	before := h.TwinWriteStats()
	started := time.Now()
	st, b, _ := svc.do("PUT", "/jobs/v2/slow", map[string]any{
		"jobId": "slow", "type": "scheduleUpdateTwin", "queryCondition": "tags.ring = '1'",
		"updateTwin": map[string]any{"etag": "*", "tags": map[string]any{"wave": "1"}},
		"startTime":  nil, "maxExecutionTimeInSeconds": 3600,
	})
	if st != http.StatusOK {
		t.Fatalf("PUT job: %d %s", st, b)
	}
	job := waitJob(t, svc, "slow", "completed")
	if s := job["deviceJobStatistics"].(map[string]any); num(t, s["succeededCount"]) != int64(len(ids)) {
		t.Fatalf("statistics %v, want all %d succeeded", s, len(ids))
	}
	after := h.TwinWriteStats()
	if got := after.Writes - before.Writes; got != int64(len(ids)) {
		t.Errorf("%d writes counted for the job, want %d", got, len(ids))
	}
	if after.Throttled != before.Throttled {
		t.Errorf("the job's writes were answered 429 (%d)", after.Throttled-before.Throttled)
	}
	// Six writes at 2/s, the bucket possibly drained by the tag writes:
	// at least (6 - 2) / 2 s.
	if elapsed := time.Since(started); elapsed < 1500*time.Millisecond {
		t.Errorf("the job took %v: its writes were not paced at %d/s", elapsed, limit)
	}
}
