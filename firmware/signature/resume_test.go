package signature

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"math/rand/v2"
	"os"
	"testing"

	"aead.dev/minisign"
)

// TestResumeAcrossRestart saves the running state mid-stream, restores it into
// a Verifier of a freshly loaded ring (as after a restart) and checks the
// verdict equals the uninterrupted one, for good and tampered remainders.
func TestResumeAcrossRestart(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "k")
	data := imageBytes(1<<20+333, 6)
	file := writeFile(t, t.TempDir(), "img", data)
	sigs := map[bool][]byte{false: sign(t, k, file, false, "r"), true: sign(t, k, file, true, "r")}

	for _, tc := range []struct {
		name    string
		legacy  bool
		upFront bool
	}{
		{"prehashed/atEnd", false, false},
		{"prehashed/upFront", false, true},
		{"legacy/upFront", true, true},
	} {
		for _, cut := range []int{0, 1, 65536, len(data) / 2, len(data)} {
			for _, tamper := range []bool{false, true} {
				sig := sigs[tc.legacy]
				start := func(r *KeyRing) *Verifier {
					if !tc.upFront {
						return r.NewVerifier()
					}
					v, err := r.NewVerifierFor(sig)
					if err != nil {
						t.Fatal(err)
					}
					return v
				}
				rest := data[cut:]
				if tamper && len(rest) > 0 {
					rest = flip(rest, len(rest)-1)
				}
				v1 := start(mustLoad(t, keyDir))
				feed(t, v1, data[:cut])
				state, err := v1.MarshalBinary()
				if err != nil {
					t.Fatal(err)
				}
				if len(state) > 2048 {
					t.Fatalf("state is %d bytes; it must stay small", len(state))
				}
				// A restart: new ring, new Verifier (always from NewVerifier:
				// the saved mode wins), restored state.
				v2 := mustLoad(t, keyDir).NewVerifier()
				if err := v2.UnmarshalBinary(state); err != nil {
					t.Fatalf("%s cut %d: UnmarshalBinary: %v", tc.name, cut, err)
				}
				if v2.Written() != int64(cut) {
					t.Fatalf("Written = %d after restore, want %d", v2.Written(), cut)
				}
				feed(t, v2, rest)
				feed(t, v1, rest)
				var arg []byte
				if !tc.upFront {
					arg = sig
				}
				e1, e2 := v1.Verify(arg), v2.Verify(arg)
				if (e1 == nil) != (e2 == nil) {
					t.Fatalf("%s cut %d tamper %v: uninterrupted %v, resumed %v", tc.name, cut, tamper, e1, e2)
				}
				wantOK := !tamper || cut == len(data)
				if (e2 == nil) != wantOK {
					t.Fatalf("%s cut %d tamper %v: resumed verdict %v", tc.name, cut, tamper, e2)
				}
				if wantOK {
					info, _ := v2.Verified()
					if info.Bytes != int64(len(data)) || info.Legacy != tc.legacy {
						t.Fatalf("info %+v", info)
					}
				}
			}
		}
	}
}

func TestResumeStateErrors(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "k")
	genKey(t, keyDir, "other") // keeps the folder non-empty after the rotation below
	data := imageBytes(4096, 7)
	file := writeFile(t, t.TempDir(), "img", data)
	sig := sign(t, k, file, true, "legacy")
	ring := mustLoad(t, keyDir)

	v, err := ring.NewVerifierFor(sig)
	if err != nil {
		t.Fatal(err)
	}
	feed(t, v, data[:1000])
	state, err := v.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	atEnd := ring.NewVerifier()
	feed(t, atEnd, data[:1000])
	endState, _ := atEnd.MarshalBinary()

	for _, tc := range []struct {
		name  string
		state []byte
	}{
		{"empty", nil},
		{"wrong magic", append([]byte("xxxxx\x01"), state[6:]...)},
		{"truncated", state[:20]},
		{"trailing byte (at end)", append(bytes.Clone(endState), 0)},
		{"unknown mode", append(append([]byte(stateMagic), 9), state[len(stateMagic)+1:]...)},
		{"hash state corrupt", func() []byte { c := bytes.Clone(endState); c[len(stateMagic)+1+8+4] ^= 0xff; return c }()},
		{"signature length wrong", state[:len(state)-1]},
		{"blake2b offset beyond block", func() []byte { c := bytes.Clone(endState); c[len(c)-1] = 200; return c }()},
		{"blake2b digest size not 64", func() []byte { c := bytes.Clone(endState); c[len(stateMagic)+1+8+4+3+80] = 99; return c }()},
	} {
		if err := ring.NewVerifier().UnmarshalBinary(tc.state); !errors.Is(err, ErrState) && !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %v, want ErrState", tc.name, err)
		}
	}
	if err := new(Verifier).UnmarshalBinary(state); !errors.Is(err, ErrState) {
		t.Fatalf("zero Verifier: %v", err)
	}

	// The signing key was rotated out while the device was down.
	if err := os.Remove(k.pub); err != nil {
		t.Fatal(err)
	}
	rotated := mustLoad(t, keyDir)
	if err := rotated.NewVerifier().UnmarshalBinary(state); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("restore after rotation: %v", err)
	}
	// A failed restore leaves the Verifier as it was.
	v3 := rotated.NewVerifier()
	feed(t, v3, data[:10])
	_ = v3.UnmarshalBinary(state)
	if v3.Written() != 10 {
		t.Fatalf("failed restore changed the Verifier: Written = %d", v3.Written())
	}
}

// TestAgreesWithLibrary compares verdicts with aead.dev/minisign's own
// verification (and crypto/ed25519 for the legacy path) over random messages
// and randomly damaged signatures, including signature bits that make S
// non-canonical.
func TestAgreesWithLibrary(t *testing.T) {
	pub, priv, err := minisign.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	pubText, _ := pub.MarshalText()
	key, err := ParsePublicKey(pubText)
	if err != nil {
		t.Fatal(err)
	}
	ring, err := NewKeyRing(key)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 400 {
		msg := imageBytes(rng.IntN(5000), uint64(i))
		legacy := i%2 == 1
		var sig []byte
		if legacy {
			sig = minisign.Sign(priv, msg)
		} else {
			r := minisign.NewReader(bytes.NewReader(msg))
			if _, err := r.Read(make([]byte, len(msg)+1)); err != nil && len(msg) > 0 {
				t.Fatal(err)
			}
			sig = r.Sign(priv)
		}
		var s minisign.Signature
		if err := s.UnmarshalText(sig); err != nil {
			t.Fatal(err)
		}
		switch i % 8 {
		case 0, 1: // untouched
		case 2, 3: // one bit of the message signature
			b := rng.IntN(64 * 8)
			s.Signature[b/8] ^= 1 << (b % 8)
		case 4, 5: // high bits of S: non-canonical scalars
			s.Signature[63] |= byte(1 << (5 + rng.IntN(3)))
		case 6, 7: // message changed
			if len(msg) > 0 {
				msg = flip(msg, rng.IntN(len(msg)))
			}
		}
		sig, _ = s.MarshalText()
		want := minisign.Verify(pub, msg, sig)
		if !legacy {
			r := minisign.NewReader(bytes.NewReader(msg))
			_, _ = r.Read(make([]byte, len(msg)+1))
			want = r.Verify(pub, sig)
		}
		if legacy {
			if got := ed25519.Verify(key.ed, msg, s.Signature[:]); got != want {
				t.Fatalf("case %d: library %v, crypto/ed25519 %v", i, want, got)
			}
		}
		_, err := ring.Verify(bytes.NewReader(msg), sig)
		if (err == nil) != want {
			t.Fatalf("case %d (legacy %v): library says %v, we say %v", i, legacy, want, err)
		}
		if err != nil && !errors.Is(err, ErrBadSignature) {
			t.Fatalf("case %d: error %v does not wrap ErrBadSignature", i, err)
		}
	}
}

// TestWriteDoesNotAllocate: memory must not grow with the image, so feeding
// bytes allocates nothing.
func TestWriteDoesNotAllocate(t *testing.T) {
	keyDir := t.TempDir()
	k := genKey(t, keyDir, "k")
	file := writeFile(t, t.TempDir(), "img", []byte("x"))
	ring := mustLoad(t, keyDir)
	buf := imageBytes(64<<10, 8)
	legacyV, err := ring.NewVerifierFor(sign(t, k, file, true, "l"))
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]*Verifier{"prehashed": ring.NewVerifier(), "legacy": legacyV} {
		if a := testing.AllocsPerRun(200, func() { _, _ = v.Write(buf) }); a != 0 {
			t.Errorf("%s: %v allocations per Write", name, a)
		}
	}
}
