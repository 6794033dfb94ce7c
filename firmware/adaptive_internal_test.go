package firmware

import (
	"bytes"
	"context"
	"slices"
	"testing"

	"github.com/gwagent/gwagent/firmware/blockindex"
)

type memImage struct{ *bytes.Reader }

func (memImage) Close() error { return nil }

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
	offs, found, scanned, err := scanRunning(context.Background(), ix, memImage{bytes.NewReader(running)})
	if err != nil {
		t.Fatal(err)
	}
	want := []int32{1, 1, 3, -1, 0, -1}
	if !slices.Equal(offs, want) || found != 4 || scanned != 4*bs {
		t.Fatalf("offsets %v (found %d, scanned %d), want %v (4 found, %d scanned)", offs, found, scanned, want, 4*bs)
	}
	// The short last block is found where it was.
	img2 := slices.Concat(block(7), block(7), block(7), block(7), []byte("tail!"))
	ix2, _ := blockindex.Build(bytes.NewReader(img2), bs)
	offs, _, _, _ = scanRunning(context.Background(), ix2, memImage{bytes.NewReader(running)})
	if want := []int32{-1, -1, -1, -1, 4}; !slices.Equal(offs, want) {
		t.Fatalf("offsets %v, want %v", offs, want)
	}
	// No running image: nothing found.
	offs, found, _, _ = scanRunning(context.Background(), ix, nil)
	if found != 0 || offs[0] != -1 {
		t.Fatalf("without a running image: %v", offs)
	}
}
