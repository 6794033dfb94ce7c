package abpart

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/uuid"

	"github.com/gwagent/gwagent/firmware"
)

const benchImage = 64 << 20

// BenchmarkSinkWrite streams a 64 MiB image into a slot file through
// Open/Write/Sync (every 4 MiB, as the state machine checkpoints)/Close.
// Compare with BenchmarkRawWrite, the same bytes written to a plain file.
func BenchmarkSinkWrite(b *testing.B) {
	dir := b.TempDir()
	slots := map[string]string{"A": filepath.Join(dir, "a"), "B": filepath.Join(dir, "b")}
	for _, p := range slots {
		if err := os.Truncate(createFile(b, p), benchImage); err != nil {
			b.Fatal(err)
		}
	}
	envPath := filepath.Join(dir, "env")
	if err := os.WriteFile(envPath, []byte("gw_slot=A\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	env := openEnvFile(b, envPath)
	inst, err := New(Config{SlotA: slots["A"], SlotB: slots["B"], SlotType: SlotTypeFile, RunningSlot: "A",
		StateDir: filepath.Join(dir, "state")}, Deps{Env: env})
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 256<<10)
	b.SetBytes(benchImage)
	for b.Loop() {
		s, err := inst.Open(context.Background(), firmware.Update{ID: uuid.NewString()}, 0)
		if err != nil {
			b.Fatal(err)
		}
		for off := 0; off < benchImage; off += len(chunk) {
			if _, err := s.Write(chunk); err != nil {
				b.Fatal(err)
			}
			if (off+len(chunk))%(4<<20) == 0 {
				if err := s.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		}
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRawWrite is the baseline: the same writes and fsyncs on an
// os.File.
func BenchmarkRawWrite(b *testing.B) {
	p := createFile(b, filepath.Join(b.TempDir(), "raw"))
	chunk := make([]byte, 256<<10)
	b.SetBytes(benchImage)
	for b.Loop() {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			b.Fatal(err)
		}
		for off := 0; off < benchImage; off += len(chunk) {
			if _, err := f.Write(chunk); err != nil {
				b.Fatal(err)
			}
			if (off+len(chunk))%(4<<20) == 0 {
				if err := f.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

func createFile(b *testing.B, p string) string {
	b.Helper()
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	f.Close()
	return p
}
