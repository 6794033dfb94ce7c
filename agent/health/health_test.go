package health

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeSystemd plays systemd: the system state and unit states change at
// given (fake) times after the check starts.
type fakeSystemd struct {
	start  time.Time
	system []step
	units  map[string][]step

	mu    sync.Mutex
	calls int
}

type step struct {
	after time.Duration
	state string
}

func at(steps []step, d time.Duration) string {
	s := ""
	for _, st := range steps {
		if d >= st.after {
			s = st.state
		}
	}
	return s
}

func (f *fakeSystemd) SystemState(context.Context) (string, error) {
	f.mu.Lock()
	f.calls++
	f.mu.Unlock()
	if s := at(f.system, time.Since(f.start)); s != "" {
		return s, nil
	}
	return "", errors.New("no answer")
}

func (f *fakeSystemd) UnitState(_ context.Context, u string) (string, error) {
	if s := at(f.units[u], time.Since(f.start)); s != "" {
		return s, nil
	}
	return "inactive", nil
}

func closed() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

func TestCheck(t *testing.T) {
	const timeout = 5 * time.Minute
	running := []step{{0, "running"}}
	for _, tc := range []struct {
		name    string
		offline bool // the hub session never comes back
		acked   func(ctx context.Context) error
		system  []step
		units   map[string][]step
		want    []string // units
		policy  string
		noSD    bool
		wantErr string // "" means healthy
		minTime time.Duration
	}{
		{name: "healthy at once", system: running},
		{name: "hub never back", offline: true, system: running, wantErr: "the hub session did not come back"},
		{name: "reports never acknowledged", system: running,
			acked:   func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() },
			wantErr: "the hub did not acknowledge the reported properties"},
		{name: "boot still starting, then running",
			system: []step{{0, "starting"}, {90 * time.Second, "running"}}, minTime: 90 * time.Second},
		{name: "degraded refused by default", system: []step{{0, "degraded"}},
			wantErr: `systemd reports the system "degraded" (update.healthSystemState: running)`},
		{name: "degraded accepted by policy", system: []step{{0, "degraded"}}, policy: PolicyDegraded},
		{name: "maintenance never accepted", system: []step{{0, "maintenance"}}, policy: PolicyDegraded,
			wantErr: `"maintenance"`},
		{name: "system state ignored", policy: PolicyIgnore},
		{name: "unit failed", system: running, want: []string{"app.service", "db.service"},
			units:   map[string][]step{"app.service": {{0, "active"}}, "db.service": {{0, "failed"}}},
			wantErr: "configured units not active: db.service is failed"},
		{name: "unit comes up", system: running, want: []string{"app.service"},
			units: map[string][]step{"app.service": {{0, "activating"}, {2 * time.Minute, "active"}}}, minTime: 2 * time.Minute},
		{name: "systemd silent", wantErr: "systemd did not answer"},
		{name: "not under systemd", noSD: true, want: []string{"app.service"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				sd := &fakeSystemd{start: time.Now(), system: tc.system, units: tc.units}
				// Channels are made inside the bubble so fake time knows
				// what blocks on them.
				online := closed()
				if tc.offline {
					online = make(chan struct{})
				}
				cfg := Config{Timeout: timeout, Online: online, Acked: tc.acked, Systemd: sd, SystemState: tc.policy, Units: tc.want}
				if tc.noSD {
					cfg.Systemd = nil
				}
				c := New(cfg)
				start := time.Now()
				err := c.Check(t.Context(), "u1")
				took := time.Since(start)
				if tc.wantErr == "" {
					if err != nil {
						t.Fatalf("Check = %v, want healthy", err)
					}
					if took < tc.minTime || took > timeout {
						t.Fatalf("healthy after %s, want between %s and %s", took, tc.minTime, timeout)
					}
					return
				}
				if !errors.Is(err, ErrUnhealthy) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Check = %v, want ErrUnhealthy saying %q", err, tc.wantErr)
				}
				if took != timeout {
					t.Fatalf("failed after %s, want the whole timeout %s", took, timeout)
				}
				if c.Waiting() != "" {
					t.Fatalf("Waiting = %q after the check", c.Waiting())
				}
			})
		})
	}
}

// Backoff between probes: a system that stays "starting" is asked a few
// dozen times in five minutes, not thousands.
func TestCheckBacksOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sd := &fakeSystemd{start: time.Now(), system: []step{{0, "starting"}}}
		c := New(Config{Timeout: 5 * time.Minute, Online: closed(), Systemd: sd})
		if err := c.Check(t.Context(), "u1"); err == nil {
			t.Fatal("healthy while starting")
		}
		if sd.calls < 5 || sd.calls > 60 {
			t.Fatalf("%d probes in 5 minutes", sd.calls)
		}
	})
}

func TestOperatorVerdict(t *testing.T) {
	for _, tc := range []struct {
		name    string
		verdict []Verdict
		want    error
		took    time.Duration
	}{
		{"commit", []Verdict{{UpdateID: "u1", Commit: true}}, nil, time.Second},
		{"rollback", []Verdict{{UpdateID: "u1"}}, ErrOperatorRollback, time.Second},
		{"other update ignored, then commit", []Verdict{{UpdateID: "u0", Commit: true}, {UpdateID: "u1", Commit: true}}, nil, 2 * time.Second},
		{"other update ignored", []Verdict{{UpdateID: "u0", Commit: true}}, ErrUnhealthy, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := New(Config{Timeout: time.Minute, Online: make(chan struct{})})
				go func() {
					for _, v := range tc.verdict {
						time.Sleep(time.Second)
						if err := c.Decide(v); err != nil {
							t.Error(err)
						}
					}
				}()
				start := time.Now()
				err := c.Check(t.Context(), "u1")
				if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
					t.Fatalf("Check = %v, want %v", err, tc.want)
				}
				if d := time.Since(start); d != tc.took {
					t.Fatalf("decided after %s, want %s", d, tc.took)
				}
			})
		})
	}
}

func TestDecidePending(t *testing.T) {
	c := New(Config{Timeout: time.Minute})
	if err := c.Decide(Verdict{UpdateID: "u1", Commit: true}); err != nil {
		t.Fatal(err)
	}
	if err := c.Decide(Verdict{UpdateID: "u1"}); !errors.Is(err, ErrPending) {
		t.Fatalf("second Decide = %v, want ErrPending", err)
	}
}

func TestCheckCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c := New(Config{Timeout: time.Minute, Online: make(chan struct{})})
	if err := c.Check(ctx, "u1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Check = %v, want context.Canceled", err)
	}
}

// Systemctl runs the real command line: a stand-in systemctl script prints
// states and exits non-zero as systemctl does for every state but the good
// one.
func TestSystemctl(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "systemctl")
	body := `#!/bin/sh
case "$1" in
is-system-running) echo degraded; exit 1 ;;
is-active)
  [ "$2" = "--" ] || { echo "no --" >&2; exit 2; }
  case "$3" in app.service) echo active ;; silent.service) echo "unit lookup failed" >&2; exit 4 ;; *) echo inactive; exit 3 ;; esac ;;
esac
`
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	s := Systemctl{Path: script}
	ctx := t.Context()
	for _, tc := range []struct {
		unit, want, wantErr string
	}{
		{"", "degraded", ""},
		{"app.service", "active", ""},
		{"db.service", "inactive", ""},
		{"silent.service", "", "unit lookup failed"},
		{"-H", "", "unit name"},
	} {
		var got string
		var err error
		if tc.unit == "" {
			got, err = s.SystemState(ctx)
		} else {
			got, err = s.UnitState(ctx, tc.unit)
		}
		if got != tc.want || (tc.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%q: %q, %v; want %q, error %q", tc.unit, got, err, tc.want, tc.wantErr)
		}
	}
	if _, err := (Systemctl{Path: filepath.Join(dir, "missing")}).SystemState(ctx); err == nil {
		t.Error("a missing systemctl gave no error")
	}
}
