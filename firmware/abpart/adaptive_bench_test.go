package abpart

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/blockindex"
)

// BenchmarkAdaptive installs version 2 of a 64 MiB image over loopback HTTP
// into slot B, with version 1 in the running slot A, once adaptively and
// once as a full download in every iteration, and reports:
//
//	wire/image        bytes on the wire (index included) / image size
//	wire/changed      bytes on the wire / (changed blocks + index)
//	index/image       index size / image size
//	time/full         adaptive install time / full install time (same iteration)
//
// for random block changes of 1 %, 10 %, 50 % and 100 % of the blocks, in
// index blocks of 4 KiB (the default) and 64 KiB, over
// loopback at full speed (the worst case for adaptive installs: the network
// costs nothing, reading and hashing the slots is all) and over a link
// served at 20 MB/s, and over loopback with 5 ms added to every request
// of the image (a round trip; the index request is not delayed). Run with
// -count and take medians:
//
//	go test -run '^$' -bench Adaptive -count 3 ./firmware/abpart
func BenchmarkAdaptive(b *testing.B) {
	const size = 64 << 20
	for _, link := range []struct {
		name string
		rate int64         // bytes per second, 0: as fast as loopback goes
		rtt  time.Duration // added to every request of the image, a link's round trip
	}{{"loopback", 0, 0}, {"20MBps", 20e6, 0}, {"5msRTT", 0, 5 * time.Millisecond}} {
		for _, bs := range []int{blockindex.DefaultBlockSize, 64 << 10} {
			for _, pct := range []int{1, 10, 50, 100} {
				b.Run(link.name+"/"+strconv.Itoa(bs>>10)+"KiB/"+strconv.Itoa(pct)+"pct", func(b *testing.B) {
					benchAdaptive(b, size, bs, pct, link.rate, link.rtt)
				})
			}
		}
	}
}

func benchAdaptive(b *testing.B, size, bs, pct int, rate int64, rtt time.Duration) {
	r := rand.New(rand.NewPCG(uint64(pct), 2))
	v1 := make([]byte, size)
	fillRandom(r, v1)
	v2 := bytes.Clone(v1)
	blocks := size / bs
	perm := r.Perm(blocks)[:blocks*pct/100]
	for _, k := range perm {
		fillRandom(r, v2[k*bs:(k+1)*bs])
	}
	changed := int64(len(perm) * bs)
	ix, err := blockindex.Build(bytes.NewReader(v2), bs)
	if err != nil {
		b.Fatal(err)
	}
	idx, _ := ix.MarshalBinary()
	var sent atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body := v2
		if req.URL.Path == "/fw.img.bidx" {
			body = idx
		} else if rtt > 0 {
			time.Sleep(rtt)
		}
		http.ServeContent(countWriter{w, &sent, rate}, req, "fw", time.Time{}, bytes.NewReader(body))
	}))
	defer srv.Close()
	sum := sha256.Sum256(v2)
	req := firmware.Request{URI: srv.URL + "/fw.img", Version: "2.0.0", SHA256: hex.EncodeToString(sum[:]), Size: int64(size)}

	var wire, ratio []float64
	for range b.N {
		sent.Store(0)
		areq := req
		areq.IndexURI = srv.URL + "/fw.img.bidx"
		ta := benchInstall(b, v1, areq)
		wire = append(wire, float64(sent.Load()))
		sent.Store(0)
		tf := benchInstall(b, v1, req)
		if sent.Load() != int64(size) {
			b.Fatalf("full download sent %d bytes", sent.Load())
		}
		ratio = append(ratio, ta.Seconds()/tf.Seconds())
	}
	w := median(wire)
	b.ReportMetric(w/float64(size), "wire/image")
	b.ReportMetric(w/float64(changed+int64(len(idx))), "wire/changed")
	b.ReportMetric(float64(len(idx))/float64(size), "index/image")
	b.ReportMetric(median(ratio), "time/full")
}

// benchInstall installs req on a fresh device whose running slot A holds
// running, up to the reboot request, and returns how long that took.
func benchInstall(b *testing.B, running []byte, req firmware.Request) time.Duration {
	b.Helper()
	dir := b.TempDir()
	slotA := filepath.Join(dir, "a")
	if err := os.WriteFile(slotA, running, 0o644); err != nil {
		b.Fatal(err)
	}
	return benchInstallSlot(b, dir, slotA, req)
}

// benchInstallSlot is benchInstall with the running slot A in the file
// slotA, slot B and the state in dir.
func benchInstallSlot(b *testing.B, dir, slotA string, req firmware.Request) time.Duration {
	b.Helper()
	fi, err := os.Stat(slotA)
	if err != nil {
		b.Fatal(err)
	}
	slots := map[string]string{"A": slotA, "B": filepath.Join(dir, "b")}
	if err := os.Truncate(createFile(b, slots["B"]), fi.Size()); err != nil {
		b.Fatal(err)
	}
	envPath := filepath.Join(dir, "env")
	if err := os.WriteFile(envPath, []byte("gw_slot=A\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rebooted := make(chan struct{})
	inst, err := New(Config{SlotA: slots["A"], SlotB: slots["B"], SlotType: SlotTypeFile, RunningSlot: "A",
		StateDir: filepath.Join(dir, "state")}, Deps{Env: openEnvFile(b, envPath), Rebooter: rebootFunc(func(context.Context) error {
		close(rebooted)
		cancel()
		return nil
	})})
	if err != nil {
		b.Fatal(err)
	}
	var failed atomic.Pointer[firmware.Progress]
	m, err := firmware.NewManager(firmware.Config{StateDir: filepath.Join(dir, "agent"), Installer: inst, CurrentVersion: "1.0.0",
		RebootTimeout: time.Hour, Observer: func(p firmware.Progress) {
			if p.Phase == firmware.PhaseFailed {
				failed.Store(&p)
				cancel()
			}
		}})
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	start := time.Now()
	if _, err := m.Start(req); err != nil {
		b.Fatal(err)
	}
	go func() { done <- m.Run(ctx) }()
	<-ctx.Done()
	took := time.Since(start)
	<-done
	if p := failed.Load(); p != nil {
		b.Fatalf("update failed: %+v", p.Err)
	}
	select {
	case <-rebooted:
	default:
		b.Fatal("no reboot request")
	}
	return took
}

// countWriter counts the body bytes sent and, with a rate, sends them no
// faster than that (a link of that speed).
type countWriter struct {
	http.ResponseWriter
	n    *atomic.Int64
	rate int64
}

func (c countWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	if c.rate > 0 {
		time.Sleep(time.Duration(int64(n) * int64(time.Second) / c.rate))
	}
	return n, err
}

func fillRandom(r *rand.Rand, p []byte) {
	for i := 0; i+8 <= len(p); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			p[i+j] = byte(v >> (8 * j))
		}
	}
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}
