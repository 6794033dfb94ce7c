package signature

import (
	"crypto/sha256"
	"testing"
)

// BenchmarkStream64MiB measures verification throughput over a 64 MiB stream
// fed in 1 MiB writes, next to a plain SHA-256 of the same bytes in the same
// run (what the download path computes anyway), so the ratio is meaningful
// on any machine.
func BenchmarkStream64MiB(b *testing.B) {
	const total, chunk = 64 << 20, 1 << 20
	buf := imageBytes(chunk, 9)
	keyDir := b.TempDir()
	k := genKey(b, keyDir, "bench")
	ring := mustLoad(b, keyDir)
	file := writeFile(b, b.TempDir(), "img", buf)
	legacySig := sign(b, k, file, true, "bench")

	stream := func(b *testing.B, w func([]byte)) {
		b.SetBytes(total)
		b.ReportAllocs()
		for b.Loop() {
			for range total / chunk {
				w(buf)
			}
		}
	}
	b.Run("sha256-running", func(b *testing.B) {
		h := sha256.New()
		stream(b, func(p []byte) { h.Write(p) })
	})
	b.Run("prehashed-blake2b", func(b *testing.B) {
		v := ring.NewVerifier()
		stream(b, func(p []byte) { _, _ = v.Write(p) })
	})
	b.Run("legacy-sha512", func(b *testing.B) {
		v, err := ring.NewVerifierFor(legacySig)
		if err != nil {
			b.Fatal(err)
		}
		stream(b, func(p []byte) { _, _ = v.Write(p) })
	})
}
