package hub

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

// setTags writes a device's tags as Registry.updateTwin does.
func setTags(t *testing.T, svc *service, id string, tags map[string]any) {
	t.Helper()
	if st, b, _ := svc.do("PATCH", "/twins/"+id, map[string]any{"tags": tags}, "If-Match", `"*"`); st != 200 {
		t.Fatalf("PATCH tags of %s: %d %s", id, st, b)
	}
}

// countMethods makes the device answer every call with 200 and counts the
// calls.
func (d *testDevice) countMethods(n *atomic.Int32) {
	d.t.Helper()
	tok := d.c.Subscribe(iothub.MethodsFilter, 0, func(c paho.Client, m paho.Message) {
		t, err := iothub.ParseTopic(m.Topic())
		if err != nil {
			return
		}
		n.Add(1)
		c.Publish(iothub.MethodResponseTopic(200, t.RID), 0, false, []byte(`{"accepted":true}`))
	})
	if !tok.WaitTimeout(waitLong) || tok.Error() != nil {
		d.t.Fatalf("subscribe methods: %v", tok.Error())
	}
}

func waitJob(t *testing.T, svc *service, id, status string) map[string]any {
	t.Helper()
	var job map[string]any
	testutil.Eventually(t, waitLong, "job "+id+" "+status, func() bool {
		st, b, _ := svc.do("GET", "/jobs/v2/"+id, nil)
		if st != 200 {
			t.Fatalf("GET job: %d %s", st, b)
		}
		job = decodeJSON(t, b)
		return job["status"] == status
	})
	return job
}

func queryRows(t *testing.T, svc *service, q string) []map[string]any {
	t.Helper()
	st, b, _ := svc.do("POST", "/devices/query", map[string]any{"query": q})
	if st != 200 {
		t.Fatalf("query %q: %d %s", q, st, b)
	}
	var rows []map[string]any
	for _, raw := range splitArray(t, b) {
		rows = append(rows, decodeJSON(t, raw))
	}
	return rows
}

func splitArray(t *testing.T, b []byte) [][]byte {
	t.Helper()
	var raws []json.RawMessage
	if err := json.Unmarshal(b, &raws); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	out := make([][]byte, len(raws))
	for i, r := range raws {
		out[i] = r
	}
	return out
}

func TestTwinTagsQuery(t *testing.T) {
	h := startHub(t)
	svc := newService(t, h)
	keys := map[string][]byte{}
	for _, id := range []string{"a1", "a2", "b1"} {
		keys[id] = addDevice(t, h, id)
	}
	// ETag: a stale one is refused, the current one accepted.
	_, b, _ := svc.do("GET", "/twins/a1", nil)
	etag := decodeJSON(t, b)["etag"].(string)
	setTags(t, svc, "a1", map[string]any{"site": "x"})
	st, b, _ := svc.do("PATCH", "/twins/a1", map[string]any{"tags": map[string]any{"site": "y"}}, "If-Match", strconv.Quote(etag))
	wantError(t, st, b, 412, iothub.CodePreconditionFailed)
	setTags(t, svc, "a2", map[string]any{"site": "x"})
	setTags(t, svc, "b1", map[string]any{"site": "y"})

	// a1 reports a failed update, a2 a completed one.
	for id, status := range map[string]string{"a1": "failed", "a2": "completed"} {
		d := connect(t, h, id, keys[id])
		d.sub("$iothub/twin/res/#")
		if rt, body := d.twinRequest(iothub.TwinReportedTopic("r1"), []byte(`{"firmware":{"status":"`+status+`"}}`)); rt.Status != 204 {
			t.Fatalf("reported: %d %s", rt.Status, body)
		}
	}
	rows := queryRows(t, svc, "SELECT * FROM devices WHERE tags.site = 'x' AND properties.reported.firmware.status = 'failed'")
	if len(rows) != 1 || rows[0]["deviceId"] != "a1" {
		t.Fatalf("query matched %v, want a1 only", rows)
	}
	if rows := queryRows(t, svc, "SELECT * FROM devices WHERE tags.site = 'x'"); len(rows) != 2 {
		t.Fatalf("tags.site = 'x' matched %d, want 2", len(rows))
	}
	// PUT replaces the tags.
	if st, b, _ := svc.do("PUT", "/twins/a1", map[string]any{"tags": map[string]any{"ring": "1"}}); st != 200 {
		t.Fatalf("PUT: %d %s", st, b)
	}
	if rows := queryRows(t, svc, "SELECT * FROM devices WHERE tags.site = 'x'"); len(rows) != 1 || rows[0]["deviceId"] != "a2" {
		t.Fatalf("after PUT, tags.site = 'x' matched %v", rows)
	}
}

// TestJobDeviceMethod runs a method job on the devices tagged site=a: two
// online, one offline; a device tagged site=b must not be called.
func TestJobDeviceMethod(t *testing.T) {
	h := startHub(t, func(c *Config) { c.JobDeviceRate = 20 })
	svc := newService(t, h)
	var calls [3]atomic.Int32
	var other atomic.Int32
	for i := range 3 {
		id := fmt.Sprintf("s%d", i)
		key := addDevice(t, h, id)
		setTags(t, svc, id, map[string]any{"site": "a"})
		if i < 2 { // s2 stays offline
			connect(t, h, id, key).countMethods(&calls[i])
		}
	}
	key := addDevice(t, h, "o0")
	setTags(t, svc, "o0", map[string]any{"site": "b"})
	connect(t, h, "o0", key).countMethods(&other)

	st, b, _ := svc.do("PUT", "/jobs/v2/j1", map[string]any{
		"jobId": "j1", "type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'",
		"cloudToDeviceMethod": map[string]any{"methodName": "firmwareUpdate", "payload": map[string]any{"version": "2"}, "responseTimeoutInSeconds": 10},
		"startTime":           time.Now().UTC().Format(time.RFC3339), "maxExecutionTimeInSeconds": 60,
	})
	if st != 200 {
		t.Fatalf("PUT job: %d %s", st, b)
	}
	if got := decodeJSON(t, b); got["type"] != "scheduleDeviceMethod" || got["jobId"] != "j1" {
		t.Fatalf("PUT answer %s", b)
	}
	job := waitJob(t, svc, "j1", "completed")
	stats := job["deviceJobStatistics"].(map[string]any)
	if num(t, stats["deviceCount"]) != 3 || num(t, stats["succeededCount"]) != 2 || num(t, stats["failedCount"]) != 1 ||
		num(t, stats["pendingCount"]) != 0 || num(t, stats["runningCount"]) != 0 {
		t.Fatalf("statistics %v", stats)
	}
	if calls[0].Load() != 1 || calls[1].Load() != 1 || other.Load() != 0 {
		t.Fatalf("calls s0=%d s1=%d o0=%d, want 1 1 0", calls[0].Load(), calls[1].Load(), other.Load())
	}
	failed := queryRows(t, svc, "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j1' AND devices.jobs.status = 'failed'")
	if len(failed) != 1 || failed[0]["deviceId"] != "s2" || failed[0]["error"].(map[string]any)["code"] != "DeviceNotOnline" {
		t.Fatalf("failed rows %v", failed)
	}
	done := queryRows(t, svc, "SELECT * FROM devices.jobs WHERE jobId = 'j1' AND status = 'completed'")
	if len(done) != 2 {
		t.Fatalf("completed rows %v", done)
	}
	resp := done[0]["outcome"].(map[string]any)["deviceMethodResponse"].(map[string]any)
	if num(t, resp["status"]) != 200 {
		t.Fatalf("outcome %v", done[0]["outcome"])
	}
	// Pacing: at 20/s the three starts are at least 2 × 50 ms apart.
	all := queryRows(t, svc, "SELECT * FROM devices.jobs WHERE jobId = 'j1'")
	var first, last time.Time
	for _, r := range all {
		ts, err := time.Parse(time.RFC3339Nano, r["startTimeUtc"].(string))
		if err != nil {
			t.Fatal(err)
		}
		if first.IsZero() || ts.Before(first) {
			first = ts
		}
		if ts.After(last) {
			last = ts
		}
	}
	if d := last.Sub(first); d < 95*time.Millisecond {
		t.Fatalf("three devices started within %v, faster than 20/s", d)
	}
	// Job query with filters.
	st, b, _ = svc.do("GET", "/jobs/v2/query?jobType=scheduleDeviceMethod&jobStatus=completed", nil)
	if st != 200 || !strings.Contains(string(b), `"jobId":"j1"`) {
		t.Fatalf("jobs query: %d %s", st, b)
	}
	st, b, _ = svc.do("GET", "/jobs/v2/query?jobType=scheduleUpdateTwin", nil)
	if st != 200 || string(b) != "[]" {
		t.Fatalf("jobs query for twin jobs: %d %s", st, b)
	}
	// The same id again is refused.
	st, b, _ = svc.do("PUT", "/jobs/v2/j1", map[string]any{"type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'",
		"cloudToDeviceMethod": map[string]any{"methodName": "reboot"}})
	if st != 409 {
		t.Fatalf("second PUT of j1: %d %s", st, b)
	}
}

func TestJobUpdateTwin(t *testing.T) {
	h := startHub(t)
	svc := newService(t, h)
	for _, id := range []string{"t1", "t2", "t3"} {
		addDevice(t, h, id)
	}
	setTags(t, svc, "t1", map[string]any{"ring": "1"})
	setTags(t, svc, "t2", map[string]any{"ring": "1"})
	st, b, _ := svc.do("PUT", "/jobs/v2/tw", map[string]any{
		"jobId": "tw", "type": "scheduleUpdateTwin", "queryCondition": "tags.ring = '1'",
		"updateTwin": map[string]any{"etag": "*", "tags": map[string]any{"wave": "1"}, "properties": map[string]any{"desired": map[string]any{"firmware": map[string]any{"version": "2.0.0"}}}},
		"startTime":  nil, "maxExecutionTimeInSeconds": 3600,
	})
	if st != 200 {
		t.Fatalf("PUT job: %d %s", st, b)
	}
	job := waitJob(t, svc, "tw", "completed")
	if s := job["deviceJobStatistics"].(map[string]any); num(t, s["succeededCount"]) != 2 || num(t, s["deviceCount"]) != 2 {
		t.Fatalf("statistics %v", s)
	}
	rows := queryRows(t, svc, "SELECT * FROM devices WHERE tags.wave = '1' AND properties.desired.firmware.version = '2.0.0'")
	if len(rows) != 2 || rows[0]["deviceId"] != "t1" || rows[1]["deviceId"] != "t2" {
		t.Fatalf("updated twins %v", rows)
	}
}

func TestJobScheduledCancelAndRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}
	h, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	svc := newService(t, h)
	addDevice(t, h, "d1")
	later := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	for _, id := range []string{"later", "tocancel"} {
		st, b, _ := svc.do("PUT", "/jobs/v2/"+id, map[string]any{"type": "scheduleDeviceMethod", "queryCondition": "deviceId = 'd1'",
			"cloudToDeviceMethod": map[string]any{"methodName": "reboot"}, "startTime": later})
		if st != 200 || decodeJSON(t, b)["status"] != "queued" {
			t.Fatalf("PUT %s: %d %s", id, st, b)
		}
	}
	st, b, _ := svc.do("POST", "/jobs/v2/tocancel/cancel", nil)
	if st != 200 || decodeJSON(t, b)["status"] != "cancelled" {
		t.Fatalf("cancel: %d %s", st, b)
	}
	st, b, _ = svc.do("POST", "/jobs/v2/nosuch/cancel", nil)
	wantError(t, st, b, 404, codeJobNotFound)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}

	h2 := startHubWith(t, cfg)
	svc2 := newService(t, h2)
	for id, status := range map[string]string{"later": "queued", "tocancel": "cancelled"} {
		st, b, _ := svc2.do("GET", "/jobs/v2/"+id, nil)
		if st != 200 || decodeJSON(t, b)["status"] != status {
			t.Fatalf("after restart, %s: %d %s, want %s", id, st, b, status)
		}
	}
	st, b, _ = svc2.do("GET", "/jobs/v2/query?jobStatus=queued", nil)
	if st != 200 || !strings.Contains(string(b), `"jobId":"later"`) || strings.Contains(string(b), "tocancel") {
		t.Fatalf("queued jobs: %d %s", st, b)
	}
}

func TestJobBadInput(t *testing.T) {
	h := startHub(t)
	svc := newService(t, h)
	method := map[string]any{"methodName": "reboot"}
	for name, body := range map[string]map[string]any{
		"bad query":    {"type": "scheduleDeviceMethod", "queryCondition": "tags.site = ", "cloudToDeviceMethod": method},
		"no query":     {"type": "scheduleDeviceMethod", "cloudToDeviceMethod": method},
		"bad time":     {"type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'", "cloudToDeviceMethod": method, "startTime": "tomorrow"},
		"bad max":      {"type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'", "cloudToDeviceMethod": method, "maxExecutionTimeInSeconds": -1},
		"bad type":     {"type": "export", "queryCondition": "tags.site = 'a'"},
		"no method":    {"type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'"},
		"no patch":     {"type": "scheduleUpdateTwin", "queryCondition": "tags.site = 'a'"},
		"reported":     {"type": "scheduleUpdateTwin", "queryCondition": "tags.site = 'a'", "updateTwin": map[string]any{"properties": map[string]any{"reported": map[string]any{"x": 1}}}},
		"id mismatch":  {"jobId": "other", "type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'", "cloudToDeviceMethod": method},
		"long timeout": {"type": "scheduleDeviceMethod", "queryCondition": "tags.site = 'a'", "cloudToDeviceMethod": map[string]any{"methodName": "reboot", "responseTimeoutInSeconds": 1000}},
	} {
		t.Run(name, func(t *testing.T) {
			st, b, _ := svc.do("PUT", "/jobs/v2/bad", body)
			wantError(t, st, b, 400, iothub.CodeArgumentInvalid)
		})
	}
	st, b, _ := svc.do("GET", "/jobs/v2/bad", nil)
	wantError(t, st, b, 404, codeJobNotFound)
}
