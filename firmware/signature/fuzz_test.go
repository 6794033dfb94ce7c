package signature

import (
	"bytes"
	"errors"
	"testing"

	"aead.dev/minisign"
)

// fuzzRing is a fixed in-memory key ring, so fuzzed signatures can reach the
// verification code and not only the parser.
func fuzzRing(f *testing.F) (*KeyRing, minisign.PrivateKey) {
	pub, priv, err := minisign.GenerateKey(bytes.NewReader(bytes.Repeat([]byte{7}, 64)))
	if err != nil {
		f.Fatal(err)
	}
	text, _ := pub.MarshalText()
	k, err := ParsePublicKey(text)
	if err != nil {
		f.Fatal(err)
	}
	r, err := NewKeyRing(k)
	if err != nil {
		f.Fatal(err)
	}
	return r, priv
}

// FuzzParseSignature: .minisig files come from the network. Parsing and
// verifying any input must not panic, and every failure must carry one of
// the package's sentinel errors.
func FuzzParseSignature(f *testing.F) {
	ring, priv := fuzzRing(f)
	msg := []byte("firmware")
	f.Add(minisign.Sign(priv, msg), msg)
	r := minisign.NewReader(bytes.NewReader(msg))
	_, _ = r.Read(make([]byte, 64))
	f.Add(r.SignWithComments(priv, "version 1.0", "u"), msg)
	f.Add([]byte("untrusted comment: x\nRUQ\ntrusted comment: \n\n"), msg)
	f.Add([]byte("\xef\xbb\xbf\n\r\n"), []byte{})
	f.Add([]byte("untrusted comment: \n\n\n\n\n"), []byte{})
	f.Fuzz(func(t *testing.T, sig, image []byte) {
		s, err := ParseSignature(sig)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseSignature error without ErrMalformed: %v", err)
			}
			return
		}
		if s.Legacy != (s.sig.Algorithm == minisign.EdDSA) {
			t.Fatalf("Legacy %v for algorithm %x", s.Legacy, s.sig.Algorithm)
		}
		v := ring.NewVerifier()
		_, _ = v.Write(image)
		err = v.Verify(sig)
		if err != nil && !errors.Is(err, ErrBadSignature) && !errors.Is(err, ErrUnknownKey) && !errors.Is(err, ErrLegacy) {
			t.Fatalf("Verify error without a sentinel: %v", err)
		}
		if _, err := ring.Verify(bytes.NewReader(image), sig); err == nil {
			// Anything accepted must be accepted by the library too.
			pub := ring.Keys()[0].pub
			ok := minisign.Verify(pub, image, sig)
			if !ok {
				t.Fatalf("accepted a signature the library rejects")
			}
		}
	})
}

// FuzzUnmarshalState: a checkpoint file may be damaged (power cut, disk
// error); restoring it must fail cleanly.
func FuzzUnmarshalState(f *testing.F) {
	ring, priv := fuzzRing(f)
	v := ring.NewVerifier()
	_, _ = v.Write([]byte("abc"))
	st, _ := v.MarshalBinary()
	f.Add(st)
	lv, err := ring.NewVerifierFor(minisign.Sign(priv, []byte("abc")))
	if err != nil {
		f.Fatal(err)
	}
	st, _ = lv.MarshalBinary()
	f.Add(st)
	f.Add([]byte(stateMagic))
	f.Fuzz(func(t *testing.T, state []byte) {
		w := ring.NewVerifier()
		if err := w.UnmarshalBinary(state); err != nil {
			if w.Written() != 0 {
				t.Fatal("failed restore changed the Verifier")
			}
			return
		}
		_, _ = w.Write([]byte("more"))
		_ = w.Verify(nil)
		if _, err := w.MarshalBinary(); err != nil {
			t.Fatalf("restored state does not marshal again: %v", err)
		}
	})
}

// FuzzParsePublicKey: key files are placed by operators; any content must
// fail cleanly.
func FuzzParsePublicKey(f *testing.F) {
	pub, _, _ := minisign.GenerateKey(nil)
	text, _ := pub.MarshalText()
	f.Add(text)
	f.Add([]byte("untrusted comment: minisign encrypted secret key\nRWRTY0Iy\n"))
	f.Fuzz(func(t *testing.T, text []byte) {
		k, err := ParsePublicKey(text)
		if err != nil {
			if !errors.Is(err, ErrBadKey) {
				t.Fatalf("error without ErrBadKey: %v", err)
			}
			return
		}
		if k.ID != k.pub.ID() || len(k.ed) != 32 || k.point == nil {
			t.Fatalf("inconsistent key %+v", k)
		}
	})
}
