package signature

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// toolTimeout bounds every minisign invocation; generous for a loaded machine.
const toolTimeout = 60 * time.Second

// minisignPath finds the real minisign tool. It is a declared test
// dependency: a missing tool fails the test rather than skipping it.
func minisignPath(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("minisign")
	if err != nil {
		t.Fatalf("the minisign tool is required (apt-get install minisign): %v", err)
	}
	return p
}

// runMinisign runs the tool with stdin closed (no password prompts: keys are
// generated with -W) and returns its combined output and error.
func runMinisign(t testing.TB, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, minisignPath(t), args...)
	cmd.Stdin = nil
	return cmd.CombinedOutput()
}

type testKey struct {
	pub, sec string // file paths
	id       string // key ID as printed by the tool in the .pub comment
}

// genKey creates a password-less key pair with the real tool: the public key
// into keyDir/name.pub, the secret key into its own temporary folder.
func genKey(t testing.TB, keyDir, name string) testKey {
	t.Helper()
	k := testKey{pub: filepath.Join(keyDir, name+".pub"), sec: filepath.Join(t.TempDir(), name+".key")}
	if out, err := runMinisign(t, "-G", "-W", "-p", k.pub, "-s", k.sec); err != nil {
		t.Fatalf("minisign -G: %v\n%s", err, out)
	}
	b, err := os.ReadFile(k.pub)
	if err != nil {
		t.Fatal(err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	const prefix = "untrusted comment: minisign public key "
	if !strings.HasPrefix(first, prefix) {
		t.Fatalf("unexpected .pub comment %q", first)
	}
	k.id = strings.TrimSpace(strings.TrimPrefix(first, prefix))
	return k
}

// sign signs file with the real tool (prehashed by default, legacy with -l)
// and returns the .minisig contents.
func sign(t testing.TB, k testKey, file string, legacy bool, comment string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(file)+".minisig")
	args := []string{"-S", "-s", k.sec, "-m", file, "-x", out, "-t", comment}
	if legacy {
		args = append(args, "-l")
	}
	if o, err := runMinisign(t, args...); err != nil {
		t.Fatalf("minisign -S: %v\n%s", err, o)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// toolVerifies asks the real tool for its verdict on (file, sig, key).
func toolVerifies(t testing.TB, k testKey, file string, sig []byte) bool {
	t.Helper()
	sf := filepath.Join(t.TempDir(), "check.minisig")
	if err := os.WriteFile(sf, sig, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := runMinisign(t, "-V", "-q", "-p", k.pub, "-m", file, "-x", sf)
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("minisign -V did not run: %v", err)
		}
		return false
	}
	return true
}

// imageBytes is deterministic pseudo-random content (seeded per test).
func imageBytes(size int, seed uint64) []byte {
	b := make([]byte, size)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 7})
	_, _ = r.Read(b)
	return b
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// feed writes data into w in irregular chunks, as a network download does.
func feed(t testing.TB, v *Verifier, data []byte) {
	t.Helper()
	sizes := []int{1, 7, 4096, 65536, 3, 100000}
	for i := 0; len(data) > 0; i++ {
		n := min(sizes[i%len(sizes)], len(data))
		if w, err := v.Write(data[:n]); err != nil || w != n {
			t.Fatalf("Write = %d, %v", w, err)
		}
		data = data[n:]
	}
}

func mustLoad(t testing.TB, dir string) *KeyRing {
	t.Helper()
	r, err := LoadKeys(dir)
	if err != nil {
		t.Fatalf("LoadKeys: %v", err)
	}
	return r
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x01
	return c
}
