package hub

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/twin"
)

func twinSize(doc map[string]any) int { return twin.Size(doc) }

func TestTwinGetAndReported(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	d := connect(t, h, "dev1", key)
	d.sub(iothub.TwinResponseFilter)

	rt, body := d.twinRequest(iothub.TwinGetTopic("get-1"), nil)
	if rt.Status != 200 {
		t.Fatalf("GET status %d", rt.Status)
	}
	doc := decodeJSON(t, body)
	for _, sec := range []string{"desired", "reported"} {
		m, ok := doc[sec].(map[string]any)
		if !ok {
			t.Fatalf("GET body %s lacks %s", body, sec)
		}
		if num(t, m["$version"]) != 1 {
			t.Fatalf("%s $version = %v, want 1", sec, m["$version"])
		}
		if _, ok := m["$metadata"]; ok {
			t.Fatalf("device GET must not carry $metadata: %s", body)
		}
	}
	if len(doc) != 2 {
		t.Fatalf("GET body has extra members: %s", body)
	}

	// A rid is echoed byte for byte, whatever its form.
	for i, rid := range []string{"2", "a0f3", "9b2f1c4e-0b1a-4c6e-9d3c-2b8f6f1d0a11", "get_twin"} {
		patch := fmt.Sprintf(`{"firmware":{"status":"downloading","percent":%d},"gone":null}`, i*10)
		rt, body := d.twinRequest(iothub.TwinReportedTopic(rid), []byte(patch))
		if rt.Status != 204 || rt.RID != rid || rt.Version != int64(2+i) || len(body) != 0 {
			t.Fatalf("PATCH %d: status %d rid %q version %d body %q", i, rt.Status, rt.RID, rt.Version, body)
		}
	}
	_, body = d.twinRequest(iothub.TwinGetTopic("get-2"), []byte(" "))
	rep := decodeJSON(t, body)["reported"].(map[string]any)
	if fw := rep["firmware"].(map[string]any); fw["status"] != "downloading" || num(t, fw["percent"]) != 30 || num(t, rep["$version"]) != 5 {
		t.Fatalf("reported after patches: %s", body)
	}
	// null deletes.
	d.twinRequest(iothub.TwinReportedTopic("del"), []byte(`{"firmware":{"percent":null}}`))
	tw, err := h.Twin("dev1")
	if err != nil {
		t.Fatal(err)
	}
	fw := tw.Properties.Reported["firmware"].(map[string]any)
	if _, ok := fw["percent"]; ok || fw["status"] != "downloading" {
		t.Fatalf("null did not delete only percent: %v", fw)
	}
	meta := tw.Properties.Reported["$metadata"].(map[string]any)
	if _, ok := meta["$lastUpdated"]; !ok {
		t.Fatalf("service view lacks $metadata.$lastUpdated: %v", meta)
	}
	if _, ok := meta["firmware"].(map[string]any)["status"].(map[string]any)["$lastUpdated"]; !ok {
		t.Fatalf("no $lastUpdated for firmware.status: %v", meta)
	}
	if tw.Version != 6 || tw.ETag != twinETag(6) {
		t.Fatalf("twin version %d etag %s, want 6 and %s", tw.Version, tw.ETag, twinETag(6))
	}
}

func TestReportedRejected(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	d := connect(t, h, "dev1", key)
	d.sub(iothub.TwinResponseFilter)

	deep := `{"v":1}`
	for range 11 {
		deep = `{"k":` + deep + `}`
	}
	tests := []struct {
		name string
		body string
	}{
		{"bad JSON", `{"a":`},
		{"not an object", `[1,2]`},
		{"key with $", `{"$version":3}`},
		{"nested key with $", `{"a":{"b$c":1}}`},
		{"key with .", `{"a.b":1}`},
		{"key with space", `{"a b":1}`},
		{"33 KB patch", `{"big":"` + strings.Repeat("x", 4000) + `","more":{` + manyStrings(9, 3900) + `}}`},
		{"string over 4 KB", `{"s":"` + strings.Repeat("x", 4097) + `"}`},
		{"too deep", deep},
		{"integer over 2^52", `{"n":4503599627370496}`},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rt, body := d.twinRequest(iothub.TwinReportedTopic(fmt.Sprint("bad", i)), []byte(tc.body))
			if rt.Status != 400 || rt.Version != 0 {
				t.Fatalf("status %d version %d, want 400 without version", rt.Status, rt.Version)
			}
			var e struct {
				ErrorCode    int    `json:"errorCode"`
				Message      string `json:"message"`
				TrackingID   string `json:"trackingId"`
				TimestampUTC string `json:"timestampUtc"`
			}
			if err := json.Unmarshal(body, &e); err != nil || e.ErrorCode != iothub.CodeArgumentInvalid || e.Message == "" || e.TimestampUTC == "" {
				t.Fatalf("error body %s", body)
			}
		})
	}
	// The device is still served and nothing was applied.
	rt, _ := d.twinRequest(iothub.TwinReportedTopic("good"), []byte(`{"ok":true}`))
	if rt.Status != 204 || rt.Version != 2 {
		t.Fatalf("valid patch after rejects: %d v%d", rt.Status, rt.Version)
	}
	// A document that grows over 32 KB across patches is refused too.
	for i := range 8 {
		rt, _ := d.twinRequest(iothub.TwinReportedTopic(fmt.Sprint("grow", i)),
			[]byte(fmt.Sprintf(`{"p%d":{%s}}`, i, manyStrings(1, 3900))))
		if i < 8 && rt.Status != 204 {
			t.Fatalf("patch %d: %d", i, rt.Status)
		}
	}
	rt, _ = d.twinRequest(iothub.TwinReportedTopic("over"), []byte(`{"last":{`+manyStrings(2, 3900)+`}}`))
	if rt.Status != 400 {
		t.Fatalf("patch pushing reported over 32 KB: %d, want 400", rt.Status)
	}
}

// manyStrings makes n members of about size bytes each.
func manyStrings(n, size int) string {
	parts := make([]string, n)
	for i := range parts {
		parts[i] = fmt.Sprintf(`"s%d":"%s"`, i, strings.Repeat("y", size))
	}
	return strings.Join(parts, ",")
}

func TestDesiredNotifications(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	key2 := addDevice(t, h, "dev2")
	svc := newService(t, h)
	d := connect(t, h, "dev1", key)
	d.sub(iothub.DesiredFilter, iothub.TwinResponseFilter)
	quiet := connect(t, h, "dev2", key2) // not subscribed to desired
	quiet.sub(iothub.TwinResponseFilter)

	st, b, _ := svc.do("PATCH", "/twins/dev1", `{"tags":{"site":"lab"},"properties":{"desired":{"interval":5,"mode":"fast","nested":{"a":1}}}}`)
	if st != 200 {
		t.Fatalf("PATCH twin: %d %s", st, b)
	}
	m := d.next("$iothub/twin/PATCH/properties/desired/")
	pt, err := iothub.ParseTopic(m.Topic())
	if err != nil || pt.Version != 2 {
		t.Fatalf("notification topic %q (%v), want $version=2", m.Topic(), err)
	}
	body := decodeJSON(t, m.Payload())
	if num(t, body["$version"]) != 2 || num(t, body["interval"]) != 5 {
		t.Fatalf("notification body %s", m.Payload())
	}
	if _, ok := body["$metadata"]; ok {
		t.Fatalf("notification carries $metadata: %s", m.Payload())
	}
	// A tags-only change does not notify; null deletes.
	svc.do("PATCH", "/twins/dev1", `{"tags":{"rack":"3"}}`)
	v, err := h.UpdateDesired("dev1", map[string]any{"mode": nil})
	if err != nil || v != 3 {
		t.Fatalf("UpdateDesired: v%d %v", v, err)
	}
	m = d.next("$iothub/twin/PATCH/properties/desired/")
	if !strings.HasSuffix(m.Topic(), "$version=3") || string(m.Payload()) != `{"$version":3,"mode":null}` {
		t.Fatalf("delete notification %s %s", m.Topic(), m.Payload())
	}
	// PUT replaces: removed members are sent as null.
	st, b, _ = svc.do("PUT", "/twins/dev1", `{"properties":{"desired":{"interval":9}}}`)
	if st != 200 {
		t.Fatalf("PUT twin: %d %s", st, b)
	}
	m = d.next("$iothub/twin/PATCH/properties/desired/")
	body = decodeJSON(t, m.Payload())
	if num(t, body["$version"]) != 4 || num(t, body["interval"]) != 9 || body["nested"] != nil {
		t.Fatalf("replace notification %s", m.Payload())
	}
	if _, ok := body["nested"]; !ok {
		t.Fatalf("replace notification lacks nested:null: %s", m.Payload())
	}
	var tw iothub.Twin
	if err := json.Unmarshal(b, &tw); err != nil {
		t.Fatal(err)
	}
	if len(tw.Tags) != 0 || tw.Properties.Desired["interval"] != float64(9) {
		t.Fatalf("twin after PUT: tags %v desired %v", tw.Tags, tw.Properties.Desired)
	}
	// The device's GET agrees.
	_, gb := d.twinRequest(iothub.TwinGetTopic("g"), nil)
	des := decodeJSON(t, gb)["desired"].(map[string]any)
	if num(t, des["$version"]) != 4 || len(des) != 2 {
		t.Fatalf("device GET after PUT: %s", gb)
	}
	// The device that did not subscribe got nothing.
	select {
	case m := <-quiet.msgs:
		t.Fatalf("unsubscribed device got %s", m.Topic())
	default:
	}
}

func TestTwinServiceRules(t *testing.T) {
	h := startHub(t)
	addDevice(t, h, "dev1")
	svc := newService(t, h)
	st, b, resp := svc.do("GET", "/twins/dev1", nil)
	if st != 200 {
		t.Fatalf("GET twin: %d %s", st, b)
	}
	var tw iothub.Twin
	if err := json.Unmarshal(b, &tw); err != nil {
		t.Fatal(err)
	}
	if tw.ConnectionState != "Disconnected" || tw.AuthenticationType != "sas" || tw.Status != "enabled" {
		t.Fatalf("twin %s", b)
	}
	if resp.Header.Get("ETag") != `"`+tw.ETag+`"` {
		t.Fatalf("ETag header %q, body etag %q", resp.Header.Get("ETag"), tw.ETag)
	}
	stale := tw.ETag
	if st, b, _ := svc.do("PATCH", "/twins/dev1", `{"tags":{"a":1}}`, "If-Match", `"`+stale+`"`); st != 200 {
		t.Fatalf("PATCH with current etag: %d %s", st, b)
	}
	st, b, _ = svc.do("PATCH", "/twins/dev1", `{"tags":{"a":2}}`, "If-Match", `"`+stale+`"`)
	wantError(t, st, b, 412, iothub.CodePreconditionFailed)
	if st, b, _ := svc.do("PATCH", "/twins/dev1", `{"tags":{"a":3}}`, "If-Match", "*"); st != 200 {
		t.Fatalf("PATCH If-Match *: %d %s", st, b)
	}

	for _, tc := range []struct {
		name string
		body string
		code int
	}{
		{"bad JSON", `{"tags":`, iothub.CodeIotHubFormatError},
		{"reported", `{"properties":{"reported":{"x":1}}}`, iothub.CodeArgumentInvalid},
		{"key with $", `{"properties":{"desired":{"$x":1}}}`, iothub.CodeArgumentInvalid},
		{"tags over 8 KB", `{"tags":{` + manyStrings(3, 3000) + `}}`, iothub.CodeArgumentInvalid},
		{"desired over 32 KB", `{"properties":{"desired":{"a":{` + manyStrings(9, 3800) + `}}}}`, iothub.CodeArgumentInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, b, _ := svc.do("PATCH", "/twins/dev1", tc.body)
			wantError(t, st, b, 400, tc.code)
		})
	}
	st, b, _ = svc.do("GET", "/twins/nobody", nil)
	wantError(t, st, b, 404, iothub.CodeDeviceNotFound)
}

// TestFaultsAndObserver drives the fault-injection API and checks that the
// observer sees every accepted patch once, in version order.
func TestFaultsAndObserver(t *testing.T) {
	var mu sync.Mutex
	var seen []ReportedPatch
	h := startHub(t, func(c *Config) {
		c.OnReported = func(p ReportedPatch) {
			mu.Lock()
			seen = append(seen, p)
			mu.Unlock()
		}
	})
	key := addDevice(t, h, "dev1")
	d := connect(t, h, "dev1", key)
	d.sub(iothub.TwinResponseFilter)

	h.InjectTwinFault("dev1", TwinFault{Op: TwinReported, Count: 2, Status: 429})
	for i, want := range []int{429, 429, 204} {
		rt, body := d.twinRequest(iothub.TwinReportedTopic(fmt.Sprint("t", i)), []byte(fmt.Sprintf(`{"n":%d}`, i)))
		if rt.Status != want {
			t.Fatalf("request %d: %d %s, want %d", i, rt.Status, body, want)
		}
		if want == 429 && !strings.Contains(string(body), "429001") {
			t.Fatalf("429 body %s", body)
		}
	}
	// GET is not affected by a reported fault; a 500 fault on GET is.
	h.InjectTwinFault("dev1", TwinFault{Op: TwinGet, Count: 1, Status: 500})
	if rt, _ := d.twinRequest(iothub.TwinGetTopic("g1"), nil); rt.Status != 500 {
		t.Fatalf("GET with fault: %d", rt.Status)
	}
	if rt, _ := d.twinRequest(iothub.TwinGetTopic("g2"), nil); rt.Status != 200 {
		t.Fatalf("GET after fault: %d", rt.Status)
	}
	// Delay holds the answer.
	h.InjectTwinFault("dev1", TwinFault{Op: TwinReported, Count: 1, Delay: 300 * time.Millisecond})
	start := time.Now()
	if rt, _ := d.twinRequest(iothub.TwinReportedTopic("slow"), []byte(`{"n":10}`)); rt.Status != 204 {
		t.Fatalf("delayed patch: %d", rt.Status)
	}
	if el := time.Since(start); el < 300*time.Millisecond {
		t.Fatalf("answer after %v, before the injected delay", el)
	}
	// Disconnect stores the patch but drops the connection instead of
	// answering.
	h.InjectTwinFault("dev1", TwinFault{Op: TwinReported, Count: 1, Disconnect: true})
	d.pub(iothub.TwinReportedTopic("lost"), 1, []byte(`{"n":11}`))
	d.waitLost()
	d2 := connect(t, h, "dev1", key)
	d2.sub(iothub.TwinResponseFilter)
	rt, _ := d2.twinRequest(iothub.TwinReportedTopic("after"), []byte(`{"n":12}`))
	if rt.Status != 204 || rt.Version != 5 {
		t.Fatalf("patch after reconnect: %d v%d, want 204 v5", rt.Status, rt.Version)
	}
	mu.Lock()
	defer mu.Unlock()
	var got []string
	for _, p := range seen {
		got = append(got, fmt.Sprintf("%s v%d n=%v", p.DeviceID, p.Version, p.Patch["n"]))
	}
	want := []string{"dev1 v2 n=2", "dev1 v3 n=10", "dev1 v4 n=11", "dev1 v5 n=12"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Fatalf("observer saw %q, want %q", got, want)
	}
	// Kick closes a live connection.
	if !h.Kick("dev1") {
		t.Fatal("Kick found no connection")
	}
	d2.waitLost()
	testutil.Eventually(t, waitLong, "dev1 to be disconnected", func() bool { return !h.Connected("dev1") })
	if h.Kick("dev1") {
		t.Fatal("Kick of an offline device reported a connection")
	}
}

// TestReportedOrderUnderLoad sends many patches back to back and checks
// that each is acknowledged with the next version.
func TestReportedOrderUnderLoad(t *testing.T) {
	h := startHub(t)
	key := addDevice(t, h, "dev1")
	d := connect(t, h, "dev1", key)
	d.sub(iothub.TwinResponseFilter)
	const n = 100
	for i := range n {
		d.c.Publish(iothub.TwinReportedTopic(fmt.Sprint(i)), 1, false, []byte(fmt.Sprintf(`{"i":%d}`, i)))
	}
	// paho may reorder publishes that were not awaited, so the check is
	// that every patch got its own version, the versions are consecutive,
	// and the stored document is the one with the last version.
	byVersion := map[int64]string{}
	for range n {
		m := d.next("$iothub/twin/res/")
		rt, err := iothub.ParseTopic(m.Topic())
		if err != nil || rt.Status != 204 {
			t.Fatalf("answer %s (%v)", m.Topic(), err)
		}
		if prev, dup := byVersion[rt.Version]; dup {
			t.Fatalf("version %d given to rid %s and %s", rt.Version, prev, rt.RID)
		}
		byVersion[rt.Version] = rt.RID
	}
	for v := int64(2); v <= n+1; v++ {
		if _, ok := byVersion[v]; !ok {
			t.Fatalf("no patch got version %d", v)
		}
	}
	tw, _ := h.Twin("dev1")
	if got := fmt.Sprint(tw.Properties.Reported["i"]); got != byVersion[n+1] {
		t.Fatalf("final i = %v, want %s (the patch with the last version)", got, byVersion[n+1])
	}
}

// FuzzServiceTwinUpdate feeds PATCH/PUT /twins bodies through decoding and
// application: nothing panics, and an accepted change keeps the section
// limits.
func FuzzServiceTwinUpdate(f *testing.F) {
	for _, s := range []string{
		`{"tags":{"a":1},"properties":{"desired":{"x":{"y":null,"z":[1,"2"]}}}}`,
		`{"properties":{"desired":{"$version":3,"$metadata":{},"k":true}}}`,
		`{"properties":{"reported":{"a":1}}}`,
		`{"tags":null,"properties":null}`,
		`[]`,
	} {
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, body []byte, replace bool) {
		u, err := decodeTwinUpdate(body)
		if err != nil {
			return
		}
		dir := t.TempDir()
		s, err := openStore(dir)
		if err != nil {
			t.Fatal(err)
		}
		d, err := s.add(record{DeviceID: "d", Status: "enabled", Auth: authData{Type: "sas"}, Version: 1, DesiredVersion: 1, ReportedVersion: 1})
		if err != nil {
			t.Fatal(err)
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if _, err := d.applyServiceUpdate(u, replace, time.Now()); err != nil {
			return
		}
		if n := twinSize(d.rec.Desired); n > 32*1024 {
			t.Fatalf("desired grew to %d bytes", n)
		}
	})
}
