package service

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/iothub/service/servicetest"
)

// fw builds reported properties as gwagent writes them.
func fw(status, updateID string, bytes, total int64, at string) map[string]any {
	detail := map[string]any{"status": status, "updateId": updateID, "targetVersion": "1.3.0", "currentVersion": "1.2.0",
		"bytes": bytes, "totalBytes": total, "updatedAt": at, "error": nil}
	if total > 0 {
		detail["percent"] = bytes * 100 / total
	}
	r := map[string]any{"firmwareStatus": status, "firmware": detail}
	switch status {
	case StatusStandBy:
		r["logTime"] = at
	case StatusDownloading:
		r["downloadComplete"] = "2026-11-26T12:00:01Z"
	case StatusApplying:
		r["startedApplyingImage"] = at
	case StatusCompleted:
		r["lastFirmwareUpdate"] = at
		detail["currentVersion"] = "1.3.0"
	case StatusFailed, StatusRolledBack:
		detail["error"] = map[string]any{"code": "sha256Mismatch", "message": "image digest does not match"}
	}
	return r
}

func describe(evs []WatchEvent) string {
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "%s %s %s", e.Time.UTC().Format("15:04:05"), e.Kind, e.State.Status)
		if e.Kind == EventProgress {
			fmt.Fprintf(&b, " %d/%d %d%%", e.State.Bytes, e.State.TotalBytes, e.State.Percent)
		}
		b.WriteString("\n")
	}
	return b.String()
}

func TestWatchFirmware(t *testing.T) {
	const id = "u-2"
	cases := []struct {
		name       string
		opts       WatchOptions
		script     []map[string]any
		fault      *servicetest.Fault
		wantStatus string
		wantEvents string
		wantErr    error
	}{
		{
			name: "stale completed then a full run",
			opts: WatchOptions{UpdateID: id},
			script: []map[string]any{
				fw(StatusCompleted, "u-1", 0, 0, "2026-11-25T09:00:00Z"), // the previous update
				fw(StatusStandBy, id, 0, 0, "2026-11-26T12:00:00Z"),
				fw(StatusDownloading, id, 0, 10_000_000, "2026-11-26T12:00:01Z"),
				fw(StatusDownloading, id, 4_200_000, 10_000_000, "2026-11-26T12:00:02Z"),
				fw(StatusDownloading, id, 4_200_000, 10_000_000, "2026-11-26T12:00:02Z"), // no change: no event
				fw(StatusDownloading, id, 10_000_000, 10_000_000, "2026-11-26T12:00:03Z"),
				fw(StatusApplying, id, 10_000_000, 10_000_000, "2026-11-26T12:00:04Z"),
				fw(StatusCompleted, id, 10_000_000, 10_000_000, "2026-11-26T12:00:05Z"),
			},
			wantStatus: StatusCompleted,
			wantEvents: "12:00:00 transition standBy\n12:00:01 transition downloading\n12:00:01 progress downloading 0/10000000 0%\n" +
				"12:00:02 progress downloading 4200000/10000000 42%\n12:00:03 progress downloading 10000000/10000000 100%\n" +
				"12:00:04 transition applying\n12:00:05 transition completed\n",
		},
		{
			name: "failure",
			opts: WatchOptions{UpdateID: id},
			script: []map[string]any{
				fw(StatusDownloading, id, 0, 0, "2026-11-26T12:00:01Z"),
				fw(StatusFailed, id, 0, 0, "2026-11-26T12:00:02Z"),
			},
			wantStatus: StatusFailed,
			wantEvents: "12:00:01 transition downloading\n12:00:02 transition failed\n",
		},
		{
			name: "throttled",
			opts: WatchOptions{UpdateID: id},
			script: []map[string]any{
				fw(StatusApplying, id, 0, 0, "2026-11-26T12:00:04Z"),
				fw(StatusCompleted, id, 0, 0, "2026-11-26T12:00:05Z"),
			},
			fault:      &servicetest.Fault{Method: "GET", Path: "/twins/gw-01", Count: 2, Status: 429, Code: 429001},
			wantStatus: StatusCompleted,
			wantEvents: "12:00:04 transition applying\n12:00:05 transition completed\n",
		},
		{
			name: "throttled with Retry-After",
			opts: WatchOptions{UpdateID: id},
			script: []map[string]any{
				fw(StatusCompleted, id, 0, 0, "2026-11-26T12:00:05Z"),
			},
			fault:      &servicetest.Fault{Method: "GET", Path: "/twins/gw-01", Count: 1, Status: 429, Code: 429001, RetryAfter: 1},
			wantStatus: StatusCompleted,
			wantEvents: "12:00:05 transition completed\n",
		},
		{
			name: "tutorial device without update id",
			opts: WatchOptions{Since: time.Date(2026, 11, 26, 11, 0, 0, 0, time.UTC)},
			script: []map[string]any{
				{"firmwareStatus": "completed", "lastFirmwareUpdate": "2026-11-25 09:00:00.000000"},
				{"firmwareStatus": "standBy", "logTime": "2026-11-26 12:00:00.000000", "lastFirmwareUpdate": "2026-11-25 09:00:00.000000"},
				{"firmwareStatus": "downloading", "downloadComplete": "2026-11-26 12:00:15.000000"},
				{"firmwareStatus": "applying", "startedApplyingImage": "2026-11-26 12:00:30.000000"},
				{"firmwareStatus": "completed", "lastFirmwareUpdate": "2026-11-26 12:00:45.000000"},
			},
			wantStatus: StatusCompleted,
			wantEvents: "12:00:00 transition standBy\n12:00:15 transition downloading\n12:00:30 transition applying\n12:00:45 transition completed\n",
		},
		{
			name:       "never finishes",
			opts:       WatchOptions{UpdateID: id},
			script:     []map[string]any{fw(StatusApplying, id, 0, 0, "2026-11-26T12:00:04Z")},
			wantStatus: StatusApplying,
			wantEvents: "12:00:04 transition applying\n",
			wantErr:    ErrWatchTimeout,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, srv := newClient(t, nil)
			srv.AddDevice("gw-01")
			srv.ScriptReported("gw-01", tc.script...)
			if tc.fault != nil {
				srv.Fail(*tc.fault)
			}
			tc.opts.Interval = 20 * time.Millisecond
			ctx := t.Context()
			if tc.wantErr != nil {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, 500*time.Millisecond)
				defer cancel()
			}
			var evs []WatchEvent
			st, err := c.WatchFirmware(ctx, "gw-01", tc.opts, func(e WatchEvent) { evs = append(evs, e) })
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if st.Status != tc.wantStatus {
				t.Errorf("final status %q, want %q", st.Status, tc.wantStatus)
			}
			if got := describe(evs); got != tc.wantEvents {
				t.Errorf("events:\n%s\nwant:\n%s", got, tc.wantEvents)
			}
			if st.Failed() && (st.Error == nil || st.Error.Code != "sha256Mismatch") {
				t.Errorf("failed state without its error: %+v", st)
			}
			if tc.fault != nil {
				// After each 429 the next read must wait clearly longer than a
				// normal poll (at least two intervals), and at least as long as
				// the hub's Retry-After.
				minGap := max(2*tc.opts.Interval, time.Duration(tc.fault.RetryAfter)*time.Second)
				rs := srv.Requests()
				faulted := 0
				for i, r := range rs {
					if !r.Faulted {
						continue
					}
					faulted++
					if i+1 < len(rs) {
						if gap := rs[i+1].Time.Sub(r.Time); gap < minGap {
							t.Errorf("read %d came %s after a 429, want at least %s", i+1, gap, minGap)
						}
					}
				}
				if faulted != tc.fault.Count {
					t.Errorf("%d throttled reads, want %d", faulted, tc.fault.Count)
				}
			}
		})
	}
}

func TestWatchStopsOnPermanentError(t *testing.T) {
	c, _ := newClient(t, nil)
	_, err := c.WatchFirmware(t.Context(), "nobody", WatchOptions{UpdateID: "x", Interval: 10 * time.Millisecond}, nil)
	if Code(err) != 404001 {
		t.Fatalf("err %v, want 404001", err)
	}
}

// TestWatchRetryAndOutage: a retry on the twin is one event per attempt
// (not per poll); a hub that answers 503 is reported once as unreachable,
// then as reachable again, and the watch goes on to the end.
func TestWatchRetryAndOutage(t *testing.T) {
	const id = "u-3"
	retrying := func(attempt int) map[string]any {
		r := fw(StatusDownloading, id, 100, 1000, "2026-11-26T12:00:02Z")
		r["firmware"].(map[string]any)["retry"] = map[string]any{"attempt": attempt,
			"lastError": "download from https://fw.example.com/a.img: HTTP 503 Service Unavailable", "nextAttemptAt": "2026-11-26T12:00:09Z"}
		return r
	}
	c, srv := newClient(t, nil)
	srv.AddDevice("gw-01")
	srv.ScriptReported("gw-01",
		fw(StatusDownloading, id, 100, 1000, "2026-11-26T12:00:01Z"),
		retrying(1), retrying(1), retrying(2),
		fw(StatusDownloading, id, 200, 1000, "2026-11-26T12:00:10Z"),
		fw(StatusCompleted, id, 1000, 1000, "2026-11-26T12:00:20Z"))
	srv.Fail(servicetest.Fault{Method: "GET", Path: "/twins/gw-01", Count: 2, Status: 503, Code: 503001})
	var kinds []string
	var attempts []int
	st, err := c.WatchFirmware(t.Context(), "gw-01", WatchOptions{UpdateID: id, Interval: 20 * time.Millisecond}, func(e WatchEvent) {
		kinds = append(kinds, string(e.Kind))
		if e.Kind == EventRetry {
			attempts = append(attempts, e.State.Retry.Attempt)
			if e.State.Retry.LastError == "" || e.State.Retry.NextAttemptAt.IsZero() {
				t.Errorf("retry event without its detail: %+v", e.State.Retry)
			}
		}
		if e.Kind == EventHubUnreachable && !strings.Contains(e.Error, "503") {
			t.Errorf("unreachable event says %q", e.Error)
		}
	})
	if err != nil || st.Status != StatusCompleted {
		t.Fatalf("watch ended %q, %v", st.Status, err)
	}
	want := "hubUnreachable hubReachable transition progress retry retry progress transition"
	if got := strings.Join(kinds, " "); got != want {
		t.Errorf("events %s\nwant   %s", got, want)
	}
	if fmt.Sprint(attempts) != "[1 2]" {
		t.Errorf("retry attempts %v, want [1 2]", attempts)
	}
}
