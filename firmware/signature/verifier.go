package signature

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha512"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"

	"filippo.io/edwards25519"
	"golang.org/x/crypto/blake2b"
)

// Info describes a verified signature (or an image accepted unsigned by a
// Policy), for logging and reporting.
type Info struct {
	KeyID          uint64 // signing key (FormatKeyID renders it)
	KeyFile        string // the *.pub file of that key
	TrustedComment string // verified together with the image
	Legacy         bool   // pure Ed25519 signature (streamed with the signature known up front)
	Bytes          int64  // image bytes covered
	Unsigned       bool   // accepted without a signature (Policy.AllowUnsigned)
}

// Verifier checks a minisign signature over a stream without holding the
// stream: memory is constant whatever the image size. Feed it the image with
// Write (it is an io.Writer, e.g. one branch of an io.MultiWriter or an
// io.TeeReader), then call Verify.
//
// A Verifier from KeyRing.NewVerifier receives the signature at the end; it
// accepts prehashed signatures only, because a legacy signature signs the
// message itself and its check needs the signature before the first byte. A
// Verifier from KeyRing.NewVerifierFor knows the signature up front and
// accepts both kinds; it also fails early (unknown key, altered trusted
// comment) before any image byte is transferred.
//
// The running state can be saved with MarshalBinary and restored with
// UnmarshalBinary, so a download checkpoint can carry it across a restart.
// A Verifier is not safe for concurrent use.
type Verifier struct {
	ring *KeyRing
	h    hash.Hash // BLAKE2b-512 of the image, or SHA-512(R || A || image) for legacy
	n    int64
	sig  *Signature // known up front, or nil
	key  *Key       // key of sig when known up front
	info *Info      // set by a successful Verify
}

// NewVerifier starts verification of a stream whose signature will be
// supplied to Verify at the end.
func (r *KeyRing) NewVerifier() *Verifier {
	return &Verifier{ring: r, h: newBlake2b()}
}

// NewVerifierFor starts verification of a stream whose signature is already
// known. It returns ErrUnknownKey, ErrMalformed or ErrBadSignature (altered
// trusted comment) at once, before any image byte is needed.
func (r *KeyRing) NewVerifierFor(sigText []byte) (*Verifier, error) {
	v := &Verifier{ring: r}
	if err := v.begin(sigText); err != nil {
		return nil, err
	}
	return v, nil
}

// Verify streams image through a new Verifier and checks sig; a convenience
// for images already on disk. Both signature kinds are accepted because the
// signature is known before the image is read.
func (r *KeyRing) Verify(image io.Reader, sig []byte) (Info, error) {
	v, err := r.NewVerifierFor(sig)
	if err != nil {
		return Info{}, err
	}
	if _, err := io.Copy(v, image); err != nil {
		return Info{}, fmt.Errorf("signature: read image: %w", err)
	}
	if err := v.Verify(nil); err != nil {
		return Info{}, err
	}
	info, _ := v.Verified()
	return info, nil
}

func (v *Verifier) begin(sigText []byte) error {
	s, err := ParseSignature(sigText)
	if err != nil {
		return err
	}
	k, err := v.ring.lookup(s.KeyID)
	if err != nil {
		return err
	}
	// The trusted comment's signature does not depend on the image, so an
	// altered comment is reported before a download is wasted on it.
	if err := checkComment(k, s); err != nil {
		return err
	}
	v.sig, v.key, v.n, v.info = s, k, 0, nil
	if s.Legacy {
		// Ed25519 verification hashes R || A || message with SHA-512; R and A
		// come first, so knowing the signature up front lets the message
		// part be streamed (see verifyLegacy).
		h := sha512.New()
		h.Write(s.sig.Signature[:32])
		h.Write(k.ed)
		v.h = h
	} else {
		v.h = newBlake2b()
	}
	return nil
}

// Write adds image bytes. It never fails.
func (v *Verifier) Write(p []byte) (int, error) {
	v.h.Write(p)
	v.n += int64(len(p))
	return len(p), nil
}

// Written is the number of image bytes fed so far.
func (v *Verifier) Written() int64 { return v.n }

// Verify checks the signature over everything written so far. For a Verifier
// from NewVerifierFor, sigText may be nil (or must equal the signature given
// there). It can be called more than once; writing may continue afterwards.
func (v *Verifier) Verify(sigText []byte) error {
	v.info = nil
	s, k := v.sig, v.key
	if s != nil {
		if sigText != nil && !bytes.Equal(normalize(sigText), s.text) {
			return errors.New("signature: Verify was given a different signature than NewVerifierFor")
		}
	} else {
		var err error
		if s, err = ParseSignature(sigText); err != nil {
			return err
		}
		if k, err = v.ring.lookup(s.KeyID); err != nil {
			return err
		}
		if s.Legacy {
			return ErrLegacy
		}
	}
	if s.Legacy {
		if !verifyLegacy(k, s.sig.Signature[:], v.h.Sum(nil)) {
			return mismatch(k)
		}
	} else if !ed25519.Verify(k.ed, v.h.Sum(nil), s.sig.Signature[:]) {
		return mismatch(k)
	}
	// minisign checks the trusted comment after the message; so do we, so
	// the verdict is the tool's.
	if err := checkComment(k, s); err != nil {
		return err
	}
	v.info = &Info{KeyID: k.ID, KeyFile: k.File, TrustedComment: s.TrustedComment, Legacy: s.Legacy, Bytes: v.n}
	return nil
}

// Verified returns what the last successful Verify established.
func (v *Verifier) Verified() (Info, bool) {
	if v.info == nil {
		return Info{}, false
	}
	return *v.info, true
}

func mismatch(k *Key) error {
	return fmt.Errorf("%w: the image does not match its signature by key %s (%s): wrong or altered image",
		ErrBadSignature, FormatKeyID(k.ID), keyFile(k))
}

func keyFile(k *Key) string {
	if k.File == "" {
		return "in memory"
	}
	return k.File
}

// checkComment verifies the signature over Signature || TrustedComment.
func checkComment(k *Key, s *Signature) error {
	global := make([]byte, 0, ed25519.SignatureSize+len(s.TrustedComment))
	global = append(global, s.sig.Signature[:]...)
	global = append(global, s.TrustedComment...)
	if !ed25519.Verify(k.ed, global, s.sig.CommentSignature[:]) {
		return fmt.Errorf("%w: the trusted comment was altered (key %s)", ErrBadSignature, FormatKeyID(k.ID))
	}
	return nil
}

// verifyLegacy is crypto/ed25519's verification split at the hash: digest is
// SHA-512(R || A || message), computed while streaming. It follows the
// standard library step by step (RFC 8032 §5.1.7 with the same cofactorless
// equation and canonical-S rule), so its verdict equals ed25519.Verify's.
func verifyLegacy(k *Key, sig, digest []byte) bool {
	if len(sig) != ed25519.SignatureSize || sig[63]&224 != 0 {
		return false
	}
	kScalar, err := edwards25519.NewScalar().SetUniformBytes(digest)
	if err != nil {
		return false
	}
	S, err := edwards25519.NewScalar().SetCanonicalBytes(sig[32:])
	if err != nil {
		return false
	}
	// [S]B = R + [k]A  <=>  [k](-A) + [S]B = R
	minusA := new(edwards25519.Point).Negate(k.point)
	R := new(edwards25519.Point).VarTimeDoubleScalarBaseMult(kScalar, minusA, S)
	return bytes.Equal(sig[:32], R.Bytes())
}

func newBlake2b() hash.Hash {
	h, err := blake2b.New512(nil)
	if err != nil {
		panic("signature: blake2b.New512: " + err.Error()) // only fails for a key > 64 bytes
	}
	return h
}

// legacyOrNil reports whether s is a legacy signature (false for nil).
func (s *Signature) legacyOrNil() bool { return s != nil && s.Legacy }

// checkBlake2bState validates what x/crypto's blake2b UnmarshalBinary does
// not: the digest size and the buffered-bytes offset. A damaged checkpoint
// with an offset beyond the block would otherwise make the next Write panic.
// Layout: "b2b", h[8], c[2] (uint64 each), size, block[128], offset.
func checkBlake2bState(b []byte) error {
	const size = 3 + 8*8 + 2*8 + 1 + blake2b.BlockSize + 1
	if len(b) != size || string(b[:3]) != "b2b" {
		return fmt.Errorf("%w: not a BLAKE2b state", ErrState)
	}
	if b[3+80] != blake2b.Size || int(b[size-1]) > blake2b.BlockSize {
		return fmt.Errorf("%w: corrupt BLAKE2b state", ErrState)
	}
	return nil
}

// State encoding: magic, mode, byte count, hash state, signature text.
const (
	stateMagic   = "gwsig\x01"
	modeAtEnd    = 0
	modeUpFront  = 1
	maxHashState = 1 << 10
)

// MarshalBinary saves the running state (a few hundred bytes; with the
// signature when it was given up front). It does not include the key ring:
// the state is restored into a Verifier of the ring current at that time, so
// a key rotated out in between makes the resumed check fail as unknown key.
func (v *Verifier) MarshalBinary() ([]byte, error) {
	hs, err := v.h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("signature: save hash state: %w", err)
	}
	b := append([]byte(stateMagic), modeAtEnd)
	if v.sig != nil {
		b[len(b)-1] = modeUpFront
	}
	b = binary.BigEndian.AppendUint64(b, uint64(v.n))
	b = binary.BigEndian.AppendUint32(b, uint32(len(hs)))
	b = append(b, hs...)
	if v.sig != nil {
		b = binary.BigEndian.AppendUint32(b, uint32(len(v.sig.text)))
		b = append(b, v.sig.text...)
	}
	return b, nil
}

// UnmarshalBinary replaces v's state with one saved by MarshalBinary. v must
// come from a KeyRing (NewVerifier or NewVerifierFor; which one does not
// matter, the saved mode wins). Errors wrap ErrState, or ErrUnknownKey /
// ErrBadSignature when a saved up-front signature no longer checks out.
func (v *Verifier) UnmarshalBinary(b []byte) error {
	if v.ring == nil {
		return fmt.Errorf("%w: the Verifier was not created by a KeyRing", ErrState)
	}
	rest, ok := bytes.CutPrefix(b, []byte(stateMagic))
	if !ok || len(rest) < 1+8+4 {
		return fmt.Errorf("%w: not a verifier state", ErrState)
	}
	mode := rest[0]
	n := int64(binary.BigEndian.Uint64(rest[1:9]))
	hl := binary.BigEndian.Uint32(rest[9:13])
	rest = rest[13:]
	if n < 0 || hl > maxHashState || uint32(len(rest)) < hl {
		return fmt.Errorf("%w: truncated or corrupt", ErrState)
	}
	hs, rest := rest[:hl], rest[hl:]
	w := &Verifier{ring: v.ring}
	switch mode {
	case modeAtEnd:
		if len(rest) != 0 {
			return fmt.Errorf("%w: trailing bytes", ErrState)
		}
		w.h = newBlake2b()
	case modeUpFront:
		if len(rest) < 4 || uint32(len(rest)-4) != binary.BigEndian.Uint32(rest) {
			return fmt.Errorf("%w: truncated or corrupt signature", ErrState)
		}
		if err := w.begin(rest[4:]); err != nil {
			return fmt.Errorf("signature: restore verifier: %w", err)
		}
	default:
		return fmt.Errorf("%w: unknown mode %d", ErrState, mode)
	}
	if !w.sig.legacyOrNil() {
		if err := checkBlake2bState(hs); err != nil {
			return err
		}
	}
	if err := w.h.(encoding.BinaryUnmarshaler).UnmarshalBinary(hs); err != nil {
		return fmt.Errorf("%w: hash: %w", ErrState, err)
	}
	w.n = n
	*v = *w
	return nil
}
