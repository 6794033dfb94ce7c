package signature

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"aead.dev/minisign"
)

// verifyMode is how a test hands the signature to the package.
type verifyMode int

const (
	atEnd   verifyMode = iota // NewVerifier + Verify(sig)
	upFront                   // NewVerifierFor(sig) + Verify(nil)
	oneShot                   // KeyRing.Verify(reader, sig)
)

func (m verifyMode) String() string { return [...]string{"atEnd", "upFront", "oneShot"}[m] }

// check runs one verification the way mode says and returns the outcome.
func check(t *testing.T, ring *KeyRing, mode verifyMode, data, sig []byte) (Info, error) {
	t.Helper()
	switch mode {
	case atEnd:
		v := ring.NewVerifier()
		feed(t, v, data)
		if err := v.Verify(sig); err != nil {
			return Info{}, err
		}
		info, ok := v.Verified()
		if !ok {
			t.Fatal("Verify succeeded but Verified reports nothing")
		}
		return info, nil
	case upFront:
		v, err := ring.NewVerifierFor(sig)
		if err != nil {
			return Info{}, err
		}
		feed(t, v, data)
		if err := v.Verify(nil); err != nil {
			return Info{}, err
		}
		info, _ := v.Verified()
		return info, nil
	default:
		return ring.Verify(bytes.NewReader(data), sig)
	}
}

func TestVerifyWithRealMinisign(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "release")
	ring := mustLoad(t, keyDir)
	imgDir := t.TempDir()

	for _, size := range []int{0, 1, 64, 100_003, 3<<20 + 17} {
		data := imageBytes(size, uint64(size))
		file := writeFile(t, imgDir, "img", data)
		for _, legacy := range []bool{false, true} {
			comment := "gwagent firmware 2.1 size " + strings.Repeat("x", size%5)
			sig := sign(t, k, file, legacy, comment)
			if !toolVerifies(t, k, file, sig) {
				t.Fatalf("minisign -V rejects its own signature (size %d legacy %v)", size, legacy)
			}
			parsed, err := ParseSignature(sig)
			if err != nil || parsed.Legacy != legacy {
				t.Fatalf("ParseSignature: %+v, %v (want legacy %v)", parsed, err, legacy)
			}
			for _, mode := range []verifyMode{atEnd, upFront, oneShot} {
				name := "size=" + strconv.Itoa(size) + "/legacy=" + map[bool]string{true: "yes", false: "no"}[legacy] + "/" + mode.String()
				t.Run(name, func(t *testing.T) {
					info, err := check(t, ring, mode, data, sig)
					if legacy && mode == atEnd {
						if !errors.Is(err, ErrLegacy) || !strings.Contains(err.Error(), "re-sign with minisign -H or minisign ≥ 0.10") {
							t.Fatalf("legacy signature at end: got %v, want ErrLegacy", err)
						}
						return
					}
					if err != nil {
						t.Fatalf("verify: %v", err)
					}
					want := Info{KeyID: parsed.KeyID, KeyFile: k.pub, TrustedComment: comment, Legacy: legacy, Bytes: int64(size)}
					if info != want {
						t.Fatalf("info = %+v, want %+v", info, want)
					}
					if FormatKeyID(info.KeyID) != k.id {
						t.Fatalf("key ID %s, the tool printed %s", FormatKeyID(info.KeyID), k.id)
					}
				})
			}
		}
	}
}

func TestTamperedImageFails(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "release")
	ring := mustLoad(t, keyDir)
	data := imageBytes(300_000, 1)
	file := writeFile(t, t.TempDir(), "img", data)
	for _, legacy := range []bool{false, true} {
		sig := sign(t, k, file, legacy, "c")
		cases := []struct {
			name string
			data []byte
		}{
			{"first byte flipped", flip(data, 0)},
			{"middle byte flipped", flip(data, len(data)/2)},
			{"last byte flipped", flip(data, len(data)-1)},
			{"truncated by one byte", data[:len(data)-1]},
			{"one byte appended", append(bytes.Clone(data), 0)},
			{"empty", nil},
		}
		for _, tc := range cases {
			// The real tool must agree that the case is bad, so the test
			// cannot pass on a case that is not actually tampered.
			bad := writeFile(t, t.TempDir(), "bad", tc.data)
			if toolVerifies(t, k, bad, sig) {
				t.Fatalf("%s: minisign -V accepts it", tc.name)
			}
			for _, mode := range []verifyMode{atEnd, upFront, oneShot} {
				if legacy && mode == atEnd {
					continue // refused as legacy before any comparison (covered above)
				}
				_, err := check(t, ring, mode, tc.data, sig)
				if !errors.Is(err, ErrBadSignature) || !strings.Contains(err.Error(), "does not match") {
					t.Errorf("legacy=%v %s %s: got %v, want ErrBadSignature (image mismatch)", legacy, mode, tc.name, err)
				}
			}
		}
	}
}

func TestWrongKey(t *testing.T) {
	trusted := t.TempDir()
	a := genKey(t, trusted, "a")
	b := genKey(t, t.TempDir(), "b") // not in the trusted folder
	ring := mustLoad(t, trusted)
	data := imageBytes(10_000, 2)
	file := writeFile(t, t.TempDir(), "img", data)
	sigB := sign(t, b, file, false, "by b")

	for _, mode := range []verifyMode{atEnd, upFront, oneShot} {
		_, err := check(t, ring, mode, data, sigB)
		if !errors.Is(err, ErrUnknownKey) {
			t.Fatalf("%s: got %v, want ErrUnknownKey", mode, err)
		}
		msg := err.Error()
		if !strings.Contains(msg, "signed by unknown key ID "+b.id) || !strings.Contains(msg, a.id) || !strings.Contains(msg, trusted) {
			t.Fatalf("%s: message %q should name the signing key %s, the trusted key %s and the folder", mode, msg, b.id, a.id)
		}
	}

	// A signature by b that claims a's key ID must fail as a bad signature:
	// the key ID is only a hint.
	var s minisign.Signature
	if err := s.UnmarshalText(sigB); err != nil {
		t.Fatal(err)
	}
	pa, err := minisign.PublicKeyFromFile(a.pub)
	if err != nil {
		t.Fatal(err)
	}
	s.KeyID = pa.ID()
	forged, err := s.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	if toolVerifies(t, a, file, forged) {
		t.Fatal("minisign -V accepts the forged key ID")
	}
	for _, mode := range []verifyMode{atEnd, upFront, oneShot} {
		if _, err := check(t, ring, mode, data, forged); !errors.Is(err, ErrBadSignature) {
			t.Fatalf("%s forged key ID: got %v, want ErrBadSignature", mode, err)
		}
	}
}

func TestKeyRotation(t *testing.T) {
	keyDir := t.TempDir()
	oldKey := genKey(t, keyDir, "2025")
	newKey := genKey(t, keyDir, "2026")
	if err := os.WriteFile(filepath.Join(keyDir, "README"), []byte("keys trusted for firmware\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(keyDir, "archive.pub"), 0o700); err != nil { // a folder, ignored
		t.Fatal(err)
	}
	data := imageBytes(50_000, 3)
	file := writeFile(t, t.TempDir(), "img", data)
	sigOld := sign(t, oldKey, file, false, "old")
	sigNew := sign(t, newKey, file, false, "new")

	ring := mustLoad(t, keyDir)
	if ring.Len() != 2 {
		t.Fatalf("ring has %d keys, want 2", ring.Len())
	}
	for _, tc := range []struct {
		sig  []byte
		key  testKey
		note string
	}{{sigOld, oldKey, "old"}, {sigNew, newKey, "new"}} {
		info, err := check(t, ring, atEnd, data, tc.sig)
		if err != nil {
			t.Fatalf("%s key with both trusted: %v", tc.note, err)
		}
		if info.KeyFile != tc.key.pub || info.TrustedComment != tc.note {
			t.Fatalf("%s key: info %+v", tc.note, info)
		}
	}

	// Retire the old key: its signatures become unknown-key failures, the
	// new key keeps working. The Policy reloads the folder per call.
	if err := os.Remove(oldKey.pub); err != nil {
		t.Fatal(err)
	}
	p := Policy{KeyDir: keyDir}
	v, err := p.NewVerifier()
	if err != nil {
		t.Fatal(err)
	}
	feed(t, v, data)
	if _, err := p.Check(v, sigOld); !errors.Is(err, ErrUnknownKey) || !strings.Contains(err.Error(), oldKey.id) {
		t.Fatalf("retired key: got %v, want ErrUnknownKey naming %s", err, oldKey.id)
	}
	if info, err := p.Check(v, sigNew); err != nil || info.KeyFile != newKey.pub {
		t.Fatalf("remaining key: %+v, %v", info, err)
	}
	// The ring loaded before the removal is immutable: it still trusts both.
	if _, err := check(t, ring, atEnd, data, sigOld); err != nil {
		t.Fatalf("earlier ring changed under its user: %v", err)
	}
}

func TestLoadKeysErrors(t *testing.T) {
	src := t.TempDir()
	good := genKey(t, src, "good")
	goodText, err := os.ReadFile(good.pub)
	if err != nil {
		t.Fatal(err)
	}
	secText, err := os.ReadFile(good.sec)
	if err != nil {
		t.Fatal(err)
	}
	other := genKey(t, src, "other")
	otherText, _ := os.ReadFile(other.pub)
	// A different key carrying good's key ID: bytes 2..10 of the key blob.
	sameID := func() []byte {
		var pg, po minisign.PublicKey
		if err := pg.UnmarshalText(goodText); err != nil {
			t.Fatal(err)
		}
		if err := po.UnmarshalText(otherText); err != nil {
			t.Fatal(err)
		}
		raw := decodeB64(t, po.String())
		rawGood := decodeB64(t, pg.String())
		copy(raw[2:10], rawGood[2:10])
		return []byte("untrusted comment: clash\n" + encodeB64(raw) + "\n")
	}()

	lines := strings.Split(strings.TrimSpace(string(goodText)), "\n")
	cases := []struct {
		name    string
		files   map[string][]byte
		want    error
		wantMsg string // substring; the bad file's name is always checked when set
		badFile string
	}{
		{"empty folder", map[string][]byte{"README": []byte("x")}, ErrNoKeys, "no public keys", ""},
		{"garbage", map[string][]byte{"k.pub": []byte("untrusted comment: x\nnot base64 at all!!\n")}, ErrBadKey, "invalid public key", "k.pub"},
		{"truncated key", map[string][]byte{"k.pub": []byte(lines[0] + "\n" + lines[1][:30] + "\n")}, ErrBadKey, "", "k.pub"},
		{"empty file", map[string][]byte{"k.pub": nil}, ErrBadKey, "", "k.pub"},
		{"secret key as .pub", map[string][]byte{"k.pub": secText}, ErrBadKey, "SECRET key", "k.pub"},
		{"oversized", map[string][]byte{"k.pub": bytes.Repeat([]byte("A"), 5000)}, ErrBadKey, "larger than", "k.pub"},
		{"one bad among good", map[string][]byte{"a.pub": goodText, "b.pub": []byte("RWQ")}, ErrBadKey, "", "b.pub"},
		{"two keys one ID", map[string][]byte{"a.pub": goodText, "b.pub": sameID}, ErrBadKey, "also used by a different key", "b.pub"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for n, b := range tc.files {
				writeFile(t, dir, n, b)
			}
			_, err := LoadKeys(dir)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if tc.wantMsg != "" && !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("message %q lacks %q", err, tc.wantMsg)
			}
			if tc.badFile != "" && !strings.Contains(err.Error(), filepath.Join(dir, tc.badFile)) {
				t.Fatalf("message %q does not name %s", err, tc.badFile)
			}
		})
	}

	t.Run("missing folder", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "nope")
		_, err := LoadKeys(dir)
		if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), dir) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("same key twice and bare key line", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, dir, "a.pub", goodText)
		writeFile(t, dir, "copy.pub", goodText)
		writeFile(t, dir, "bare.pub", []byte(lines[1]+"\r\n"))
		writeFile(t, dir, "o.pub", otherText)
		r := mustLoad(t, dir)
		if r.Len() != 2 {
			t.Fatalf("Len = %d, want 2 distinct keys", r.Len())
		}
		ids := map[string]bool{}
		for _, k := range r.Keys() {
			ids[FormatKeyID(k.ID)] = true
		}
		if !ids[good.id] || !ids[other.id] {
			t.Fatalf("keys %v, want %s and %s", ids, good.id, other.id)
		}
	})
	t.Run("symlinked key", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Symlink(good.pub, filepath.Join(dir, "linked.pub")); err != nil {
			t.Fatal(err)
		}
		if r := mustLoad(t, dir); r.Len() != 1 {
			t.Fatalf("Len = %d", r.Len())
		}
	})
}

func TestCorruptSignature(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "k")
	ring := mustLoad(t, keyDir)
	data := imageBytes(20_000, 4)
	file := writeFile(t, t.TempDir(), "img", data)
	sig := sign(t, k, file, false, "release 3.0")
	lines := strings.SplitAfter(string(sig), "\n") // 4 lines + ""

	var s minisign.Signature
	if err := s.UnmarshalText(sig); err != nil {
		t.Fatal(err)
	}
	badAlg := s
	badAlg.Algorithm = 0x4242
	raw := decodeB64(t, strings.TrimSpace(lines[1]))
	raw[0], raw[1] = 0x42, 0x42
	badAlgText := lines[0] + encodeB64(raw) + "\n" + lines[2] + lines[3]

	malformed := []struct{ name, text string }{
		{"empty", ""},
		{"blank", " \n\n"},
		{"garbage", "hello world\n"},
		{"public key instead", "untrusted comment: minisign public key 1\nRWQ5reacVgIuCwNZIWDP8HfUBvJ0fOlf4LKIqT9f9JdnfJ54mkk/0O1L\n"},
		{"missing trusted comment line", lines[0] + lines[1] + lines[3]},
		{"trusted comment prefix broken", lines[0] + lines[1] + "trusted: x\n" + lines[3]},
		{"bad base64", lines[0] + "!!!!" + lines[1][4:] + lines[2] + lines[3]},
		{"signature too short", lines[0] + lines[1][:40] + "\n" + lines[2] + lines[3]},
		{"comment signature too short", lines[0] + lines[1] + lines[2] + lines[3][:20] + "\n"},
		{"unknown algorithm", badAlgText},
		{"truncated after 2 lines", lines[0] + lines[1]},
		{"oversized", lines[0] + lines[1] + "trusted comment: " + strings.Repeat("x", MaxSignatureSize) + "\n" + lines[3]},
	}
	for _, tc := range malformed {
		t.Run(tc.name, func(t *testing.T) {
			if toolVerifies(t, k, file, []byte(tc.text)) {
				t.Fatal("minisign -V accepts it")
			}
			_, err := ParseSignature([]byte(tc.text))
			if !errors.Is(err, ErrMalformed) || !errors.Is(err, ErrBadSignature) {
				t.Fatalf("ParseSignature: got %v, want ErrMalformed", err)
			}
			for _, mode := range []verifyMode{atEnd, upFront, oneShot} {
				if _, err := check(t, ring, mode, data, []byte(tc.text)); !errors.Is(err, ErrMalformed) {
					t.Fatalf("%s: got %v, want ErrMalformed", mode, err)
				}
			}
		})
	}

	// Tolerated variations: CRLF line ends, a byte-order mark, leading blank
	// lines, no final newline.
	for name, text := range map[string]string{
		"crlf":       strings.ReplaceAll(string(sig), "\n", "\r\n"),
		"bom":        "\xef\xbb\xbf" + string(sig),
		"leading nl": "\n\n" + string(sig),
		"no final":   strings.TrimSuffix(string(sig), "\n"),
	} {
		if _, err := check(t, ring, atEnd, data, []byte(text)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}

	// An altered trusted comment is a bad signature, caught before any image
	// byte when the signature is known up front.
	altered := strings.Replace(string(sig), "release 3.0", "release 9.9", 1)
	if toolVerifies(t, k, file, []byte(altered)) {
		t.Fatal("minisign -V accepts an altered trusted comment")
	}
	if _, err := ring.NewVerifierFor([]byte(altered)); !errors.Is(err, ErrBadSignature) || !strings.Contains(err.Error(), "trusted comment was altered") {
		t.Fatalf("NewVerifierFor altered comment: %v", err)
	}
	if _, err := check(t, ring, atEnd, data, []byte(altered)); !errors.Is(err, ErrBadSignature) || !strings.Contains(err.Error(), "trusted comment") {
		t.Fatalf("altered comment at end: %v", err)
	}
	// Altering the untrusted comment is allowed by the format (minisign too).
	untr := strings.Replace(string(sig), lines[0], "untrusted comment: anything\n", 1)
	if !toolVerifies(t, k, file, []byte(untr)) {
		t.Fatal("minisign -V rejects an edited untrusted comment")
	}
	if _, err := check(t, ring, atEnd, data, []byte(untr)); err != nil {
		t.Fatalf("edited untrusted comment: %v", err)
	}
	// Verify(sig) on an up-front Verifier insists on the same signature.
	v, err := ring.NewVerifierFor(sig)
	if err != nil {
		t.Fatal(err)
	}
	feed(t, v, data)
	if err := v.Verify([]byte(untr)); err == nil || !strings.Contains(err.Error(), "different signature") {
		t.Fatalf("different signature at Verify: %v", err)
	}
	if err := v.Verify(sig); err != nil {
		t.Fatalf("same signature at Verify: %v", err)
	}
}

func TestPolicy(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "k")
	data := imageBytes(5000, 5)
	file := writeFile(t, t.TempDir(), "img", data)
	sig := sign(t, k, file, false, "p")

	cases := []struct {
		name   string
		p      Policy
		sig    []byte
		data   []byte
		want   error
		wantUn bool
	}{
		{"signed ok", Policy{KeyDir: keyDir}, sig, data, nil, false},
		{"unsigned refused", Policy{KeyDir: keyDir}, nil, data, ErrUnsigned, false},
		{"whitespace sig is unsigned", Policy{KeyDir: keyDir}, []byte(" \n"), data, ErrUnsigned, false},
		{"unsigned allowed", Policy{KeyDir: keyDir, AllowUnsigned: true}, nil, data, nil, true},
		{"unsigned allowed without keys", Policy{AllowUnsigned: true}, nil, data, nil, true},
		{"bad sig never ignored", Policy{KeyDir: keyDir, AllowUnsigned: true}, sig, flip(data, 9), ErrBadSignature, false},
		{"signed but no keys configured", Policy{AllowUnsigned: true}, sig, data, ErrUnknownKey, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.p.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			signed := len(bytes.TrimSpace(tc.sig)) > 0
			if err := tc.p.Preflight(signed); !errors.Is(err, ErrUnsigned) != (signed || tc.p.AllowUnsigned) {
				t.Fatalf("Preflight(%v): %v", signed, err)
			}
			v, err := tc.p.NewVerifier()
			if err != nil {
				t.Fatal(err)
			}
			feed(t, v, tc.data)
			info, err := tc.p.Check(v, tc.sig)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("Check: got %v, want %v", err, tc.want)
			}
			if err == nil && (info.Unsigned != tc.wantUn || info.Bytes != int64(len(tc.data))) {
				t.Fatalf("info %+v", info)
			}
		})
	}
	if err := (Policy{}).Preflight(false); err == nil || err.Error() != "signature: image is not signed and signature.allowUnsigned is false" {
		t.Fatalf("ErrUnsigned text: %v", err)
	}
	if err := (Policy{}).Validate(); !errors.Is(err, ErrNoKeys) {
		t.Fatalf("Validate of an empty policy: %v", err)
	}
	if _, err := (Policy{KeyDir: t.TempDir()}).NewVerifier(); !errors.Is(err, ErrNoKeys) {
		t.Fatalf("empty key folder: %v", err)
	}
}
