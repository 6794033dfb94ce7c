package abpart

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/blockindex"
	"github.com/gwagent/gwagent/internal/testutil"
)

// Adaptive installs through the real state machine: the running slot A holds
// version 1, the server holds version 2 and its block index, and only the
// blocks the device does not hold may cross the wire.

const testBlock = blockindex.MinBlockSize // 4 KiB: 256 blocks in a 1 MiB slot

// adaptiveServer serves an image with hand-written Range handling, so that
// tests can make it misbehave, and its block index; it counts what it sent.
type adaptiveServer struct {
	*httptest.Server
	img, idx []byte

	mu          sync.Mutex
	ranges      []string // Range headers of the image requests
	imgSent     int64    // image body bytes sent
	idxSent     int
	ignoreRange bool        // answer every image request 200 with the whole image
	corrupt     map[int]int // block → times left to corrupt it when sent (-1: always)
	shift       int64       // send the bytes this far after the ones asked for (once)

	// hold, when set, keeps every Range request waiting until it is
	// closed (or the request is cancelled); inFlight and maxInFlight
	// count the Range requests being served.
	hold                  chan struct{}
	inFlight, maxInFlight atomic.Int32
}

func newAdaptiveServer(t *testing.T, img []byte) *adaptiveServer {
	t.Helper()
	ix, err := blockindex.Build(bytes.NewReader(img), testBlock)
	if err != nil {
		t.Fatal(err)
	}
	idx, _ := ix.MarshalBinary()
	s := &adaptiveServer{img: img, idx: idx, corrupt: map[int]int{}}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func (s *adaptiveServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Range") != "" {
		n := s.inFlight.Add(1)
		defer s.inFlight.Add(-1)
		for m := s.maxInFlight.Load(); n > m && !s.maxInFlight.CompareAndSwap(m, n); m = s.maxInFlight.Load() {
		}
		if s.hold != nil {
			select {
			case <-s.hold:
			case <-r.Context().Done():
				return
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.URL.Path == "/fw.img.bidx" {
		s.idxSent++
		w.Write(s.idx)
		return
	}
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	rng := r.Header.Get("Range")
	if rng == "" || s.ignoreRange {
		w.Header().Set("Content-Length", strconv.Itoa(len(s.img)))
		n, _ := w.Write(s.img)
		s.imgSent += int64(n)
		return
	}
	a, b, ok := parseRange(rng, int64(len(s.img)))
	if !ok {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", len(s.img)))
		w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
		return
	}
	body := bytes.Clone(s.img[min(a+s.shift, int64(len(s.img))):min(b+1+s.shift, int64(len(s.img)))])
	s.shift = 0
	for k, left := range s.corrupt {
		off := int64(k) * testBlock
		if left != 0 && off >= a && off <= b {
			body[off-a] ^= 0xff
			if left > 0 {
				s.corrupt[k] = left - 1
			}
		}
	}
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, len(s.img)))
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusPartialContent)
	n, _ := w.Write(body)
	s.imgSent += int64(n)
}

// parseRange reads "bytes=a-b" or "bytes=a-" within size.
func parseRange(h string, size int64) (a, b int64, ok bool) {
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found {
		return 0, 0, false
	}
	as, bs, _ := strings.Cut(spec, "-")
	a, err := strconv.ParseInt(as, 10, 64)
	if err != nil || a >= size {
		return 0, 0, false
	}
	b = size - 1
	if bs != "" {
		if b, err = strconv.ParseInt(bs, 10, 64); err != nil || b < a {
			return 0, 0, false
		}
		b = min(b, size-1)
	}
	return a, b, true
}

// byStart sorts Range headers by their first byte: an adaptive install
// has several requests in flight, so they reach the server in any order.
func byStart(ranges []string) []string {
	ranges = slices.Clone(ranges)
	start := func(r string) int64 {
		a, _, _ := parseRange(r, math.MaxInt64)
		return a
	}
	slices.SortFunc(ranges, func(x, y string) int { return cmp.Compare(start(x), start(y)) })
	return ranges
}

func (s *adaptiveServer) counts() (ranges []string, imgSent int64, idxSent int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ranges...), s.imgSent, s.idxSent
}

func (s *adaptiveServer) request() firmware.Request {
	req := request(s.URL+"/fw.img", s.img)
	req.IndexURI = s.URL + "/fw.img.bidx"
	return req
}

// adaptivePair puts version 1 in the running slot A and returns version 2
// and the bytes of it that the device does not hold: three changed blocks,
// a block of version 1 that moved (found by hash), and a changed short
// last block.
func adaptivePair(t *testing.T, d *device) (v2 []byte, changed int64) {
	t.Helper()
	const size = 200*testBlock + 123
	slotA, err := os.ReadFile(d.slots["A"])
	if err != nil {
		t.Fatal(err)
	}
	v1 := slotA[:size] // the running slot holds version 1 (random bytes)
	v2 = bytes.Clone(v1)
	fresh := randomBytes(t, 4*testBlock)
	copy(v2[10*testBlock:], fresh[:3*testBlock])             // blocks 10-12 changed
	copy(v2[50*testBlock:], v1[150*testBlock:151*testBlock]) // block 50 = old block 150
	copy(v2[200*testBlock:], fresh[3*testBlock:3*testBlock+123])
	return v2, 3*testBlock + 123
}

func TestAdaptiveInstall(t *testing.T) {
	d := newDevice(t, "file")
	d.guard("A")
	v2, changed := adaptivePair(t, d)
	srv := newAdaptiveServer(t, v2)
	d.tune = func(c *firmware.Config) { c.MaxRangeBytes = 2 * testBlock }
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(srv.request()); err != nil {
		t.Fatal(err)
	}
	if !a.waitRebootOrEnd(t) {
		final, phases := a.result()
		t.Fatalf("no reboot: %+v, phases %v", final, phases)
	}
	got, err := os.ReadFile(d.slots["B"])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:len(v2)], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	ranges, imgSent, idxSent := srv.counts()
	t.Logf("ranges %q, image bytes sent %d of %d (changed %d), index %d bytes", ranges, imgSent, len(v2), changed, len(srv.idx))
	if imgSent != changed {
		t.Errorf("sent %d image bytes, want exactly the %d the device does not hold", imgSent, changed)
	}
	if idxSent != 1 {
		t.Errorf("index fetched %d times", idxSent)
	}
	// Blocks 10-12 in ranges of at most two blocks, then the last block.
	want := []string{"bytes=40960-49151", "bytes=49152-53247", fmt.Sprintf("bytes=819200-%d", len(v2)-1)}
	if strings.Join(byStart(ranges), " ") != strings.Join(want, " ") {
		t.Errorf("ranges %q, want %q", ranges, want)
	}
	a.mu.Lock()
	st := a.adaptive
	a.mu.Unlock()
	if st == nil || st.BytesFetched != changed+int64(len(srv.idx)) || st.BytesReused != int64(len(v2))-changed || st.Fallback != "" {
		t.Errorf("Progress.Adaptive = %+v, want fetched %d, reused %d", st, changed+int64(len(srv.idx)), int64(len(v2))-changed)
	}
}

// scatteredPair is version 2 of the running slot's first 200 blocks with
// every other block changed: a Range request per changed block.
func scatteredPair(t *testing.T, d *device) []byte {
	t.Helper()
	slotA, err := os.ReadFile(d.slots["A"])
	if err != nil {
		t.Fatal(err)
	}
	v2 := bytes.Clone(slotA[:200*testBlock])
	fresh := randomBytes(t, len(v2))
	for k := 0; k < 200; k += 2 {
		copy(v2[k*testBlock:(k+1)*testBlock], fresh[k*testBlock:])
	}
	return v2
}

// TestAdaptiveRequestsInFlight: scattered changes are fetched with up to
// four Range requests at once, never more, and the slot is written in
// order all the same.
func TestAdaptiveRequestsInFlight(t *testing.T) {
	d := newDevice(t, "file")
	d.guard("A")
	v2 := scatteredPair(t, d)
	srv := newAdaptiveServer(t, v2)
	srv.hold = make(chan struct{})
	d.tune = func(c *firmware.Config) { c.MaxRangeBytes = testBlock }
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(srv.request()); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, agentWait, "four Range requests in flight", func() bool { return srv.inFlight.Load() == 4 })
	// The planner now waits for the writer, which waits for the first
	// request: no fifth one may start.
	time.Sleep(100 * time.Millisecond)
	close(srv.hold)
	if !a.waitRebootOrEnd(t) {
		final, phases := a.result()
		t.Fatalf("no reboot: %+v, phases %v", final, phases)
	}
	got, _ := os.ReadFile(d.slots["B"])
	if !bytes.Equal(got[:len(v2)], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	ranges, sent, _ := srv.counts()
	if m := srv.maxInFlight.Load(); m != 4 {
		t.Errorf("at most %d Range requests in flight, want 4", m)
	}
	if len(ranges) != 100 || sent != 100*testBlock {
		t.Errorf("%d Range requests, %d bytes: want one per changed block, 100", len(ranges), sent)
	}
}

// TestAdaptiveCancelInFlight: cancelling an adaptive install stops the
// Range requests in flight (the server never answers them), and nothing
// is left running (goleak, TestMain).
func TestAdaptiveCancelInFlight(t *testing.T) {
	d := newDevice(t, "file")
	d.guard("A")
	v2 := scatteredPair(t, d)
	srv := newAdaptiveServer(t, v2)
	srv.hold = make(chan struct{})
	defer close(srv.hold)
	d.tune = func(c *firmware.Config) { c.MaxRangeBytes = testBlock }
	a := d.startAgent(t, nil)
	id, err := a.m.Start(srv.request())
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, agentWait, "four Range requests in flight", func() bool { return srv.inFlight.Load() == 4 })
	ctx, cancel := context.WithTimeout(context.Background(), agentWait)
	defer cancel()
	if _, err := a.m.Cancel(ctx, id); err != nil {
		t.Fatalf("cancel with Range requests in flight: %v", err)
	}
	testutil.Eventually(t, agentWait, "the Range requests end", func() bool { return srv.inFlight.Load() == 0 })
	if st := a.m.Status(); st.Phase != firmware.PhaseFailed || st.Err == nil || st.Err.Code != firmware.CodeCancelled {
		t.Errorf("after cancel: %+v, want failed/%s", st, firmware.CodeCancelled)
	}
}

// TestAdaptiveBadInput: a server or index that lies makes the agent fetch
// a block again, fall back to the full download or fail with verifyFailed
// naming the block; the running slot is never written.
func TestAdaptiveBadInput(t *testing.T) {
	for _, tc := range []struct {
		name     string
		setup    func(s *adaptiveServer, req *firmware.Request)
		policy   string
		fail     string // substring of the verifyFailed message; "" = completes
		fallback string // substring of Progress.Adaptive.Fallback
	}{
		{name: "corrupt block refetched", setup: func(s *adaptiveServer, _ *firmware.Request) { s.corrupt[11] = 1 }},
		{name: "corrupt block twice", setup: func(s *adaptiveServer, _ *firmware.Request) { s.corrupt[11] = -1 },
			fail: "block 11 (bytes 45056-49151)"},
		{name: "wrong range refetched", setup: func(s *adaptiveServer, _ *firmware.Request) { s.shift = testBlock }},
		{name: "200 instead of 206", setup: func(s *adaptiveServer, _ *firmware.Request) { s.ignoreRange = true },
			fallback: "200, not 206"},
		{name: "200 instead of 206, policy fail", setup: func(s *adaptiveServer, _ *firmware.Request) { s.ignoreRange = true },
			policy: firmware.AdaptiveFallbackFail, fail: "block 10 (bytes 40960-45055) from http://127.0.0.1"},
		{name: "index for another image", setup: func(s *adaptiveServer, _ *firmware.Request) {
			ix, _ := blockindex.Build(bytes.NewReader(s.img[:len(s.img)-1]), testBlock)
			s.idx, _ = ix.MarshalBinary()
		}, fallback: "for another image"},
		{name: "index for another image, policy fail", setup: func(s *adaptiveServer, _ *firmware.Request) {
			ix, _ := blockindex.Build(bytes.NewReader(s.img[:len(s.img)-1]), testBlock)
			s.idx, _ = ix.MarshalBinary()
		}, policy: firmware.AdaptiveFallbackFail, fail: "for another image"},
		{name: "truncated index", setup: func(s *adaptiveServer, _ *firmware.Request) { s.idx = s.idx[:len(s.idx)-7] },
			fallback: "truncated or padded"},
		{name: "index unauthenticated", setup: func(_ *adaptiveServer, req *firmware.Request) { req.SHA256 = "" },
			fallback: "not authenticated"},
		{name: "range beyond the image", setup: func(s *adaptiveServer, req *firmware.Request) {
			// The request and its index describe an image one block
			// longer than the one served.
			long := append(bytes.Clone(s.img), randomBytes(t, testBlock)...)
			ix, _ := blockindex.Build(bytes.NewReader(long), testBlock)
			s.idx, _ = ix.MarshalBinary()
			*req = request(req.URI, long)
			req.IndexURI = s.URL + "/fw.img.bidx"
		}, fail: "block 10 (bytes 40960-45055): download from http://127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, "file")
			d.guard("A")
			v2, _ := adaptivePair(t, d)
			srv := newAdaptiveServer(t, v2)
			req := srv.request()
			srv.mu.Lock() // the server's goroutines read what setup changes
			tc.setup(srv, &req)
			srv.mu.Unlock()
			d.tune = func(c *firmware.Config) {
				c.MaxRangeBytes = 2 * testBlock
				c.AdaptiveFallback = tc.policy
			}
			a := d.startAgent(t, nil)
			if _, err := a.m.Start(req); err != nil {
				t.Fatal(err)
			}
			rebooted := a.waitRebootOrEnd(t)
			final, phases := a.result()
			a.mu.Lock()
			st := a.adaptive
			a.mu.Unlock()
			ranges, imgSent, _ := srv.counts()
			t.Logf("phases %v, adaptive %+v, ranges %q, image bytes sent %d", phases, st, ranges, imgSent)
			if tc.fail != "" {
				if rebooted || final == nil || final.Phase != firmware.PhaseFailed || final.Err == nil || final.Err.Code != firmware.CodeVerify ||
					!strings.Contains(final.Err.Message, tc.fail) {
					t.Fatalf("update ended %+v (err %+v), want failed verifyFailed naming %q", final, errOf(final), tc.fail)
				}
				if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
					t.Fatalf("environment after the failure: %+v", st)
				}
				return
			}
			if !rebooted {
				t.Fatalf("no reboot: %+v (err %+v)", final, errOf(final))
			}
			got, _ := os.ReadFile(d.slots["B"])
			if !bytes.Equal(got[:len(v2)], v2) {
				t.Fatal("slot B does not hold version 2")
			}
			if tc.fallback != "" {
				if st == nil || !strings.Contains(st.Fallback, tc.fallback) {
					t.Fatalf("Progress.Adaptive %+v, want a fallback naming %q", st, tc.fallback)
				}
			} else if st == nil || st.Fallback != "" || imgSent >= int64(len(v2))/2 {
				t.Fatalf("Progress.Adaptive %+v, image bytes sent %d: want an adaptive install", st, imgSent)
			}
		})
	}
}

func errOf(p *firmware.Progress) *firmware.UpdateError {
	if p == nil {
		return nil
	}
	return p.Err
}

// noRunning is the installer of an agent that cannot read the running slot
// (an unprivileged agent whose start-up step took it away).
type noRunning struct{ *Installer }

func (n noRunning) LocalBlocks(ctx context.Context, u firmware.Update) (firmware.LocalImage, firmware.LocalImage, error) {
	r, t, err := n.Installer.LocalBlocks(ctx, u)
	if r != nil {
		r.Close()
	}
	return nil, t, err
}

// TestAdaptiveWithoutRunningSlot: without the running slot nothing can be
// reused on a fresh install, and the install still completes, fetching
// every block by Range.
func TestAdaptiveWithoutRunningSlot(t *testing.T) {
	d := newDevice(t, "file")
	d.guard("A")
	v2, _ := adaptivePair(t, d)
	srv := newAdaptiveServer(t, v2)
	d.wrap = func(i *Installer) firmware.Installer { return noRunning{i} }
	// Nothing to reuse is below any minimum share: take it away.
	d.tune = func(c *firmware.Config) { c.AdaptiveMinReuse = -1 }
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(srv.request()); err != nil {
		t.Fatal(err)
	}
	if !a.waitRebootOrEnd(t) {
		final, phases := a.result()
		t.Fatalf("no reboot: %+v, phases %v", final, phases)
	}
	got, _ := os.ReadFile(d.slots["B"])
	if !bytes.Equal(got[:len(v2)], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	ranges, sent, _ := srv.counts()
	a.mu.Lock()
	st := a.adaptive
	a.mu.Unlock()
	if sent != int64(len(v2)) || len(ranges) != 1 || st == nil || st.BytesReused != 0 || st.Fallback != "" {
		t.Errorf("sent %d image bytes in %q, adaptive %+v: want the whole image in one range of at most 1 MiB, nothing reused", sent, ranges, st)
	}
}

// TestAdaptiveBridgesShortGaps: a single kept block between runs of
// changed blocks is fetched with them (one Range request instead of two)
// while the bytes on the wire stay within 1.1 × (changed blocks + index);
// a gap of five kept blocks is not bridged, and they are reused.
func TestAdaptiveBridgesShortGaps(t *testing.T) {
	d := newDevice(t, "file")
	d.guard("A")
	slotA, _ := os.ReadFile(d.slots["A"])
	const size = 200 * testBlock
	v2 := randomBytes(t, size)
	kept := []int{30, 60, 100, 101, 102, 103, 104, 150}
	for _, k := range kept {
		copy(v2[k*testBlock:(k+1)*testBlock], slotA[k*testBlock:])
	}
	changed := int64(size - len(kept)*testBlock)
	srv := newAdaptiveServer(t, v2)
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(srv.request()); err != nil {
		t.Fatal(err)
	}
	if !a.waitRebootOrEnd(t) {
		final, phases := a.result()
		t.Fatalf("no reboot: %+v, phases %v", final, phases)
	}
	got, _ := os.ReadFile(d.slots["B"])
	if !bytes.Equal(got[:size], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	ranges, sent, _ := srv.counts()
	want := []string{fmt.Sprintf("bytes=0-%d", 100*testBlock-1), fmt.Sprintf("bytes=%d-%d", 105*testBlock, size-1)}
	if strings.Join(byStart(ranges), " ") != strings.Join(want, " ") {
		t.Errorf("ranges %q, want %q", ranges, want)
	}
	wire := float64(sent + int64(len(srv.idx)))
	if r := wire / float64(changed+int64(len(srv.idx))); r > 1.1 {
		t.Errorf("wire / (changed + index) = %.3f, want at most 1.1", r)
	}
	a.mu.Lock()
	st := a.adaptive
	a.mu.Unlock()
	if st == nil || st.BytesReused != 5*testBlock || st.Fallback != "" {
		t.Errorf("Progress.Adaptive = %+v, want the five-block gap reused", st)
	}
}

// TestAdaptiveLittleToReuse: when the running slot holds less of the new
// image than Config.AdaptiveMinReuse, the install is a plain full download
// (one GET, no Range request), reported as the fallback with the share
// found, whatever the fallback policy (it is a choice, not a failure); no
// scan is left in the state folder.
func TestAdaptiveLittleToReuse(t *testing.T) {
	d := newDevice(t, "file")
	d.guard("A")
	slotA, _ := os.ReadFile(d.slots["A"])
	const size = 200 * testBlock
	v2 := randomBytes(t, size)
	copy(v2[20*testBlock:], slotA[100*testBlock:104*testBlock]) // 4 blocks of 200: 2 %
	srv := newAdaptiveServer(t, v2)
	d.tune = func(c *firmware.Config) { c.AdaptiveFallback = firmware.AdaptiveFallbackFail }
	a := d.startAgent(t, nil)
	if _, err := a.m.Start(srv.request()); err != nil {
		t.Fatal(err)
	}
	if !a.waitRebootOrEnd(t) {
		final, phases := a.result()
		t.Fatalf("no reboot: %+v, phases %v", final, phases)
	}
	got, _ := os.ReadFile(d.slots["B"])
	if !bytes.Equal(got[:size], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	ranges, sent, idx := srv.counts()
	a.mu.Lock()
	st := a.adaptive
	a.mu.Unlock()
	if sent != size || len(ranges) != 1 || ranges[0] != "" || idx != 1 {
		t.Errorf("sent %d image bytes in %q, index fetched %d times: want one plain GET of the image", sent, ranges, idx)
	}
	if st == nil || st.BytesReused != 0 || st.BytesFetched != size+int64(len(srv.idx)) ||
		!strings.Contains(st.Fallback, "the running slot holds 2.0 % of the new image, less than the 3.0 %") {
		t.Errorf("Progress.Adaptive = %+v, want the fallback with the share found", st)
	}
	for _, f := range []string{"adaptive-scan.bin", "adaptive-index.bidx", "adaptive-lookup.tmp"} {
		if _, err := os.Stat(filepath.Join(d.dir, "agent", f)); !os.IsNotExist(err) {
			t.Errorf("%s left in the state folder: %v", f, err)
		}
	}
}

// TestAdaptiveCrashResume SIGKILLs a real agent process in the middle of an
// adaptive install and resumes it here: the install goes on from its
// checkpoint (no block before it is fetched again), the blocks the killed
// run wrote after the checkpoint are taken from the target slot, and the
// update completes with version 2 in slot B and slot A untouched.
func TestAdaptiveCrashResume(t *testing.T) {
	requireTools(t, "grub-editenv")
	d := newDevice(t, "grub")
	d.guard("A")
	slotA, _ := os.ReadFile(d.slots["A"])
	const size = 225 * testBlock
	v2 := bytes.Clone(slotA[:size])
	fresh := randomBytes(t, size)
	var changed int64
	for i := 0; i < size/testBlock; i++ {
		if (i/4)%2 == 0 { // runs of four changed blocks, four kept
			copy(v2[i*testBlock:(i+1)*testBlock], fresh[i*testBlock:])
			changed += testBlock
		}
	}
	srv := newAdaptiveServer(t, v2)
	spec := abCrashSpec{
		Config:     d.config(),
		GrubEnv:    filepath.Join(d.dir, "grubenv"),
		StateDir:   filepath.Join(d.dir, "agent"),
		Request:    srv.request(),
		KillPhase:  "downloading",
		KillBytes:  size / 2,
		Checkpoint: 64 << 10,
		MaxRange:   2 * testBlock,
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	childPhases, boots := runCrashChild(t, d, string(raw))
	var cp struct {
		Offset  int64 `json:"offset"`
		Fetched int64 `json:"fetched"`
		Reused  int64 `json:"reused"`
	}
	b, err := os.ReadFile(filepath.Join(spec.StateDir, "download.json"))
	if err != nil {
		t.Fatalf("no checkpoint left by the killed child: %v", err)
	}
	if err := json.Unmarshal(b, &cp); err != nil {
		t.Fatal(err)
	}
	if cp.Offset <= 0 || cp.Offset >= size || cp.Fetched <= 0 || cp.Reused <= 0 {
		t.Fatalf("checkpoint after the kill: %+v", cp)
	}
	before, sentBefore, _ := srv.counts()
	if _, err := os.Stat(filepath.Join(spec.StateDir, "adaptive-scan.bin")); err != nil {
		t.Fatalf("the killed run saved no scan of the running slot: %v", err)
	}

	core, logs := observer.New(zap.InfoLevel)
	d.tune = func(c *firmware.Config) {
		c.MaxRangeBytes = 2 * testBlock
		c.Log = zap.New(core)
	}
	a := d.startAgent(t, nil)
	for a.waitRebootOrEnd(t) {
		boots++
		if boots > 3 {
			t.Fatalf("rebooted %d times; phases %v", boots, a.phasesNow())
		}
		d.boot()
		a = d.startAgent(t, nil)
	}
	final, phases := a.result()
	if final == nil || final.Phase != firmware.PhaseCompleted || final.Slot != "B" {
		t.Fatalf("resumed update ended %+v; child phases %v, resumed phases %v", final, childPhases, phases)
	}
	got, _ := os.ReadFile(d.slots["B"])
	if !bytes.Equal(got[:size], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	// The running slot was read once: the resumed run used the saved scan.
	if n := logs.FilterMessage("adaptive install: running image scanned").Len(); n != 0 ||
		logs.FilterMessage("adaptive install: using the saved scan of the running image").Len() != 1 {
		t.Errorf("resumed run scanned the running slot %d times; logs %v", n, logs.All())
	}
	if _, err := os.Stat(filepath.Join(spec.StateDir, "adaptive-scan.bin")); err == nil {
		t.Error("the scan of the running slot is still there after the update")
	}
	ranges, sentAll, _ := srv.counts()
	after := ranges[len(before):]
	t.Logf("killed with checkpoint %+v after %d image bytes; resumed with %d ranges, %d more bytes (%d changed in all)",
		cp, sentBefore, len(after), sentAll-sentBefore, changed)
	for _, r := range after {
		a, _, ok := parseRange(r, size)
		if !ok || a < cp.Offset {
			t.Errorf("resumed run fetched %q, before the checkpoint at %d", r, cp.Offset)
		}
	}
	// After the checkpoint only changed blocks are fetched (fewer when the
	// killed run wrote some past it: those are taken from slot B).
	var changedAfter int64
	for i := int(cp.Offset / testBlock); i < size/testBlock; i++ {
		if (i/4)%2 == 0 {
			changedAfter += testBlock
		}
	}
	if sentAll-sentBefore > changedAfter {
		t.Errorf("resumed run fetched %d bytes, more than the %d changed bytes after the checkpoint", sentAll-sentBefore, changedAfter)
	}
}

// TestAdaptiveFallbackCrashResume: an install that fell back to the full
// download (the server ignores Range) and is killed stays a full download
// when it resumes: the index is not fetched again and the image completes.
func TestAdaptiveFallbackCrashResume(t *testing.T) {
	requireTools(t, "grub-editenv")
	d := newDevice(t, "grub")
	d.guard("A")
	v2, _ := adaptivePair(t, d)
	srv := newAdaptiveServer(t, v2)
	srv.mu.Lock()
	srv.ignoreRange = true
	srv.mu.Unlock()
	spec := abCrashSpec{
		Config:     d.config(),
		GrubEnv:    filepath.Join(d.dir, "grubenv"),
		StateDir:   filepath.Join(d.dir, "agent"),
		Request:    srv.request(),
		KillPhase:  "downloading",
		KillBytes:  int64(len(v2)) * 3 / 4,
		Checkpoint: 64 << 10,
		MaxRange:   2 * testBlock,
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	runCrashChild(t, d, string(raw))
	var cp struct {
		Offset   int64  `json:"offset"`
		Fallback string `json:"fallback"`
	}
	b, err := os.ReadFile(filepath.Join(spec.StateDir, "download.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &cp); err != nil || cp.Offset <= 0 || !strings.Contains(cp.Fallback, "200, not 206") {
		t.Fatalf("checkpoint after the kill: %s (%v), want a fallback and an offset", b, err)
	}
	a := d.startAgent(t, nil)
	if !a.waitRebootOrEnd(t) {
		final, phases := a.result()
		t.Fatalf("no reboot: %+v, phases %v", final, phases)
	}
	got, _ := os.ReadFile(d.slots["B"])
	if !bytes.Equal(got[:len(v2)], v2) {
		t.Fatal("slot B does not hold version 2")
	}
	if _, _, idx := srv.counts(); idx != 1 {
		t.Errorf("index fetched %d times, want once (by the killed run)", idx)
	}
	a.mu.Lock()
	st := a.adaptive
	a.mu.Unlock()
	if st == nil || st.Fallback != cp.Fallback {
		t.Errorf("resumed Progress.Adaptive %+v, want the fallback reason %q", st, cp.Fallback)
	}
}
