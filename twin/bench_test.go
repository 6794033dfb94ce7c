package twin

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/renameio/v2"
)

// benchPatch is a typical firmware progress report.
func benchPatch(i int) map[string]any {
	return map[string]any{
		"firmwareStatus": "downloading",
		"logTime":        "2026-11-26T01:02:03Z",
		"firmware": map[string]any{
			"status": "downloading", "updateId": "0b5f7c1e-8d1a-4c1e-9a55-3f1f2b6f9a10",
			"targetVersion": "2.4.1", "currentVersion": "2.3.0",
			"bytes": i * 4096, "totalBytes": 67108864, "percent": i % 100,
			"slot": "B", "error": nil, "updatedAt": "2026-11-26T01:02:03Z",
		},
	}
}

// BenchmarkReport measures Report: validation, coalescing and, for a
// milestone, a durable write (renameio + directory fsync). "progress"
// patches merge into one entry in memory; "milestone" patches each add an
// entry on disk. "interleaved" gives the milestone's cost as a ratio to
// the bare durable write of the same bytes (BenchmarkReportBaseline),
// measured in the same run.
func BenchmarkReport(b *testing.B) {
	for _, tc := range []struct {
		name      string
		milestone bool
	}{{"progress", false}, {"milestone", true}} {
		b.Run(tc.name, func(b *testing.B) {
			q, err := OpenQueue(QueueOptions{Dir: b.TempDir()}, &hubSim{}, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			i := 0
			for b.Loop() {
				i++
				if err := q.Report(benchPatch(i), tc.milestone); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "patches/s")
		})
	}
	// The machine's disk is shared and its fsync latency drifts by 5x
	// between runs; interleaving Report with the baseline write gives a
	// ratio that does not drift with it.
	b.Run("interleaved", func(b *testing.B) {
		q, err := OpenQueue(QueueOptions{Dir: b.TempDir()}, &hubSim{}, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer q.Close()
		base := newBaseline(b)
		defer base.close()
		var inReport, inBase time.Duration
		i := 0
		for b.Loop() {
			i++
			t0 := time.Now()
			if err := q.Report(benchPatch(i), true); err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			base.write(b)
			inReport += t1.Sub(t0)
			inBase += time.Since(t1)
		}
		b.ReportMetric(float64(inReport)/float64(inBase), "x-baseline")
		b.ReportMetric(float64(b.N)/inReport.Seconds(), "patches/s")
	})
}

// baseline is a bare durable write: renameio plus a directory fsync.
type baseline struct {
	dir, path string
	data      []byte
	dirf      *os.File
}

func newBaseline(b *testing.B) *baseline {
	dir := b.TempDir()
	patch, err := json.Marshal(benchPatch(1))
	if err != nil {
		b.Fatal(err)
	}
	data, err := json.Marshal(record{FormatVersion: formatVersion, Seq: 1, Patch: patch})
	if err != nil {
		b.Fatal(err)
	}
	dirf, err := os.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	return &baseline{dir: dir, path: filepath.Join(dir, entryName(1)), data: data, dirf: dirf}
}

func (w *baseline) write(b *testing.B) {
	if err := renameio.WriteFile(w.path, w.data, 0o600, renameio.WithTempDir(w.dir)); err != nil {
		b.Fatal(err)
	}
	if err := w.dirf.Sync(); err != nil {
		b.Fatal(err)
	}
}

func (w *baseline) close() { w.dirf.Close() }

// BenchmarkReportBaseline is the floor for BenchmarkReport: the same
// entry bytes written with renameio and the directory fsynced, nothing
// else.
func BenchmarkReportBaseline(b *testing.B) {
	base := newBaseline(b)
	defer base.close()
	for b.Loop() {
		base.write(b)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "patches/s")
}
