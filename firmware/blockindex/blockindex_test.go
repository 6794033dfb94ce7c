package blockindex_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/gwagent/gwagent/firmware/blockindex"
)

func image(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestBuildParseRoundTrip(t *testing.T) {
	for _, size := range []int{0, 1, 4096, 4097, 3*65536 + 100} {
		img := image(size, uint64(size))
		ix, err := blockindex.Build(bytes.NewReader(img), 4096)
		if err != nil {
			t.Fatal(err)
		}
		if ix.ImageSize != int64(size) || ix.ImageSHA256 != sha256.Sum256(img) {
			t.Fatalf("size %d: index says %d bytes, sha %x", size, ix.ImageSize, ix.ImageSHA256)
		}
		enc, _ := ix.MarshalBinary()
		if int64(len(enc)) != ix.EncodedSize() {
			t.Fatalf("encoded %d bytes, EncodedSize %d", len(enc), ix.EncodedSize())
		}
		got, err := blockindex.Parse(enc)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if got.Blocks() != (size+4095)/4096 || got.ImageHex() != ix.ImageHex() {
			t.Fatalf("size %d: parsed %d blocks", size, got.Blocks())
		}
		for i := range got.Blocks() {
			off, n := got.Block(i)
			if err := got.Verify(i, img[off:off+n]); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestVerifyNamesTheBlock(t *testing.T) {
	img := image(5*4096, 7)
	ix, _ := blockindex.Build(bytes.NewReader(img), 4096)
	bad := bytes.Clone(img[2*4096 : 3*4096])
	bad[10] ^= 1
	err := ix.Verify(2, bad)
	var me *blockindex.MismatchError
	if !errors.As(err, &me) || me.Block != 2 || me.Offset != 8192 {
		t.Fatalf("Verify(corrupt block 2) = %v, want a MismatchError naming block 2", err)
	}
	if err := ix.Verify(2, img[2*4096:3*4096-1]); err == nil {
		t.Fatal("a short block verified")
	}
}

func TestParseRejects(t *testing.T) {
	img := image(3*4096+5, 3)
	ix, _ := blockindex.Build(bytes.NewReader(img), 4096)
	good, _ := ix.MarshalBinary()
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := map[string][]byte{
		"empty":         nil,
		"header only":   good[:blockindex.HeaderSize],
		"truncated":     good[:len(good)-1],
		"padded":        append(bytes.Clone(good), 0),
		"bad magic":     mut(func(b []byte) []byte { b[0] = 'X'; return b }),
		"version 2":     mut(func(b []byte) []byte { b[11] = 2; return b }),
		"block size 3":  mut(func(b []byte) []byte { b[12], b[13], b[14], b[15] = 0, 0, 0, 3; return b }),
		"block size 5K": mut(func(b []byte) []byte { b[12], b[13], b[14], b[15] = 0, 0, 0x14, 0; return b }),
		"larger image":  mut(func(b []byte) []byte { b[22] += 0x10; return b }),
		"too many":      mut(func(b []byte) []byte { b[16] = 0x10; return b }),
	}
	for name, b := range cases {
		if _, err := blockindex.Parse(b); !errors.Is(err, blockindex.ErrFormat) {
			t.Errorf("%s: Parse = %v, want ErrFormat", name, err)
		}
	}
}

// TestIndexSize measures the index as a fraction of the image: the figure
// docs/adaptive-updates.md quotes.
func TestIndexSize(t *testing.T) {
	const size = 64 << 20
	for _, bs := range []int{4 << 10, blockindex.DefaultBlockSize} {
		ix, err := blockindex.Build(bytes.NewReader(make([]byte, size)), bs)
		if err != nil {
			t.Fatal(err)
		}
		ratio := float64(ix.EncodedSize()) / size
		t.Logf("block size %d: index %d bytes = %.4f %% of a %d MiB image", bs, ix.EncodedSize(), ratio*100, size>>20)
		if want := 32.0/float64(bs) + 0.0001; ratio > want {
			t.Errorf("block size %d: index is %.5f of the image, want at most %.5f", bs, ratio, want)
		}
	}
}

func TestBuildRejectsBlockSize(t *testing.T) {
	for _, bs := range []int{0, 1024, 4096 + 1, 32 << 20} {
		if _, err := blockindex.Build(bytes.NewReader(nil), bs); err == nil {
			t.Errorf("Build with block size %d succeeded", bs)
		}
	}
}

func FuzzParse(f *testing.F) {
	ix, _ := blockindex.Build(bytes.NewReader(image(9000, 1)), 4096)
	good, _ := ix.MarshalBinary()
	f.Add(good)
	f.Add(good[:60])
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := blockindex.Parse(b)
		if err != nil {
			return
		}
		enc, _ := ix.MarshalBinary()
		if !bytes.Equal(enc, b) {
			t.Fatal("a parsed index does not encode to the same bytes")
		}
	})
}

// An index opened from a file reads the same hashes as the parsed one, in
// order (Hash, across windows) and at random (HashAt), and is as strict
// about truncated and padded files.
func TestOpenReadsHashesFromTheFile(t *testing.T) {
	img := image(5000*4096+10, 3)
	ix, err := blockindex.Build(bytes.NewReader(img), 4096)
	if err != nil {
		t.Fatal(err)
	}
	enc, _ := ix.MarshalBinary()
	path := filepath.Join(t.TempDir(), "ix")
	if err := os.WriteFile(path, enc, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := blockindex.Open(f, int64(len(enc)))
	if err != nil {
		t.Fatal(err)
	}
	if got.Blocks() != ix.Blocks() || got.ImageSHA256 != ix.ImageSHA256 || got.BlockSize != 4096 || got.EncodedSize() != int64(len(enc)) {
		t.Fatalf("opened %d blocks, built %d", got.Blocks(), ix.Blocks())
	}
	for _, i := range []int{4000, 17, 0, 4999, 2048, 2047} {
		if got.HashAt(i) != ix.Hash(i) {
			t.Fatalf("HashAt(%d) differs", i)
		}
	}
	for i := 1000; i < got.Blocks(); i++ { // from the middle, across windows
		off, n := got.Block(i)
		if err := got.Verify(i, img[off:off+n]); err != nil {
			t.Fatal(err)
		}
	}
	if got.Err() != nil {
		t.Fatal(got.Err())
	}
	for _, size := range []int64{int64(len(enc)) - 1, 10} {
		if _, err := blockindex.Open(f, size); !errors.Is(err, blockindex.ErrFormat) {
			t.Errorf("Open of %d of %d bytes: %v, want ErrFormat", size, len(enc), err)
		}
	}
	// A file that shrinks under the index: the read error is kept.
	if err := os.Truncate(path, 100); err != nil {
		t.Fatal(err)
	}
	if err := got.Verify(10, img[10*4096:11*4096]); err == nil || got.Err() == nil {
		t.Fatalf("Verify after the file was truncated: %v", err)
	}
}
