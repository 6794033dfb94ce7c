package abpart

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/blockindex"
)

// BenchmarkAdaptiveMemory installs version 2 of a 64 MiB and of a 1 GiB
// image of random bytes adaptively (1 % of the 4 KiB blocks changed, the
// rest in the running slot A) through the real state machine and abpart,
// alternately in every iteration, and reports per size the growth of the
// process's peak RSS during the install over its RSS before it (VmHWM,
// reset through /proc/self/clear_refs) and the peak of the Go heap
// (sampled every millisecond), then the ratios 1 GiB / 64 MiB. The goal is
// memory flat in image size: ratios about 1 (test/bench/run.sh's rule for
// full downloads: at most 2 MiB more RSS for 1 GiB than for 64 MiB).
//
//	go test -run '^$' -bench AdaptiveMemory -benchtime 1x -count 3 ./firmware/abpart
func BenchmarkAdaptiveMemory(b *testing.B) {
	if _, err := os.Stat("/proc/self/clear_refs"); err != nil {
		b.Fatalf("peak RSS needs /proc/self/clear_refs: %v", err)
	}
	sizes := []int64{64 << 20, 1 << 30}
	imgs := make([]memImage, len(sizes))
	for k, size := range sizes {
		imgs[k] = makeMemImage(b, size)
	}
	rss := make([][]float64, len(sizes))
	heap := make([][]float64, len(sizes))
	for range b.N {
		for k, img := range imgs {
			r, h := measureInstall(b, img)
			rss[k] = append(rss[k], r)
			heap[k] = append(heap[k], h)
		}
	}
	for k, size := range sizes {
		name := strconv.FormatInt(size>>20, 10) + "MiB"
		b.ReportMetric(median(rss[k])/1024, "peakRSS-KiB-"+name)
		b.ReportMetric(median(heap[k])/1024, "peakHeap-KiB-"+name)
	}
	b.ReportMetric((median(rss[1])-median(rss[0]))/1024, "peakRSS-KiB-diff")
	b.ReportMetric(median(rss[1])/median(rss[0]), "peakRSS-ratio")
	b.ReportMetric(median(heap[1])/median(heap[0]), "peakHeap-ratio")
}

// memImage is version 1 (the running slot's file) and version 2 of an
// image and version 2's block index, in files, so the benchmark's own
// memory stays small.
type memImage struct {
	dir, v1, v2, idx string
	sum              string
	size             int64
}

// makeMemImage writes the files of a memImage of size bytes, block by
// block: random bytes, 1 % of the blocks different in version 2, and the
// index of version 2, all without holding more than a block in memory.
func makeMemImage(b *testing.B, size int64) memImage {
	b.Helper()
	const bs = blockindex.DefaultBlockSize
	dir := b.TempDir()
	m := memImage{dir: dir, v1: filepath.Join(dir, "v1"), v2: filepath.Join(dir, "v2"), idx: filepath.Join(dir, "v2.bidx"), size: size}
	create := func(p string) (*os.File, *bufio.Writer) {
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		return f, bufio.NewWriterSize(f, 1<<20)
	}
	f1, w1 := create(m.v1)
	f2, w2 := create(m.v2)
	fi, wi := create(m.idx)
	hdr := make([]byte, blockindex.HeaderSize)
	copy(hdr, blockindex.Magic)
	binary.BigEndian.PutUint32(hdr[8:], blockindex.Version)
	binary.BigEndian.PutUint32(hdr[12:], bs)
	binary.BigEndian.PutUint64(hdr[16:], uint64(size))
	wi.Write(hdr)
	r := rand.New(rand.NewPCG(uint64(size), 3))
	whole := sha256.New()
	blk := make([]byte, bs)
	for off := int64(0); off < size; off += bs {
		fillRandom(r, blk)
		w1.Write(blk)
		if r.IntN(100) == 0 {
			fillRandom(r, blk)
		}
		w2.Write(blk)
		whole.Write(blk)
		h := sha256.Sum256(blk)
		wi.Write(h[:])
	}
	copy(hdr[24:], whole.Sum(nil))
	m.sum = hex.EncodeToString(hdr[24:56])
	for _, fw := range []struct {
		f *os.File
		w *bufio.Writer
	}{{f1, w1}, {f2, w2}, {fi, wi}} {
		if err := fw.w.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := fi.WriteAt(hdr, 0); err != nil {
		b.Fatal(err)
	}
	for _, f := range []*os.File{f1, f2, fi} {
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
	}
	return m
}

// measureInstall installs m adaptively and returns the peak RSS growth and
// the peak heap, in bytes.
func measureInstall(b *testing.B, m memImage) (rss, heap float64) {
	b.Helper()
	var sent atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		p := m.v2
		if req.URL.Path == "/fw.img.bidx" {
			p = m.idx
		}
		f, err := os.Open(p)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer f.Close()
		http.ServeContent(countWriter{w, &sent, 0}, req, "fw", time.Time{}, f)
	}))
	defer srv.Close()
	req := firmware.Request{URI: srv.URL + "/fw.img", IndexURI: srv.URL + "/fw.img.bidx", Version: "2.0.0", SHA256: m.sum, Size: m.size}

	dir := filepath.Join(m.dir, "run")
	if err := os.RemoveAll(dir); err != nil {
		b.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	debug.FreeOSMemory()
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		b.Fatalf("reset the peak RSS: %v", err)
	}
	before := procStatusKiB(b, "VmRSS")
	stop := make(chan struct{})
	peak := make(chan uint64)
	go func() {
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		var top uint64
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(s)
			top = max(top, s[0].Value.Uint64())
			select {
			case <-stop:
				peak <- top
				return
			case <-t.C:
			}
		}
	}()
	benchInstallSlot(b, dir, m.v1, req)
	close(stop)
	heapPeak := <-peak
	after := procStatusKiB(b, "VmHWM")
	if sent.Load() >= m.size/2 {
		b.Fatalf("the adaptive install of %d bytes sent %d: not adaptive", m.size, sent.Load())
	}
	if err := os.Remove(filepath.Join(dir, "b")); err != nil {
		b.Fatal(err)
	}
	return float64(after-before) * 1024, float64(heapPeak)
}

// procStatusKiB reads a field of /proc/self/status, in KiB.
func procStatusKiB(b *testing.B, field string) int64 {
	b.Helper()
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(st)) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatalf("no %s in /proc/self/status", field)
	return 0
}
