package firmware_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gwagent/gwagent/firmware"
)

// TestHistoryOutcomesOrderAndRestart: a completed and a failed update are
// both in the history, in order, with their result, error code and phase
// times, and a new Manager on the same state dir reads the same history.
func TestHistoryOutcomesOrderAndRestart(t *testing.T) {
	srv := newImageServer(t)
	img := randomImage(t, 64<<10)
	url := srv.add("/fw.img", img)
	dir := t.TempDir()
	rec := newRecorder()
	m := startManager(t, testConfig(t, dir, plainFile{&fileAB{dir: t.TempDir()}}, rec))

	ok, err := m.Start(firmware.Request{URI: url, Version: "2.0.0", SHA256: sha(img), DesiredID: "d-7"})
	if err != nil {
		t.Fatal(err)
	}
	if p := rec.waitTerminal(t, 30*time.Second); p.Phase != firmware.PhaseCompleted {
		t.Fatalf("first update ended %s (%+v)", p.Phase, p.Err)
	}
	rec2 := newRecorder()
	m.stop(t)
	m = startManager(t, testConfig(t, dir, plainFile{&fileAB{dir: t.TempDir()}}, rec2))
	bad, err := m.Start(firmware.Request{URI: url, Version: "3.0.0", SHA256: strings.Repeat("0", 64)})
	if err != nil {
		t.Fatal(err)
	}
	failed := rec2.waitTerminal(t, 30*time.Second)
	if failed.Phase != firmware.PhaseFailed || failed.Err == nil {
		t.Fatalf("second update ended %s (%+v), want failed", failed.Phase, failed.Err)
	}

	check := func(what string, h []firmware.HistoryEntry) {
		t.Helper()
		if len(h) != 2 {
			t.Fatalf("%s: %d entries, want 2: %+v", what, len(h), h)
		}
		c, f := h[0], h[1]
		if c.Seq != 1 || c.UpdateID != ok || c.DesiredID != "d-7" || c.Version != "2.0.0" || c.Result != firmware.PhaseCompleted || c.Err != nil {
			t.Errorf("%s: first entry %+v", what, c)
		}
		if f.Seq != 2 || f.UpdateID != bad || f.DesiredID != "" || f.Version != "3.0.0" || f.Result != firmware.PhaseFailed ||
			f.Err == nil || f.Err.Code != failed.Err.Code {
			t.Errorf("%s: second entry %+v, want failed with code %s", what, f, failed.Err.Code)
		}
		wantC := []firmware.Phase{"accepted", "downloading", "verifying", "applying", "completed"}
		if got := phasesOf(c); !slices.Equal(got, wantC) {
			t.Errorf("%s: first update's phases %v, want %v", what, got, wantC)
		}
		if got := phasesOf(f); len(got) < 3 || got[0] != "accepted" || got[len(got)-1] != "failed" {
			t.Errorf("%s: second update's phases %v", what, got)
		}
		for _, e := range h {
			if e.StartedAt.IsZero() || e.EndedAt.Before(e.StartedAt) || !slices.IsSortedFunc(e.Phases, func(a, b firmware.PhaseTime) int { return a.At.Compare(b.At) }) ||
				!e.Phases[len(e.Phases)-1].At.Equal(e.EndedAt) {
				t.Errorf("%s: times of %s out of order: %+v", what, e.UpdateID, e)
			}
		}
	}
	check("progress", failed.History)
	m.stop(t)
	m2, err := firmware.NewManager(testConfig(t, dir, plainFile{&fileAB{dir: t.TempDir()}}, newRecorder()))
	if err != nil {
		t.Fatal(err)
	}
	check("after restart", m2.Status().History)
}

// TestHistoryRunningUpdateHasPhaseTimes: the update that runs is in the
// history with the phases entered so far and no result.
func TestHistoryRunningUpdateHasPhaseTimes(t *testing.T) {
	rec := newRecorder()
	m := startManager(t, testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec))
	// Nothing listens: the download retries until the test ends.
	id, err := m.Start(firmware.Request{URI: freePortURL(t), Version: "2.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for m.Status().Phase != firmware.PhaseDownloading && time.Now().Before(deadline) {
		<-rec.wake
	}
	h := m.Status().History
	if len(h) != 1 || h[0].UpdateID != id || h[0].Result != "" || !h[0].EndedAt.IsZero() ||
		!slices.Equal(phasesOf(h[0]), []firmware.Phase{"accepted", "downloading"}) {
		t.Fatalf("running update's history %+v", h)
	}
}

// TestHistoryBounds: however many updates and however long their errors,
// the history keeps the last HistoryLen, newest last, with messages cut to
// HistoryMaxMessage characters and at most HistoryMaxPhases phase times.
func TestHistoryBounds(t *testing.T) {
	var h []firmware.HistoryEntry
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	long := strings.Repeat("é", 5000)
	for i := range 2*firmware.HistoryLen + 1 {
		id := fmt.Sprintf("u%d", i)
		for j := range 3 * firmware.HistoryMaxPhases {
			at = at.Add(time.Second)
			h = firmware.NoteHistory(h, id, firmware.Phase(fmt.Sprintf("phase%d", j)), nil, at)
		}
		at = at.Add(time.Second)
		h = firmware.NoteHistory(h, id, firmware.PhaseFailed, &firmware.UpdateError{Code: "verifyFailed", Message: long}, at)
	}
	if len(h) != firmware.HistoryLen {
		t.Fatalf("%d entries, want %d", len(h), firmware.HistoryLen)
	}
	for k, e := range h {
		i := firmware.HistoryLen + 1 + k
		if e.UpdateID != fmt.Sprintf("u%d", i) || e.Seq != i+1 {
			t.Errorf("entry %d is %s seq %d, want u%d seq %d", k, e.UpdateID, e.Seq, i, i+1)
		}
		if n := utf8.RuneCountInString(e.Err.Message); n > firmware.HistoryMaxMessage || n < firmware.HistoryMaxMessage/2 {
			t.Errorf("entry %d: message of %d characters, want at most %d", k, n, firmware.HistoryMaxMessage)
		}
		if len(e.Phases) != firmware.HistoryMaxPhases || e.Phases[len(e.Phases)-1].Phase != firmware.PhaseFailed || e.Result != firmware.PhaseFailed {
			t.Errorf("entry %d: %d phases ending %v, result %s", k, len(e.Phases), e.Phases[len(e.Phases)-1], e.Result)
		}
	}
}

func phasesOf(e firmware.HistoryEntry) []firmware.Phase {
	var out []firmware.Phase
	for _, p := range e.Phases {
		out = append(out, p.Phase)
	}
	return out
}
