// Package blockindex is the block index of a firmware image: the image's
// size and SHA-256, a block size, and the SHA-256 of every block, in a
// compact binary file that `gwctl image index` writes next to the image and
// the agent fetches before an adaptive install (docs/adaptive-updates.md).
//
// The package owns the format only: building an index from an image,
// encoding it and parsing it strictly. It does no I/O of its own beyond the
// reader it is given, and it does not authenticate an index: the caller
// checks the index's SHA-256 against the signed manifest (or the index's
// image SHA-256 against the request) before trusting a block hash.
//
// The file is a 56-byte header and then one 32-byte SHA-256 per block, in
// image order, all integers big-endian:
//
//	offset size  field
//	0      8     magic "GWBLKIDX"
//	8      4     version (1)
//	12     4     block size in bytes (a power of two, MinBlockSize to MaxBlockSize)
//	16     8     image size in bytes
//	24     32    SHA-256 of the whole image
//	56     32·N  SHA-256 of block i (the last block may be short), N = ceil(size/blockSize)
//
// Full 32-byte hashes, not truncated ones: a block hash decides which bytes
// are written to the slot and which local block is reused, so it must stand
// up to a hostile server on its own (a truncated hash would leave the image
// SHA-256 as the only guard, and a collision would then fail the update
// instead of being refetched). The full hashes
// cost 32/4096 ≈ 0.78 % of the image at the default 4 KiB block, 0.05 % at
// 64 KiB.
package blockindex

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

// Format constants.
const (
	Magic      = "GWBLKIDX"
	Version    = 1
	HeaderSize = 56
	HashSize   = sha256.Size

	// DefaultBlockSize is what gwctl image index uses: the block of ext4
	// and most file systems. A file system image rebuilt with a few files
	// changed has its later files shifted by whole file system blocks, so
	// only index blocks of that size line up with what the device holds
	// (docs/adaptive-updates.md: 1.4 % of an ext4 image on the wire at 4
	// KiB, 41 % at 64 KiB). The price is the index (0.78 % of the image)
	// and the agent's state folder during an adaptive install (up to 84
	// bytes per block, 21 MiB per GiB; its memory does not grow with the
	// image); images that are not file systems can use
	// larger blocks.
	DefaultBlockSize = 4 << 10
	MinBlockSize     = 4 << 10
	MaxBlockSize     = 16 << 20
	// MaxBlocks bounds the hashes an index may hold (128 MiB of hashes: a
	// 16 GiB image in 4 KiB blocks), so a hostile index cannot make the
	// agent allocate without limit.
	MaxBlocks = 1 << 22
)

// Errors. Every parse error wraps ErrFormat; a block that does not match
// its hash is a *MismatchError.
var (
	ErrFormat = errors.New("blockindex: not a valid block index")
)

// Index is a parsed, built or opened block index. An opened index (Open)
// reads its hashes from its file on demand and is not safe for concurrent
// use; the others are read-only.
type Index struct {
	BlockSize   int
	ImageSize   int64
	ImageSHA256 [HashSize]byte
	blocks      int
	hashes      []byte // HashSize bytes per block, in memory (Parse, Build)

	// An opened index: the encoded index in ra, a window of its hashes
	// read in one piece for in-order access, and the first read error.
	ra       io.ReaderAt
	win      []byte
	winFirst int
	err      error
}

// Blocks is the number of blocks of the image.
func (ix *Index) Blocks() int { return ix.blocks }

// Block returns the offset and length of block i in the image.
func (ix *Index) Block(i int) (off, n int64) {
	off = int64(i) * int64(ix.BlockSize)
	return off, min(int64(ix.BlockSize), ix.ImageSize-off)
}

// Hash returns the SHA-256 of block i. An opened index reads its hashes a
// window (64 KiB) at a time, for callers that go through the blocks in
// order; HashAt suits random access. A read error makes the hash all
// zeros (which no block matches) and is kept for Err and Verify.
func (ix *Index) Hash(i int) [HashSize]byte {
	var h [HashSize]byte
	if ix.ra == nil {
		copy(h[:], ix.hashes[i*HashSize:])
		return h
	}
	if k := i - ix.winFirst; k >= 0 && (k+1)*HashSize <= len(ix.win) {
		copy(h[:], ix.win[k*HashSize:])
		return h
	}
	n := min(windowHashes, ix.blocks-i)
	if cap(ix.win) < windowHashes*HashSize {
		ix.win = make([]byte, windowHashes*HashSize)
	}
	ix.win = ix.win[:n*HashSize]
	ix.winFirst = i
	if _, err := ix.ra.ReadAt(ix.win, HeaderSize+int64(i)*HashSize); err != nil {
		ix.win = ix.win[:0]
		ix.fail(i, err)
		return h
	}
	copy(h[:], ix.win)
	return h
}

// windowHashes is how many hashes an opened index reads at once.
const windowHashes = 2048

// HashAt is Hash for random access: an opened index reads this one hash.
func (ix *Index) HashAt(i int) [HashSize]byte {
	var h [HashSize]byte
	if ix.ra == nil {
		copy(h[:], ix.hashes[i*HashSize:])
		return h
	}
	if _, err := ix.ra.ReadAt(h[:], HeaderSize+int64(i)*HashSize); err != nil {
		ix.fail(i, err)
		return [HashSize]byte{}
	}
	return h
}

func (ix *Index) fail(i int, err error) {
	if ix.err == nil {
		ix.err = fmt.Errorf("blockindex: read the hash of block %d: %w", i, err)
	}
}

// Err is the first error reading an opened index's hashes.
func (ix *Index) Err() error { return ix.err }

// ImageHex is the image SHA-256 in lowercase hex, as requests carry it.
func (ix *Index) ImageHex() string { return hex.EncodeToString(ix.ImageSHA256[:]) }

// EncodedSize is the size of the encoded index.
func (ix *Index) EncodedSize() int64 { return HeaderSize + int64(ix.blocks)*HashSize }

// MismatchError is a block whose bytes do not hash to the index's entry.
type MismatchError struct {
	Block  int
	Offset int64
	Got    [HashSize]byte
	Want   [HashSize]byte
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("block %d (bytes %d+) has SHA-256 %x, the index says %x", e.Block, e.Offset, e.Got[:8], e.Want[:8])
}

// Verify checks that data is block i as the index describes it (its length
// and its SHA-256).
func (ix *Index) Verify(i int, data []byte) error {
	off, n := ix.Block(i)
	if int64(len(data)) != n {
		return fmt.Errorf("block %d (bytes %d+) is %d bytes, the index says %d", i, off, len(data), n)
	}
	got := sha256.Sum256(data)
	want := ix.Hash(i)
	if ix.err != nil {
		return ix.err
	}
	if got != want {
		return &MismatchError{Block: i, Offset: off, Got: got, Want: want}
	}
	return nil
}

// Build reads an image to its end and returns its index.
func Build(r io.Reader, blockSize int) (*Index, error) {
	if err := checkBlockSize(blockSize); err != nil {
		return nil, err
	}
	ix := &Index{BlockSize: blockSize}
	whole := sha256.New()
	buf := make([]byte, blockSize)
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if ix.blocks >= MaxBlocks {
				return nil, fmt.Errorf("blockindex: the image has more than %d blocks of %d bytes; use a larger block size", MaxBlocks, blockSize)
			}
			whole.Write(buf[:n])
			h := sha256.Sum256(buf[:n])
			ix.hashes = append(ix.hashes, h[:]...)
			ix.blocks++
			ix.ImageSize += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	copy(ix.ImageSHA256[:], whole.Sum(nil))
	return ix, nil
}

// MarshalBinary encodes the index (not an opened one: its encoding is its
// file).
func (ix *Index) MarshalBinary() ([]byte, error) {
	if ix.ra != nil {
		return nil, errors.New("blockindex: an opened index is not encoded again")
	}
	b := make([]byte, HeaderSize, ix.EncodedSize())
	copy(b, Magic)
	binary.BigEndian.PutUint32(b[8:], Version)
	binary.BigEndian.PutUint32(b[12:], uint32(ix.BlockSize))
	binary.BigEndian.PutUint64(b[16:], uint64(ix.ImageSize))
	copy(b[24:], ix.ImageSHA256[:])
	return append(b, ix.hashes...), nil
}

// Parse decodes an encoded index. It is strict: the magic, the version, a
// block size in range, and exactly as many hashes as the image size needs
// (a truncated or padded file is refused). The index keeps b's hashes
// without copying them: b must not be changed afterwards.
func Parse(b []byte) (*Index, error) {
	ix, err := parseHeader(b, int64(len(b)))
	if err != nil {
		return nil, err
	}
	ix.hashes = b[HeaderSize:len(b):len(b)]
	return ix, nil
}

// Open reads the header of the encoded index in r, size bytes long, and
// checks it as strictly as Parse; the hashes stay in r and are read when
// asked for (Hash, HashAt), so the index costs a 64 KiB window of memory
// whatever the image size. r must not change while the index is used.
func Open(r io.ReaderAt, size int64) (*Index, error) {
	hdr := make([]byte, HeaderSize)
	if size >= HeaderSize {
		if _, err := r.ReadAt(hdr, 0); err != nil {
			return nil, fmt.Errorf("blockindex: read the header: %w", err)
		}
	}
	ix, err := parseHeader(hdr, size)
	if err != nil {
		return nil, err
	}
	ix.ra = r
	return ix, nil
}

// parseHeader checks the header in b (at least HeaderSize bytes unless
// size is smaller) of an encoded index of size bytes.
func parseHeader(b []byte, size int64) (*Index, error) {
	if size < HeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrFormat, size, HeaderSize)
	}
	if !bytes.Equal(b[:8], []byte(Magic)) {
		return nil, fmt.Errorf("%w: no %q magic", ErrFormat, Magic)
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != Version {
		return nil, fmt.Errorf("%w: version %d (this agent reads version %d)", ErrFormat, v, Version)
	}
	bs := binary.BigEndian.Uint32(b[12:])
	if err := checkBlockSize(int(bs)); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrFormat, err)
	}
	isize := binary.BigEndian.Uint64(b[16:])
	blocks := (isize + uint64(bs) - 1) / uint64(bs)
	if isize > 1<<62 || blocks > MaxBlocks {
		return nil, fmt.Errorf("%w: image size %d needs more than %d blocks", ErrFormat, isize, MaxBlocks)
	}
	if want := HeaderSize + blocks*HashSize; uint64(size) != want {
		return nil, fmt.Errorf("%w: %d bytes, but an image of %d bytes in blocks of %d needs %d (truncated or padded)", ErrFormat, size, isize, bs, want)
	}
	ix := &Index{BlockSize: int(bs), ImageSize: int64(isize), blocks: int(blocks)}
	copy(ix.ImageSHA256[:], b[24:56])
	return ix, nil
}

// MaxEncodedSize is the largest index Parse accepts.
const MaxEncodedSize = HeaderSize + MaxBlocks*HashSize

func checkBlockSize(n int) error {
	if n < MinBlockSize || n > MaxBlockSize || bits.OnesCount(uint(n)) != 1 {
		return fmt.Errorf("blockindex: block size %d is not a power of two from %d to %d", n, MinBlockSize, MaxBlockSize)
	}
	return nil
}
