package firmware_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

// pieceFetcher "fetches" size zero bytes in pieces of piece bytes (a
// Fetcher), declaring the size first unless hideTotal is set, and discards
// them. Small pieces stand for a network that delivers little at a time.
type pieceFetcher struct {
	size, piece int
	hideTotal   bool
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
func (discard) Sync() error                 { return nil }
func (discard) Close() error                { return nil }

func (f pieceFetcher) Open(ctx context.Context, u firmware.Update, off int64) (firmware.Sink, error) {
	return discard{}, nil
}
func (f pieceFetcher) Apply(ctx context.Context, u firmware.Update) error { return nil }
func (f pieceFetcher) Fetches(uri string) bool                            { return strings.HasPrefix(uri, "mem:") }
func (f pieceFetcher) Fetch(ctx context.Context, u firmware.Update, dst firmware.FetchWriter) error {
	if !f.hideTotal {
		dst.SetTotal(int64(f.size))
	}
	buf := make([]byte, f.piece)
	for off := 0; off < f.size; off += f.piece {
		if _, err := dst.Write(buf[:min(f.piece, f.size-off)]); err != nil {
			return err
		}
	}
	return nil
}

// TestProgressGranularity: download progress is reported per whole percent
// of a known size and per MiB of an unknown one, never per write, whatever
// the time between writes (there is no clock in it: the Observer decides
// how often progress goes on to the twin).
func TestProgressGranularity(t *testing.T) {
	cases := []struct {
		name        string
		f           pieceFetcher
		min, max    int // downloading reports with bytes
		perPercent  bool
		wantNoTotal bool
	}{
		// 2 MiB in 4 KiB pieces: 512 writes, one report per percent
		// (0 %, at the first write, to 100 %) and the one at the end.
		{"known size", pieceFetcher{size: 2 << 20, piece: 4 << 10}, 100, 102, true, false},
		// 3.5 MiB without a size: one at the first write, at 1, 2 and 3
		// MiB, and the one at the end.
		{"unknown size", pieceFetcher{size: 7 << 19, piece: 4 << 10, hideTotal: true}, 5, 5, false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder()
			m := startManager(t, testConfig(t, t.TempDir(), tc.f, rec))
			if _, err := m.Start(firmware.Request{URI: "mem:fw.img"}); err != nil {
				t.Fatal(err)
			}
			if p := rec.waitTerminal(t, 30*time.Second); p.Phase != firmware.PhaseCompleted {
				t.Fatalf("update ended %s: %+v", p.Phase, p.Err)
			}
			var reports []firmware.Progress
			for _, p := range rec.list() {
				if p.Phase == firmware.PhaseDownloading && p.Bytes > 0 {
					reports = append(reports, p)
				}
			}
			if n := len(reports); n < tc.min || n > tc.max {
				t.Fatalf("%d byte-progress reports for %d writes, want %d to %d", n, tc.f.size/tc.f.piece, tc.min, tc.max)
			}
			for i, p := range reports {
				if tc.wantNoTotal != (p.Total == 0 && p.Percent == -1) {
					t.Fatalf("report %d: total %d, percent %d", i, p.Total, p.Percent)
				}
				if i == 0 || i == len(reports)-1 {
					continue
				}
				prev := reports[i-1]
				if tc.perPercent && p.Percent == prev.Percent {
					t.Errorf("reports %d and %d both at %d %% (%d and %d bytes)", i-1, i, p.Percent, prev.Bytes, p.Bytes)
				}
				if !tc.perPercent && p.Bytes>>20 == prev.Bytes>>20 {
					t.Errorf("reports %d and %d in the same MiB (%d and %d bytes)", i-1, i, prev.Bytes, p.Bytes)
				}
			}
			if last := reports[len(reports)-1]; last.Bytes != int64(tc.f.size) {
				t.Errorf("last report at %d bytes, want %d", last.Bytes, tc.f.size)
			}
		})
	}
}
