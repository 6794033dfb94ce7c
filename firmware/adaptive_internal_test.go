package firmware

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/gwagent/gwagent/firmware/blockindex"
)

type memImage struct{ *bytes.Reader }

func (memImage) Close() error { return nil }

// scan runs scanRunning in a fresh state folder and returns the saved
// result (nil when the sample decided).
func scan(t *testing.T, ix *blockindex.Index, running LocalImage, minReuse float64) ([]int32, scanStats) {
	t.Helper()
	s := &streamer{m: &Manager{store: store{dir: t.TempDir()}}, cp: checkpoint{UpdateID: "u1"}}
	st, err := s.scanRunning(context.Background(), ix, running, "key", minReuse)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.m.store.path(lookupFile)); !os.IsNotExist(err) {
		t.Errorf("the lookup file is left after the scan: %v", err)
	}
	if st.sampled {
		return nil, st
	}
	src, found, ok, err := openScan(s.m.store.path(scanFile), "key", ix.Blocks(), 0)
	if err != nil || !ok || found != st.found {
		t.Fatalf("openScan: ok %v found %d (scan found %d): %v", ok, found, st.found, err)
	}
	defer src.close()
	out := make([]int32, ix.Blocks())
	for i := range out {
		if out[i], err = src.next(); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, ok, _ := openScan(s.m.store.path(scanFile), "other key", ix.Blocks(), 0); ok {
		t.Error("the scan file is taken for another key")
	}
	return out, st
}

// TestScanRunning: every block of the new image that the running image
// holds is found (anywhere, repeated blocks too, the short last block at
// its own offset), and nothing else.
func TestScanRunning(t *testing.T) {
	const bs = blockindex.MinBlockSize
	block := func(b byte) []byte { return bytes.Repeat([]byte{b}, bs) }
	running := slices.Concat(block(1), block(0), block(2), block(3), []byte("tail!"))
	// The new image repeats block 0, moves blocks 1 and 3, adds block 9
	// and moves the short tail (from 4*bs to 5*bs: not found).
	img := slices.Concat(block(0), block(0), block(3), block(9), block(1), []byte("tail!"))
	ix, err := blockindex.Build(bytes.NewReader(img), bs)
	if err != nil {
		t.Fatal(err)
	}
	offs, st := scan(t, ix, memImage{bytes.NewReader(running)}, 0)
	want := []int32{1, 1, 3, -1, 0, -1}
	if !slices.Equal(offs, want) || st.found != 4 || st.scanned != 4*bs || st.reuse != 4*bs {
		t.Fatalf("offsets %v (%+v), want %v (4 found, %d scanned)", offs, st, want, 4*bs)
	}
	// The short last block is found where it was.
	img2 := slices.Concat(block(7), block(7), block(7), block(7), []byte("tail!"))
	ix2, _ := blockindex.Build(bytes.NewReader(img2), bs)
	offs, st = scan(t, ix2, memImage{bytes.NewReader(running)}, 0)
	if want := []int32{-1, -1, -1, -1, 4}; !slices.Equal(offs, want) || st.reuse != 5 {
		t.Fatalf("offsets %v (%+v), want %v", offs, st, want)
	}
}

// TestScanSample: with a minimum share to reuse, a running image that holds
// none of the new one is given up after a sample of sampleBlocks blocks;
// one that holds 3 % of it in a single region is scanned in full, every
// block read once, and the blocks found are where they are.
func TestScanSample(t *testing.T) {
	const bs, blocks = blockindex.MinBlockSize, 8 * sampleBlocks
	r := rand.New(rand.NewPCG(1, 2))
	running := make([]byte, blocks*bs)
	for i := range running {
		running[i] = byte(r.Uint32())
	}
	fresh := make([]byte, blocks*bs)
	for i := range fresh {
		fresh[i] = byte(r.Uint32())
	}
	ix, _ := blockindex.Build(bytes.NewReader(fresh), bs)
	if _, st := scan(t, ix, memImage{bytes.NewReader(running)}, 0.03); !st.sampled || st.hits != 0 || st.scanned != sampleBlocks*bs {
		t.Fatalf("nothing to reuse: %+v, want a sample of %d blocks and no more", st, sampleBlocks)
	}
	// Half of the new image is zeros, which the running image holds in one
	// block only, so the sample misses them: the full scan finds them.
	zeros := bytes.Clone(fresh)
	clear(zeros[:len(zeros)/2])
	run0 := bytes.Clone(running)
	clear(run0[7*bs : 8*bs])
	ix0, _ := blockindex.Build(bytes.NewReader(zeros), bs)
	if offs, st := scan(t, ix0, memImage{bytes.NewReader(run0)}, 0.03); st.sampled || st.found != blocks/2 || offs[0] != 7 {
		t.Fatalf("half zeros, one zero block in the running image: %+v", st)
	}
	// 3 % of the new image (blocks 1000 to 1245) is in the running image
	// at blocks 5000 to 5245.
	const at, from, n = 1000, 5000, blocks * 3 / 100
	copy(fresh[at*bs:], running[from*bs:(from+n)*bs])
	ix, _ = blockindex.Build(bytes.NewReader(fresh), bs)
	offs, st := scan(t, ix, memImage{bytes.NewReader(running)}, 0.03)
	if st.sampled || st.scanned != blocks*bs || st.found != n || st.hits == 0 {
		t.Fatalf("3 %% to reuse: %+v, want every block read once and %d found", st, n)
	}
	for i, j := range offs {
		if want := int32(-1); i >= at && i < at+n {
			if j != int32(from+i-at) {
				t.Fatalf("block %d found at %d, want %d", i, j, from+i-at)
			}
		} else if j != want {
			t.Fatalf("block %d found at %d, want none", i, j)
		}
	}
}

// TestLookupTable: in memory (a small index) and in a file (a large one),
// every prefix inserted is found once noted, with the first block noted;
// a prefix inserted twice is a duplicate; an unknown one is not found.
func TestLookupTable(t *testing.T) {
	for _, blocks := range []int{100, 50000} {
		path := t.TempDir() + "/lookup"
		tb, err := newLookupTable(path, blocks)
		if err != nil {
			t.Fatal(err)
		}
		_, statErr := os.Stat(path)
		if onDisk := statErr == nil; onDisk != (blocks == 50000) {
			t.Errorf("%d blocks: table on disk %v", blocks, onDisk)
		}
		r := rand.New(rand.NewPCG(uint64(blocks), 9))
		ps := make([]uint64, blocks)
		for i := range ps {
			// Many share their low bits (the start slot): long probes.
			ps[i] = r.Uint64() &^ (1<<10 - 1)
			if dup, err := tb.insert(ps[i]); err != nil || dup {
				t.Fatalf("insert %d: dup %v, %v", i, dup, err)
			}
		}
		if dup, _ := tb.insert(ps[7]); !dup {
			t.Error("a prefix inserted twice is not a duplicate")
		}
		for i := 0; i < blocks; i += 2 {
			if ok, err := tb.note(ps[i], i+1); !ok || err != nil {
				t.Fatalf("note %d: %v %v", i, ok, err)
			}
			if ok, _ := tb.note(ps[i], 3*i); !ok {
				t.Fatalf("note %d again: the index has it", i)
			}
		}
		if ok, _ := tb.note(1, 5); ok {
			t.Error("an unknown prefix noted as the index's")
		}
		for i, p := range ps {
			want := int32(-1)
			if i%2 == 0 {
				want = int32(i + 1) // the first block noted
			}
			if got, err := tb.find(p); got != want || err != nil {
				t.Fatalf("%d blocks: find %d = %d, %v; want %d", blocks, i, got, err, want)
			}
		}
		if got, _ := tb.find(1); got != -1 {
			t.Error("an unknown prefix found")
		}
		if err := tb.close(); err != nil {
			t.Fatal(err)
		}
	}
}
