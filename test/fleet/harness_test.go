package fleet

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// bin is the folder of the programs under test, built once by TestMain.
var bin string

func TestMain(m *testing.M) {
	tmp, err := os.MkdirTemp("", "gwagent-fleet-bin.")
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	bin, err = Binaries(ctx, "../..", tmp)
	cancel()
	if err != nil {
		_ = os.RemoveAll(tmp)
		panic(err)
	}
	code := m.Run()
	_ = os.RemoveAll(tmp)
	os.Exit(code)
}

// startFleet starts a fleet for t in a temporary folder; its logs stay
// there while the test runs and are listed when it fails.
func startFleet(t *testing.T, ctx context.Context, devs []Device) *Fleet {
	t.Helper()
	dir := t.TempDir()
	f, err := Start(ctx, Options{Bin: bin, Dir: dir, Devices: devs, Logf: t.Logf})
	if err != nil {
		t.Fatalf("start fleet: %v", err)
	}
	t.Cleanup(func() {
		_ = f.Close()
		if t.Failed() {
			for id, p := range f.Agents() {
				t.Logf("--- %s (%s)\n%s", id, filepath.Base(p.Log()), p.LogTail())
			}
			t.Logf("--- gwhub\n%s", f.Hub.LogTail())
		}
	})
	return f
}

// TestDesiredFleet drives the fleet with desired `firmware` written
// straight to the twins (what a rollout's wave writes): the online good
// gateways complete, the bad ones fail verification (ac 500,
// verifyFailed) and the offline ones wait, disconnected, until started,
// then converge.
func TestDesiredFleet(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	devs := Plan(12, []int{2, 7}, []int{4, 9, 11})
	f := startFleet(t, ctx, devs)

	const id = "fleet-desired-1"
	for _, d := range devs {
		if err := f.SetDesired(ctx, d.ID, id); err != nil {
			t.Fatal(err)
		}
	}
	online := func(s map[string]State) bool {
		for _, d := range devs {
			if !d.Offline && !s[d.ID].Ended(id) {
				return false
			}
		}
		return true
	}
	states, err := f.WaitStates(ctx, "the online gateways to end the update", online)
	if err != nil {
		t.Fatalf("%v; states: %+v", err, states)
	}
	for _, d := range devs {
		s := states[d.ID]
		switch {
		case d.Offline:
			if s.Connected || s.AckID != "" || s.DesiredID != id {
				t.Errorf("%s (offline): %+v, want disconnected, desired %s, no acknowledgement", d.ID, s, id)
			}
		case d.Bad:
			if s.AC != 500 || s.Status != "failed" || s.ErrorCode != "verifyFailed" || s.Version != "1.0.0" {
				t.Errorf("%s (bad): %+v, want ac 500, failed, verifyFailed, still 1.0.0", d.ID, s)
			}
		default:
			if s.AC != 200 || s.Status != "completed" || s.Version != f.Image.Version {
				t.Errorf("%s: %+v, want ac 200, completed, version %s", d.ID, s, f.Image.Version)
			}
		}
	}

	var offline []string
	for _, d := range devs {
		if d.Offline {
			offline = append(offline, d.ID)
		}
	}
	if err := f.StartAgents(ctx, offline...); err != nil {
		t.Fatal(err)
	}
	states, err = f.WaitStates(ctx, "the offline gateways to converge", func(s map[string]State) bool {
		for _, id2 := range offline {
			if !s[id2].Ended(id) {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatalf("%v; states: %+v", err, states)
	}
	for _, id2 := range offline {
		if s := states[id2]; !s.Connected || s.AC != 200 || s.Status != "completed" || s.Version != f.Image.Version {
			t.Errorf("%s (was offline): %+v, want connected, ac 200, completed, version %s", id2, s, f.Image.Version)
		}
	}
}
