package firmware_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

// ReadStatus sees what the Manager sees, from the files alone.
func TestReadStatusMatchesManager(t *testing.T) {
	dir := t.TempDir()
	srv := newImageServer(t)
	rec := newRecorder()
	cfg := testConfig(t, dir, abInstaller{&fileAB{dir: t.TempDir()}}, rec)

	same := func(what string, want firmware.Status) {
		t.Helper()
		got, err := firmware.ReadStatus(dir, cfg.CurrentVersion)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		got.Time, want.Time = time.Time{}, time.Time{}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: ReadStatus %+v (error %+v)\nManager    %+v (error %+v)", what, got, got.Err, want, want.Err)
		}
	}
	m, err := firmware.NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	same("no update", m.Status())
	// Accepted, not run: busy.
	if _, err := m.Start(firmware.Request{URI: srv.URL + "/missing.img", Version: "2.0.0"}); err != nil {
		t.Fatal(err)
	}
	if st := m.Status(); !st.Busy {
		t.Fatalf("after Start: %+v", st)
	}
	same("accepted", m.Status())
	// Run it to its end: the image is not there, so it fails with an error.
	r := startManager(t, cfg)
	rec.waitTerminal(t, 30*time.Second)
	if st := r.Status(); st.Phase != firmware.PhaseFailed || st.Err == nil {
		t.Fatalf("after the run: %+v", st)
	}
	same("failed", r.Status())
}

// Reading never creates the folder, and a record of an unknown format is
// reported and left where it is.
func TestReadStatusWritesNothing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "firmware")
	st, err := firmware.ReadStatus(missing, "1.0.0")
	if err != nil || st.Busy || st.Phase != firmware.PhaseIdle || st.CurrentVersion != "1.0.0" {
		t.Fatalf("no folder: %+v, %v", st, err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the folder was created: %v", err)
	}

	dir := t.TempDir()
	rec := filepath.Join(dir, "update.json")
	body := []byte(`{"format":99,"updateId":"u-next","phase":"downloading"}`)
	if err := os.WriteFile(rec, body, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err = firmware.ReadStatus(dir, "1.0.0")
	if !errors.Is(err, firmware.ErrUnknownFormat) || st.Busy || st.Phase != firmware.PhaseIdle {
		t.Fatalf("unknown format: %+v, %v", st, err)
	}
	if b, err := os.ReadFile(rec); err != nil || string(b) != string(body) {
		t.Fatalf("the record was moved or changed: %q, %v", b, err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("files in the state folder: %v", entries)
	}
}
