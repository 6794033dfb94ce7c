package firmware_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
)

// patternImage is a large image generated on the fly (a 1 MiB random block
// repeated), so the server side of the benchmark holds no image in memory.
type patternImage struct {
	block []byte
	size  int64
	off   int64
}

func (p *patternImage) Read(b []byte) (int, error) {
	if p.off >= p.size {
		return 0, io.EOF
	}
	i := p.off % int64(len(p.block))
	n := copy(b, p.block[i:min(int64(len(p.block)), i+p.size-p.off)])
	p.off += int64(n)
	return n, nil
}

func (p *patternImage) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
		p.off = offset
	case io.SeekCurrent:
		p.off += offset
	case io.SeekEnd:
		p.off = p.size + offset
	}
	if p.off < 0 {
		return 0, errors.New("negative offset")
	}
	return p.off, nil
}

// discardInstaller counts and drops the bytes: the benchmark measures the
// state machine, download and hashing, not a disk.
type discardInstaller struct{}

type discardSink struct{}

func (discardSink) Write(p []byte) (int, error) { return len(p), nil }
func (discardSink) Sync() error                 { return nil }
func (discardSink) Close() error                { return nil }

func (discardInstaller) Open(context.Context, firmware.Update, int64) (firmware.Sink, error) {
	return discardSink{}, nil
}
func (discardInstaller) Apply(context.Context, firmware.Update) error { return nil }

// peakHeap samples the live heap while fn runs and returns the highest value.
func peakHeap(fn func()) uint64 {
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	var peak atomic.Uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(sample)
			if v := sample[0].Value.Uint64(); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	fn()
	close(stop)
	<-done
	return peak.Load()
}

// BenchmarkDownload compares a full update (download, SHA-256, checkpoints,
// verify) with a plain io.Copy of the same HTTP body to io.Discard, for a
// 16 MiB and a 256 MiB image. B/op and peak-heap-MiB show that memory does
// not grow with the image size.
func BenchmarkDownload(b *testing.B) {
	block := make([]byte, 1<<20)
	rnd := rand.NewChaCha8([32]byte{1})
	rnd.Read(block)
	for _, size := range []int64{16 << 20, 256 << 20} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.ServeContent(w, r, "fw.img", time.Unix(1700000000, 0), &patternImage{block: block, size: size})
		}))
		h := sha256.New()
		io.Copy(h, &patternImage{block: block, size: size})
		sum := hex.EncodeToString(h.Sum(nil))
		url := srv.URL + "/fw.img"
		name := fmt.Sprintf("%dMiB", size>>20)

		b.Run(name+"/baseline-io.Copy", func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			client := &http.Client{Transport: &http.Transport{}}
			defer client.CloseIdleConnections()
			peak := peakHeap(func() {
				for b.Loop() {
					resp, err := client.Get(url)
					if err != nil {
						b.Fatal(err)
					}
					n, err := io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err != nil || n != size {
						b.Fatalf("copied %d: %v", n, err)
					}
				}
			})
			b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
		})

		b.Run(name+"/manager", func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			var last atomic.Pointer[firmware.Progress]
			ended := make(chan struct{}, 1)
			m, err := firmware.NewManager(firmware.Config{
				StateDir: b.TempDir(), Installer: discardInstaller{}, Log: zap.NewNop(),
				Observer: func(p firmware.Progress) {
					if p.Phase.Terminal() {
						last.Store(&p)
						ended <- struct{}{}
					}
				},
			})
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); m.Run(ctx) }()
			defer func() { cancel(); <-done }()
			peak := peakHeap(func() {
				for b.Loop() {
					if _, err := m.Start(firmware.Request{URI: url, SHA256: sum, Size: size}); err != nil {
						b.Fatal(err)
					}
					select {
					case <-ended:
					case <-time.After(5 * time.Minute):
						b.Fatal("update did not end")
					}
					if p := last.Load(); p.Phase != firmware.PhaseCompleted {
						b.Fatalf("update ended %s %+v", p.Phase, p.Err)
					}
				}
			})
			b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
		})
		srv.Close()
	}
}
