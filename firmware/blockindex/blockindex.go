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
	// and the agent's memory during an adaptive install (about 44 bytes per
	// block, 11 MiB per GiB); images that are not file systems can use
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

// Index is a parsed or built block index.
type Index struct {
	BlockSize   int
	ImageSize   int64
	ImageSHA256 [HashSize]byte
	hashes      []byte // HashSize bytes per block
}

// Blocks is the number of blocks of the image.
func (ix *Index) Blocks() int { return len(ix.hashes) / HashSize }

// Block returns the offset and length of block i in the image.
func (ix *Index) Block(i int) (off, n int64) {
	off = int64(i) * int64(ix.BlockSize)
	return off, min(int64(ix.BlockSize), ix.ImageSize-off)
}

// Hash returns the SHA-256 of block i.
func (ix *Index) Hash(i int) [HashSize]byte {
	var h [HashSize]byte
	copy(h[:], ix.hashes[i*HashSize:])
	return h
}

// ImageHex is the image SHA-256 in lowercase hex, as requests carry it.
func (ix *Index) ImageHex() string { return hex.EncodeToString(ix.ImageSHA256[:]) }

// EncodedSize is the size of the encoded index.
func (ix *Index) EncodedSize() int64 { return HeaderSize + int64(len(ix.hashes)) }

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
	if want := ix.Hash(i); got != want {
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
			if ix.Blocks() >= MaxBlocks {
				return nil, fmt.Errorf("blockindex: the image has more than %d blocks of %d bytes; use a larger block size", MaxBlocks, blockSize)
			}
			whole.Write(buf[:n])
			h := sha256.Sum256(buf[:n])
			ix.hashes = append(ix.hashes, h[:]...)
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

// MarshalBinary encodes the index.
func (ix *Index) MarshalBinary() ([]byte, error) {
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
	if len(b) < HeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrFormat, len(b), HeaderSize)
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
	size := binary.BigEndian.Uint64(b[16:])
	blocks := (size + uint64(bs) - 1) / uint64(bs)
	if size > 1<<62 || blocks > MaxBlocks {
		return nil, fmt.Errorf("%w: image size %d needs more than %d blocks", ErrFormat, size, MaxBlocks)
	}
	if want := HeaderSize + blocks*HashSize; uint64(len(b)) != want {
		return nil, fmt.Errorf("%w: %d bytes, but an image of %d bytes in blocks of %d needs %d (truncated or padded)", ErrFormat, len(b), size, bs, want)
	}
	ix := &Index{BlockSize: int(bs), ImageSize: int64(size), hashes: b[HeaderSize:len(b):len(b)]}
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
