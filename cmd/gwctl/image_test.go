package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"aead.dev/minisign"

	"github.com/gwagent/gwagent/firmware/blockindex"
	"github.com/gwagent/gwagent/firmware/signature"
)

// runLocal runs a gwctl command that needs no hub.
func runLocal(t *testing.T, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	a := &app{stdout: &out, stderr: &errb, getenv: func(string) string { return "" },
		isTerminal: func() bool { return false }, loc: time.UTC}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	code := a.run(ctx, args)
	return result{out.String(), errb.String(), code}
}

// TestImageSign signs with `gwctl image sign` and checks the result with
// aead.dev/minisign's stock verification and with the minisign tool, then
// reads the metadata back as the agent does.
func TestImageSign(t *testing.T) {
	dir := t.TempDir()
	pub, priv, err := minisign.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	keyText, err := priv.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	pubText, err := pub.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "release.key")
	pubFile := filepath.Join(dir, "release.pub")
	os.WriteFile(keyFile, keyText, 0o600)
	os.WriteFile(pubFile, pubText, 0o644)
	img := bytes.Repeat([]byte("gateway firmware "), 40000)
	imgFile := filepath.Join(dir, "gw-2.1.0.img")
	os.WriteFile(imgFile, img, 0o644)

	r := runLocal(t, "image", "sign", "--key", keyFile, "--version", "2.1.0",
		"--compatible", "acme-gw-x86", "--compatible", "acme-gw-x86-v2", "--min-version", "1.4.0", imgFile)
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	sigFile := imgFile + ".minisig"
	if !strings.Contains(r.stdout, "wrote "+sigFile) {
		t.Errorf("stdout: %q", r.stdout)
	}
	sig, err := os.ReadFile(sigFile)
	if err != nil {
		t.Fatal(err)
	}

	// Stock verification: prehashed (minisign -H), the image and the
	// trusted comment both covered.
	mr := minisign.NewReader(bytes.NewReader(img))
	if _, err := io.Copy(io.Discard, mr); err != nil {
		t.Fatal(err)
	}
	if !mr.Verify(pub, sig) { // Reader.Verify accepts only the prehashed form
		t.Fatal("aead.dev/minisign does not verify the signature")
	}
	if !minisign.Verify(pub, img, sig) {
		t.Fatal("minisign.Verify rejects the signature")
	}
	if minisign.Verify(pub, append(bytes.Clone(img), 'x'), sig) {
		t.Fatal("the signature verifies another image")
	}
	var s minisign.Signature
	if err := s.UnmarshalText(sig); err != nil {
		t.Fatal(err)
	}
	if s.Algorithm != minisign.HashEdDSA {
		t.Errorf("algorithm %x, want the prehashed one", s.Algorithm)
	}
	want := `gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86","acme-gw-x86-v2"],"minVersion":"1.4.0"}`
	if s.TrustedComment != want {
		t.Errorf("trusted comment %q\nwant %q", s.TrustedComment, want)
	}
	m, ok, err := signature.ParseManifest(s.TrustedComment)
	if !ok || err != nil || m.Version != "2.1.0" || m.MinVersion != "1.4.0" || len(m.Compatible) != 2 || m.AllowDowngrade {
		t.Fatalf("ParseManifest = %+v, %v, %v", m, ok, err)
	}
	// An altered comment no longer verifies.
	altered := bytes.Replace(sig, []byte(`"2.1.0"`), []byte(`"9.1.0"`), 1)
	if minisign.Verify(pub, img, altered) {
		t.Fatal("a signature with an altered trusted comment verifies")
	}

	t.Run("minisign tool verifies it", func(t *testing.T) {
		if _, err := exec.LookPath("minisign"); err != nil {
			t.Fatalf("the minisign tool is required (apt-get install minisign): %v", err)
		}
		out, err := exec.Command("minisign", "-V", "-p", pubFile, "-m", imgFile, "-x", sigFile).CombinedOutput()
		if err != nil || !strings.Contains(string(out), want) {
			t.Fatalf("minisign -V: %v\n%s", err, out)
		}
	})

	t.Run("show", func(t *testing.T) {
		r := runLocal(t, "image", "show", "--key", pubFile, sigFile)
		if r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		for _, w := range []string{"key ID:          " + signature.FormatKeyID(pub.ID()), "authenticated:   yes", "version:         2.1.0",
			"compatible:      acme-gw-x86 acme-gw-x86-v2", "min version:     1.4.0", "allow downgrade: false"} {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("show output lacks %q:\n%s", w, r.stdout)
			}
		}
		alteredFile := filepath.Join(dir, "altered.minisig")
		os.WriteFile(alteredFile, altered, 0o644)
		r = runLocal(t, "image", "show", "--key", pubFile, alteredFile)
		if r.code != 1 || !strings.Contains(r.stderr, "trusted comment was altered") {
			t.Fatalf("show altered: exit %d, %q", r.code, r.stderr)
		}
		r = runLocal(t, "-o", "json", "image", "show", sigFile)
		var got struct {
			Authenticated bool
			Manifest      signature.Manifest
		}
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &got) != nil || got.Authenticated || got.Manifest.Version != "2.1.0" {
			t.Fatalf("show json: exit %d, %q %q", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("allow downgrade and a plain signature", func(t *testing.T) {
		out := filepath.Join(dir, "down.minisig")
		r := runLocal(t, "image", "sign", "--key", keyFile, "--version", "1.9.0", "--compatible", "acme-gw-x86", "--allow-downgrade", "--signature-file", out, imgFile)
		if r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		sig, _ := os.ReadFile(out)
		if !minisign.Verify(pub, img, sig) || !strings.Contains(string(sig), `"allowDowngrade":true`) {
			t.Fatalf("downgrade signature:\n%s", sig)
		}
		plain := filepath.Join(dir, "plain.minisig")
		if r := runLocal(t, "image", "sign", "--key", keyFile, "--signature-file", plain, imgFile); r.code != 0 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		sig, _ = os.ReadFile(plain)
		if !minisign.Verify(pub, img, sig) || !strings.Contains(string(sig), "trusted comment: timestamp:") || strings.Contains(string(sig), signature.ManifestPrefix) {
			t.Fatalf("plain signature:\n%s", sig)
		}
	})

	t.Run("encrypted key without a password", func(t *testing.T) {
		// Only the refusal: decrypting runs scrypt with 1 GiB (libsodium's
		// "sensitive" limits, as minisign -G uses), far too slow for a
		// unit test; the decryption itself is aead.dev/minisign's.
		enc := filepath.Join(dir, "enc.key")
		// The key header says "encrypted" (kdf "Sc"); IsEncrypted needs no more.
		raw := make([]byte, 158)
		raw[0], raw[1], raw[2], raw[3], raw[4], raw[5] = 'E', 'd', 'S', 'c', 'B', '2'
		os.WriteFile(enc, []byte("untrusted comment: minisign encrypted secret key\n"+base64.StdEncoding.EncodeToString(raw)+"\n"), 0o600)
		r := runLocal(t, "image", "sign", "--key", enc, "--signature-file", filepath.Join(dir, "enc.minisig"), imgFile)
		if r.code != exitUsage || !strings.Contains(r.stderr, "is encrypted: give --password-file") {
			t.Fatalf("no password: exit %d, %q", r.code, r.stderr)
		}
	})

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no key", []string{"image", "sign", imgFile}, "--key is required"},
		{"version without compatible", []string{"image", "sign", "--key", keyFile, "--version", "2.1.0", imgFile}, "needs both --version and at least one --compatible"},
		{"compatible without version", []string{"image", "sign", "--key", keyFile, "--compatible", "a", imgFile}, "needs both --version"},
		{"not a semantic version", []string{"image", "sign", "--key", keyFile, "--version", "build-7", "--compatible", "a", imgFile}, `version "build-7" is not a semantic version`},
		{"blank in device type", []string{"image", "sign", "--key", keyFile, "--version", "2.1.0", "--compatible", "acme gw", imgFile}, "without blanks"},
		{"public key given as key", []string{"image", "sign", "--key", pubFile, imgFile}, "is not a minisign secret key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runLocal(t, tc.args...)
			if r.code != exitUsage || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want %d containing %q", r.code, r.stderr, exitUsage, tc.want)
			}
		})
	}
}

// TestImageIndex writes a block index with gwctl image index, signs the
// image with it and reads the index hash back from the signed metadata; an
// index of another image is refused.
func TestImageIndex(t *testing.T) {
	dir := t.TempDir()
	_, priv, err := minisign.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	keyText, _ := priv.MarshalText()
	keyFile := filepath.Join(dir, "release.key")
	os.WriteFile(keyFile, keyText, 0o600)
	img := bytes.Repeat([]byte("gateway firmware "), 40000) // 680000 bytes: 167 blocks of 4 KiB
	imgFile := filepath.Join(dir, "gw-2.1.0.img")
	os.WriteFile(imgFile, img, 0o644)

	r := runLocal(t, "image", "index", imgFile)
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	idxFile := imgFile + ".bidx"
	idx, err := os.ReadFile(idxFile)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := blockindex.Parse(idx)
	if err != nil {
		t.Fatal(err)
	}
	if ix.ImageSize != int64(len(img)) || ix.Blocks() != 167 || ix.ImageSHA256 != sha256.Sum256(img) {
		t.Fatalf("index: %d bytes, %d blocks", ix.ImageSize, ix.Blocks())
	}
	if !strings.Contains(r.stdout, "167 blocks of 4096 bytes") {
		t.Errorf("stdout: %q", r.stdout)
	}

	r = runLocal(t, "image", "sign", "--key", keyFile, "--version", "2.1.0", "--compatible", "acme-gw-x86", "--index", idxFile, imgFile)
	if r.code != 0 {
		t.Fatalf("sign --index: exit %d: %s", r.code, r.stderr)
	}
	sig, _ := os.ReadFile(imgFile + ".minisig")
	s, err := signature.ParseSignature(sig)
	if err != nil {
		t.Fatal(err)
	}
	m, ok, err := signature.ParseManifest(s.TrustedComment)
	sum := sha256.Sum256(idx)
	if !ok || err != nil || m.IndexSHA256 != hex.EncodeToString(sum[:]) || m.IndexSize != int64(len(idx)) {
		t.Fatalf("manifest %+v, %v, %v; want the index's sha256 and size", m, ok, err)
	}
	r = runLocal(t, "image", "show", imgFile+".minisig")
	if !strings.Contains(r.stdout, "block index:     "+strconv.Itoa(len(idx))+" bytes, sha256 "+m.IndexSHA256) {
		t.Errorf("show: %q", r.stdout)
	}

	other := filepath.Join(dir, "other.img")
	os.WriteFile(other, append(bytes.Clone(img), 'x'), 0o644)
	r = runLocal(t, "image", "sign", "--key", keyFile, "--version", "2.1.0", "--compatible", "acme-gw-x86", "--index", idxFile, other)
	if r.code == 0 || !strings.Contains(r.stderr, "describes another image") {
		t.Fatalf("signing another image with this index: exit %d: %s", r.code, r.stderr)
	}
	r = runLocal(t, "image", "sign", "--key", keyFile, "--index", idxFile, imgFile)
	if r.code == 0 || !strings.Contains(r.stderr, "--index needs") {
		t.Fatalf("--index without metadata: exit %d: %s", r.code, r.stderr)
	}
	r = runLocal(t, "image", "index", "--block-size", "5000", imgFile)
	if r.code == 0 || !strings.Contains(r.stderr, "power of two") {
		t.Fatalf("--block-size 5000: exit %d: %s", r.code, r.stderr)
	}
}
